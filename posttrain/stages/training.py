"""The training skeleton every training stage shares, and its parts.

A training stage's `main` builds its data and its TRL trainer; everything around that is here, in
one function, `run_training`: the model prepared for the recipe's training fields (FP8 layers,
MoE balance), the callbacks they need (EMA, time budget, log capture, the plan in every
checkpoint, the resume fix), the generation engines let go of before training starts, resume
from the last complete checkpoint, LoRA merged, the final model saved atomically. A new training
stage calls it and cannot forget one of them.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from posttrain import atomic
from posttrain.dist import is_main_process
from posttrain.errors import UserError
from posttrain.plan import StagePlan
from posttrain.stages.context import StageContext
from posttrain.stages.lora import LoraFields, merge_lora


def run_training(recipe, ctx: StageContext, model, tokenizer,
                 build_trainer: Callable[[Any, list], Any]) -> tuple[Any, Any]:
    """Train `model` with the trainer `build_trainer(model, callbacks)` makes; (trainer, output).

    In order: the model prepared for the recipe (`prepare_model`), the trainer built with the
    stage's callbacks (`stage_callbacks`), every cached generation engine released (a DPO pair
    sampler or a teacher's vLLM worker must not hold memory, or the GPU, while training), training
    resumed from the last complete checkpoint of an unfinished attempt, LoRA adapters merged,
    and the model, tokenizer and plan saved to the stage's output dir. The EMA's figures go to
    `ctx.metrics`.
    """
    from posttrain.rollout import release_engines

    release_engines()
    model = prepare_model(model, recipe)
    trainer = build_trainer(model, stage_callbacks(recipe, ctx))
    out = trainer.train(resume_from_checkpoint=last_checkpoint(ctx))
    from posttrain.ema import EMACallback
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, EMACallback):  # its updates, skips and effective interval
            ctx.metrics["ema"] = callback.stats()
    final = merge_lora(trainer.model, recipe) if isinstance(recipe, LoraFields) else trainer.model
    tokenizer.padding_side = "left"  # saved for generation
    save_final(final, tokenizer, ctx)
    return trainer, out


def load_trainable(path: str, recipe):
    """The model a stage trains: FP32 master weights under `fp8` (DeepSeek-V3 §3.3: the FP8
    GEMMs read quantized copies, the optimizer updates FP32 weights), else `load_model`'s
    default (bf16 on a GPU, where TRL's `bf16` trains it)."""
    from posttrain.models import load_model
    return load_model(path, dtype="float32" if recipe.fp8 else "auto")


def prepare_model(model, recipe):
    """The recipe's training fields applied to a freshly loaded model (FP8 layer swap, the MoE
    balance check); returns the model to train (possibly the same object)."""
    if recipe.moe_balance is not None:
        from posttrain.moe_balance import routers
        if not routers(model):
            raise UserError(f"moe_balance needs a DeepSeek-V3-style MoE (routers with "
                            f"e_score_correction_bias); {type(model).__name__} has none")
    if recipe.fp8:
        from posttrain.fp8 import FP8Config, convert_to_fp8
        counts = convert_to_fp8(model, FP8Config.parse(recipe.fp8))
        print(f"[posttrain] fp8: {counts['linear']} Linear layers and {counts['experts']} expert "
              f"groups train in FP8", flush=True)
    return model


def stage_callbacks(recipe, ctx: StageContext) -> list:
    """Trainer callbacks of every training stage: the recipe's training fields (MoE balance,
    time budget, EMA), log capture, the plan in every checkpoint, the resume fix."""
    callbacks = []
    if recipe.moe_balance is not None:  # before the logger: it adds to the logs
        from posttrain.moe_balance import BalanceConfig, MoEBalanceCallback
        callbacks.append(MoEBalanceCallback(BalanceConfig.parse(recipe.moe_balance), ctx.stage_dir))
    callbacks.append(LogThreads())  # before the logger: it adds to the logs
    callbacks.append(JsonlLogger(ctx.log_path))
    callbacks.append(PlanCallback(ctx.plan))
    if recipe.max_train_seconds is not None:
        from posttrain.budget import TimeBudget
        callbacks.append(TimeBudget(recipe.max_train_seconds))
    from posttrain.checkpoints import ResumeConvertedWeights
    callbacks.append(ResumeConvertedWeights())  # resume: reload what transformers#48805 skips
    if recipe.ema is not None:  # writes stage_dir/ema; save_final moves it
        from posttrain.ema import EMA_DIR, EMACallback, EMAConfig
        callbacks.append(EMACallback(EMAConfig.parse(recipe.ema), ctx.stage_dir / EMA_DIR))
    return callbacks


class LogThreads(TrainerCallback):
    """Log torch's thread count with every record: step times, and on a CPU the last bits of
    the figures, depend on it."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        import torch
        if logs is not None:
            logs["threads"] = torch.get_num_threads()


class PlanCallback(TrainerCallback):
    """Write the stage's plan into every checkpoint, so a checkpoint says how it was made."""

    def __init__(self, plan: StagePlan):
        self.plan = plan

    def on_save(self, args, state, control, **kwargs):
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and ckpt.is_dir():
            self.plan.write(ckpt)


class JsonlLogger(TrainerCallback):
    """Append every trainer log record to logs.jsonl (the report plots from it), with the wall
    seconds since training began (`elapsed_s`: step times, read off the log)."""

    def __init__(self, path: Path):
        self.path = path
        self.start = time.monotonic()
        path.parent.mkdir(parents=True, exist_ok=True)

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.monotonic()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and state.is_world_process_zero:
            record = {"step": state.global_step, **logs,
                      "elapsed_s": round(time.monotonic() - self.start, 3)}
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def last_checkpoint(ctx: StageContext) -> str | None:
    """Newest complete checkpoint of an earlier attempt, if resuming is on.

    Incomplete ones (a save cut short by a crash) are deleted by the main process, so neither this
    resume nor the Trainer's checkpoint rotation ever sees them again; log records past the
    checkpoint are dropped, since the resumed run logs those steps again.
    """
    from posttrain.checkpoints import checkpoint_complete, checkpoint_step, trim_log

    if not ctx.resume:
        return None
    found = [p for p in ctx.checkpoint_dir.iterdir() if p.is_dir() and checkpoint_step(p)] \
        if ctx.checkpoint_dir.is_dir() else []
    for path in sorted(found, key=checkpoint_step, reverse=True):
        if checkpoint_complete(path):
            if is_main_process():
                print(f"[posttrain] resuming from {path}", flush=True)
                trim_log(ctx.log_path, checkpoint_step(path))
            return str(path)
        if is_main_process():
            print(f"[posttrain] removing incomplete checkpoint {path}", flush=True)
            shutil.rmtree(path, ignore_errors=True)
    if is_main_process():
        trim_log(ctx.log_path, 0)
    return None


def _gathered_state_dict(model) -> dict[str, Any] | None:
    """Full weights of a model sharded across ranks, or None when it is not sharded.

    Under FSDP2 each rank holds DTensor shards and under DeepSpeed ZeRO-3 empty placeholders, so
    `save_pretrained` on rank 0 alone would write a fraction of the model. Collective: every
    rank must call it. (FSDP2 gather checked with 2 CPU processes; ZeRO-3 needs CUDA.)
    """
    from torch.distributed.tensor import DTensor

    params = list(model.parameters())
    if any(isinstance(p, DTensor) for p in params):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(
            model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return ({k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
                    if is_main_process() else {})
    return None


def save_final(model, tokenizer, ctx: StageContext) -> Path:
    """Save the model, tokenizer and the stage's plan to the output dir atomically (tmp dir +
    rename).

    Only the main process writes; under `accelerate launch` the other ranks return once they
    have helped gather a sharded (FSDP2 / ZeRO-3) model's weights.
    """
    state_dict = _gathered_state_dict(model)
    if not is_main_process():
        return ctx.output_dir
    tmp = atomic.fresh_dir(ctx.output_dir)
    model.save_pretrained(tmp, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    ctx.plan.write(tmp)
    ema = ctx.stage_dir / "ema"  # EMA weights written by posttrain.ema's callback at train end
    if ema.is_dir():
        os.replace(ema, tmp / "ema")
    return atomic.replace_dir(tmp, ctx.output_dir)
