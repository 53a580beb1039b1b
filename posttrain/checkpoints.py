"""Trainer checkpoints that a resume can trust: completeness, the stage log, converted weights.

A stage killed at any instant (`kill -9`, OOM, a lost node) must resume from its last *complete*
checkpoint with the optimizer, scheduler, RNG and data position it had, and the run's record must
read as if the crash had not happened. transformers gives most of this; the three gaps it leaves
are closed here.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import TrainerCallback

from posttrain import atomic

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors",
                "pytorch_model.bin", "pytorch_model.bin.index.json")


def checkpoint_step(path: Path) -> int | None:
    """N of a `checkpoint-N` dir, else None."""
    prefix, _, step = path.name.rpartition("-")
    return int(step) if prefix == "checkpoint" and step.isdigit() else None


def checkpoint_complete(path: Path) -> bool:
    """Whether the Trainer finished writing checkpoint dir `path`.

    transformers writes `checkpoint-N/` in place: weights, then optimizer/scheduler/RNG, then
    `trainer_state.json` last. A kill in between leaves a dir that `get_last_checkpoint` would
    still pick, and resuming from it crashes or silently restarts the optimizer. So a checkpoint
    counts only if its trainer state parses, names step N, and weights are there.
    """
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return (state.get("global_step") == checkpoint_step(path)
            and any((path / w).exists() for w in WEIGHT_FILES))


def trim_log(path: Path, step: int) -> None:
    """Drop records past `step` from a stage's logs.jsonl (the resumed run logs them again)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except ValueError:  # a line cut short by the crash
            continue
    atomic.write_text(path, "".join(f"{line}\n" for line in kept))


def _saved_keys(ckpt: Path) -> set[str] | None:
    from safetensors import safe_open

    index = ckpt / "model.safetensors.index.json"
    if index.exists():
        return set(json.loads(index.read_text())["weight_map"])
    single = ckpt / "model.safetensors"
    if single.exists():
        with safe_open(str(single), "pt") as f:
            return set(f.keys())
    return None


class ResumeConvertedWeights(TrainerCallback):
    """Restore weights that `Trainer(resume_from_checkpoint=...)` silently leaves unloaded.

    transformers 5 saves MoE experts in the hub layout (one tensor per expert) but the Trainer
    reloads a checkpoint with a plain non-strict `load_state_dict`, so the model's fused expert
    tensors keep their pre-resume values (transformers issue #48805, fix pending in PR #48822).
    Measured here on the tiny DeepSeek-V3 MoE: the resumed loss drifted from the uninterrupted
    run's from the first step on. This callback runs once the Trainer has loaded the checkpoint
    and copies exactly the tensors the checkpoint did not match by name, loaded through
    `from_pretrained` (which applies the conversion). Models whose keys match are untouched.
    """

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not state.global_step or model is None or not hasattr(model, "from_pretrained"):
            return
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        saved = _saved_keys(ckpt)
        own = model.state_dict()
        missing = [k for k in own if saved is not None and k not in saved]
        if not missing:
            return
        fresh = type(model).from_pretrained(str(ckpt), dtype=next(model.parameters()).dtype)
        loaded = fresh.state_dict()
        update = {k: loaded[k] for k in missing if k in loaded and loaded[k].shape == own[k].shape}
        model.load_state_dict(update, strict=False)
        del fresh, loaded
