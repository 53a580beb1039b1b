"""What every synthetic task provides: examples with a gold answer and a CoT trace, and checkers.

A task is deterministic by seed and keeps train and test disjoint by hashing each problem into a
split, so `generate("test", ...)` never yields a problem that `generate("train", ...)` can yield.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Example:
    """One verifiable problem.

    Attributes:
        task: Task name (key of `posttrain.tasks.TASKS`).
        prompt: The user turn.
        answer: Gold final answer, as text.
        trace: Step-by-step reasoning that leads to the answer (the cold-start `<think>` body).
        meta: Task-specific fields the checkers need (operands, numbers, difficulty...).
    """

    task: str
    prompt: str
    answer: str
    trace: str
    meta: dict[str, Any]

    def to_row(self) -> dict[str, Any]:
        """Flat dict for a `datasets.Dataset`.

        `meta` travels as a JSON string: tasks have different meta fields, and one Arrow schema
        must hold a mix of tasks.
        """
        return {"task": self.task, "prompt": self.prompt, "answer": self.answer,
                "trace": self.trace, "meta": json.dumps({**self.meta, "answer": self.answer})}


def split_of(key: str, test_fraction: float = 0.2) -> str:
    """Stable train/test assignment of a problem from its canonical key."""
    h = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)
    return "test" if (h % 10_000) < test_fraction * 10_000 else "train"


class Task:
    """Base class: subclasses implement `sample`, `check_answer` and `check_trace` (and may refine
    `step_score`)."""

    name: str = ""

    def sample(self, rng: random.Random, **difficulty: Any) -> Example:
        raise NotImplementedError

    def check_answer(self, answer: str, meta: dict[str, Any]) -> bool:
        """True if `answer` (the text inside <answer>) solves the problem; `meta` as in `to_row`."""
        raise NotImplementedError

    def check_trace(self, trace: str, meta: dict[str, Any]) -> bool:
        """True if every step of the reasoning is right (stricter than the answer alone)."""
        raise NotImplementedError

    def step_score(self, trace: str, meta: dict[str, Any]) -> float:
        """How much of the reasoning is right, in [0, 1]: partial credit where a task can count
        its steps (arithmetic: columns), else all or nothing by `check_trace`."""
        return float(self.check_trace(trace, meta))

    def generate(self, split: str, n: int, seed: int = 0, max_misses: int = 10_000,
                 **difficulty: Any) -> list[Example]:
        """`n` distinct examples of `split` ("train" or "test"), deterministic in `seed`.

        Returns fewer than `n` only if the difficulty setting has too few distinct problems: it
        stops after `max_misses` samples in a row that were duplicates or of the other split
        (a budget on all misses made an exhausted space cost seconds per thousand rows asked).
        """
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        rng = random.Random(f"{self.name}:{split}:{seed}")
        seen: set[str] = set()
        out: list[Example] = []
        misses = 0
        while len(out) < n and misses < max_misses:
            ex = self.sample(rng, **difficulty)
            key = ex.meta["key"]
            if key in seen or split_of(key) != split:
                misses += 1
                continue
            misses = 0
            seen.add(key)
            out.append(ex)
        return out


def load_meta(meta: str | dict[str, Any]) -> dict[str, Any]:
    """`meta` column value (JSON string or dict) as a dict."""
    return json.loads(meta) if isinstance(meta, str) else dict(meta)
