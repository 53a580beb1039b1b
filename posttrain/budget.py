"""What a training stage spent, in the units distillation and RL are compared by.

The R1 comparison (distil a strong teacher, or run RL on the small model itself) is only fair at
an equal budget, so every distill and grpo stage records the same figures in its manifest metrics
(`budget`): optimizer steps, completions trained on, tokens the student and the teacher generated,
the teacher's forward passes, and wall time. A teacher forward pass is one sequence through the
teacher: a sampled trace (generation) or a sequence it scores (the logit targets of `logits` and
`on_policy` distillation), so the two kinds add up. `max_train_seconds` (any stage) stops
training at a wall-time budget instead, through `TimeBudget`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback


class TimeBudget(TrainerCallback):
    """Stop training once `seconds` of wall time have passed since training began (checked after
    every optimizer step); `stopped` says whether the budget, not `max_steps`, ended it."""

    def __init__(self, seconds: float):
        self.seconds, self.start, self.stopped = seconds, time.monotonic(), False

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        if time.monotonic() - self.start >= self.seconds:
            self.stopped = control.should_training_stop = True


def completions_per_step(args, world_size: int) -> int:
    """Sequences one optimizer step trains on: per device batch x accumulation x processes."""
    return args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size


def generated_from_logs(records: list[dict[str, Any]], per_step: int) -> int:
    """Tokens a trainer generated, from its logged mean completion length.

    A record with `completions/mean_length` stands for every step since the previous such record
    (TRL averages over the logging interval, and logs it only at steps that generated), each of
    `per_step` completions, times the refill factor of dynamic sampling where one was logged.
    """
    tokens, last = 0.0, 0
    for r in records:
        if "completions/mean_length" in r and "step" in r:
            steps = max(0, r["step"] - last)
            tokens += (r["completions/mean_length"] * per_step * steps
                       * r.get("dynamic_sampling/generated_frac", 1.0))
            last = r["step"]
    return round(tokens)


def trainer_budget(trainer, train_output, log_path: Path, *, teacher_samples: int = 0,
                   teacher_tokens: int = 0, teacher_scores: bool = False,
                   teacher_s: float = 0.0) -> dict[str, Any]:
    """The `budget` record of a finished TRL training: `teacher_scores` means every trained
    sequence went through the teacher once (logit targets); `teacher_s` is the time the
    teacher's sampling took."""
    from posttrain.dist import world_size
    from posttrain.plots import read_log

    steps = trainer.state.global_step
    per_step = completions_per_step(trainer.args, world_size())
    completions = steps * per_step
    student_tokens = generated_from_logs(read_log(log_path), per_step)
    train_s = train_output.metrics["train_runtime"]
    stopped_by_time = any(getattr(cb, "stopped", False) for cb in trainer.callback_handler.callbacks
                          if isinstance(cb, TimeBudget))
    scored = completions if teacher_scores else 0
    return {"optimizer_steps": steps, "completions": completions,
            "student_generated_tokens": student_tokens,
            "teacher_samples": teacher_samples, "teacher_scored": scored,
            "teacher_forward_passes": teacher_samples + scored,
            "teacher_generated_tokens": teacher_tokens,
            "train_s": round(train_s, 1), "teacher_sampling_s": round(teacher_s, 1),
            "wall_s": round(train_s + teacher_s, 1), "stopped_by_time": stopped_by_time}
