"""Correctness: is the final answer right? The one outcome reward of R1.

All judging goes through `posttrain.scoring.score`, the same code path the eval suites use, so a
reward of 1.0 during RL means exactly "counted correct" at eval time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from posttrain.rewards.columns import column, texts
from posttrain.scoring import score, think_text
from posttrain.tasks import TASKS
from posttrain.tasks.base import load_meta

__all__ = ["accuracy", "correctness", "step_accuracy"]


def correctness(completions: Sequence[Any], columns: dict[str, Any],
                last_number: bool = False) -> list[bool | None]:
    """Per completion: True/False, or None when the gold is missing or unscorable (the sample is
    skipped). `last_number`: also accept a bare last number as the answer (off by default: in RL
    it pays for a number that merely appears last).

    Synthetic tasks (`task` + `meta` columns) use their own checker; anything else compares
    with math-verify against the `answer` column, else the `solution` column (bare, LaTeX,
    `\\boxed{}` or a GSM8K solution ending `#### 42`).
    """
    out: list[bool | None] = []
    for i, text in enumerate(texts(completions)):
        gold = column(columns, "answer", i)
        if gold is None:
            gold = column(columns, "solution", i)
        task, meta = column(columns, "task", i), column(columns, "meta", i)
        try:
            out.append(score(text, None if gold is None else str(gold), task=task, meta=meta,
                             last_number=last_number))
        except (ValueError, TypeError, KeyError):
            # A malformed `meta` row is a data problem, not a wrong answer: skip the sample.
            out.append(None)
    return out


def accuracy(completions: Sequence[Any], *, last_number: bool = False,
             **columns: Any) -> list[float | None]:
    """1.0 if the final answer is right, 0.0 if wrong, None if the gold is unscorable.

    The answer is read after `</think>` from `<answer>…</answer>`, else the last `\\boxed{}`, else
    a final-answer phrase (see `posttrain.extraction`); with `last_number: true` (reward_kwargs)
    also from the bare last number, which is off by default because it rewards a number that
    merely appears last.
    """
    return [None if ok is None else float(ok)
            for ok in correctness(completions, columns, last_number)]


def step_accuracy(completions: Sequence[Any], **columns: Any) -> list[float | None]:
    """Share of the reasoning's steps that are right, by the row's task (`step_score`: the
    columns of a sum, all or nothing for a task that checks its trace whole); None for a row
    without a synthetic task or whose task cannot check its steps.

    Partial credit where the answer reward is flat: when every sample of a group gets the
    answer wrong, GRPO learns nothing from `accuracy` on that prompt, but the samples still
    differ in how many columns they worked right. The rejection stage's `check_steps`, as a
    reward; rule-based like the rest (no learned process reward model).
    """
    out: list[float | None] = []
    for i, text in enumerate(texts(completions)):
        task, meta = column(columns, "task", i), column(columns, "meta", i)
        if task not in TASKS or meta is None:
            out.append(None)
            continue
        trace = think_text(text)
        try:
            out.append(0.0 if trace is None else TASKS[task].step_score(trace, load_meta(meta)))
        except (NotImplementedError, ValueError, TypeError, KeyError):
            out.append(None)  # a task without a step checker, or a malformed `meta` row
    return out
