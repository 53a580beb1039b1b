"""Checks every stage gets before anything is written: FP8 eligibility, disk.

A stage's own `preflight` checks its inputs (data, rewards, tokenizer), and building the plan
checks the trainer settings (posttrain.plan); the checks here are the ones that do not depend on
the stage, so each new stage has them without repeating them. Each raises a one-line `UserError`
that names the problem and what to do. They only check: nothing here changes the plan.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from posttrain.errors import UserError
from posttrain.recipe import TrainingFields


def check_fp8(recipe, init_path: str | None) -> None:
    """`fp8: true` on a model with no layer that can train in FP8 is an error, not a no-op (a
    stage that trains nothing has no `fp8` field).

    The model is built on the meta device (no weights, no memory) and put through the same
    conversion training uses, so what counts as eligible is defined in one place (posttrain.fp8).
    """
    if not isinstance(recipe, TrainingFields) or not recipe.fp8 or not init_path:
        return
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from posttrain.fp8 import convert_to_fp8

    try:
        config = AutoConfig.from_pretrained(init_path)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the model config of {init_path!r}: "
                        f"{str(e).splitlines()[0]}") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    counts = convert_to_fp8(model)
    if not any(counts.values()):
        raise UserError(f"fp8: true, but no layer of {init_path!r} ({config.model_type}) can train "
                        f"in FP8: posttrain.fp8 handles nn.Linear and fused MoE experts; "
                        f"set fp8: false for this model")


def check_writable(stage_dir: Path, init_path: str | None) -> None:
    """UserError if the stage's dir cannot be created/written, or its disk is clearly too full.

    Checked before training: a full disk otherwise shows up as a crash in the middle of the first
    checkpoint save. Each checkpoint holds the weights plus ~2x them in Adam state, and the final
    model is one more copy, so ~4x the init model's weights is the least a stage needs;
    $POSTTRAIN_MIN_FREE_MB raises the floor (room for logs, evals and other runs on the disk).
    """
    existing = stage_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write the stage's output under {existing} (not a writable "
                        f"directory); fix it or set POSTTRAIN_RUNS_DIR to a writable dir")
    weights = 0
    if init_path and Path(init_path).is_dir():
        weights = sum(p.stat().st_size for p in Path(init_path).glob("*.safetensors")) or \
            sum(p.stat().st_size for p in Path(init_path).glob("*.bin"))
    need = max(4 * weights + (64 << 20), int(os.environ.get("POSTTRAIN_MIN_FREE_MB", 0)) << 20)
    free = shutil.disk_usage(existing).free
    if free < need:
        raise UserError(f"only {free >> 20} MiB free under {existing}; this stage needs about "
                        f"{need >> 20} MiB (checkpoints + final model); free space or set "
                        f"POSTTRAIN_RUNS_DIR elsewhere")
