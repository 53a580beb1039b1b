"""Multi-digit addition with a digit-wise trace.

`056+504` -> `<think>6+4+0=10 c1|5+0+1=6 c0|0+5+0=5 c0</think><answer>560</answer>`.
Operands are zero-padded to the digit count: unpadded, small models learn one trace for every
prompt (measured). Difficulty knobs: `digits` (int or [lo, hi]) and `carries` (allow them or not) —
the cold-start set can be made narrow (no carries) so RL has a gap to close.

`style: words` renders the same problems for a pretrained model, in natural language: "What is
56 + 504?", worked column by column from the ones ("6 + 4 = 10, carry 1. 5 + 0 + 1 = 6, carry 0.
0 + 5 = 5, carry 0. So 56 + 504 = 560.") — the tiny world's task as a question a real model can
read, its trace kept short (a 135M model trains on it on CPU).
"""

from __future__ import annotations

import random
import re
from typing import Any

from posttrain.tasks.base import Example, Task

_STEP = re.compile(r"^\s*(\d)\+(\d)\+(\d)=(\d{1,2}) c([01])\s*$")
# "6 + 4 = 10, carry 1." (no carry in) or "5 + 0 + 1 = 6, carry 0." (a carry in)
_WORD_STEP = re.compile(r"(\d) \+ (\d)(?: \+ (1))? = (\d{1,2}), carry ([01])\.")
STYLES = ("digits", "words")


def _digits_range(digits: int | list[int] | tuple[int, int]) -> tuple[int, int]:
    if isinstance(digits, int):
        return digits, digits
    lo, hi = digits
    return int(lo), int(hi)


def _has_carry(a: int, b: int) -> bool:
    while a or b:
        if a % 10 + b % 10 >= 10:
            return True
        a, b = a // 10, b // 10
    return False


def addition_trace(a: str, b: str) -> str:
    """Digit-wise trace from the least significant digit, with the carry after each step."""
    steps, carry = [], 0
    for da, db in zip(reversed(a), reversed(b)):
        s = int(da) + int(db) + carry
        steps.append(f"{da}+{db}+{carry}={s} c{s // 10}")
        carry = s // 10
    return "|".join(steps)


def words_trace(a: str, b: str) -> str:
    """The digit-wise trace as sentences, one column each from the ones, then the sum."""
    steps, carry = [], 0
    for da, db in zip(reversed(a), reversed(b)):
        s = int(da) + int(db) + carry
        added = f"{da} + {db}" + (" + 1" if carry else "")
        steps.append(f"{added} = {s}, carry {s // 10}.")
        carry = s // 10
    return " ".join(steps) + f" So {int(a)} + {int(b)} = {int(a) + int(b)}."


class Arithmetic(Task):
    name = "arithmetic"

    def sample(self, rng: random.Random, digits: int | list[int] = (1, 3),
               carries: bool = True, style: str = "digits") -> Example:
        if style not in STYLES:
            raise ValueError(f"style must be one of {', '.join(STYLES)}, got {style!r}")
        lo, hi = _digits_range(digits)
        for _try in range(1000):
            d = rng.randint(lo, hi)
            a, b = rng.randrange(10**d), rng.randrange(10**d)
            if carries or not _has_carry(a, b):
                break
        sa, sb = str(a).zfill(d), str(b).zfill(d)
        words = style == "words"
        return Example(
            task=self.name,
            prompt=f"What is {a} + {b}?" if words else f"What is {sa}+{sb}?",
            answer=str(a + b),
            trace=words_trace(sa, sb) if words else addition_trace(sa, sb),
            meta={"key": f"{sa}+{sb}", "a": sa, "b": sb, "digits": d,
                  "carry": _has_carry(a, b), "style": style},
        )

    def check_answer(self, answer: str, meta: dict[str, Any]) -> bool:
        text = answer.strip().replace(",", "")
        if not re.fullmatch(r"[+-]?\d+", text):
            return False
        return int(text) == int(meta["answer"])

    def check_trace(self, trace: str, meta: dict[str, Any]) -> bool:
        return _worked_columns(trace, meta) == _columns(meta["a"], meta["b"])

    def step_score(self, trace: str, meta: dict[str, Any]) -> float:
        """Share of the columns worked right, matched in order from the ones (a missing or extra
        column counts as a wrong one)."""
        worked, right = _worked_columns(trace, meta), _columns(meta["a"], meta["b"])
        return sum(w == r for w, r in zip(worked, right)) / max(len(worked), len(right))


def _columns(a: str, b: str) -> list[tuple[int, ...]]:
    """Each column's right (digit, digit, carry in, sum, carry out), from the ones."""
    out, carry = [], 0
    for da, db in zip(reversed(a), reversed(b)):
        s = int(da) + int(db) + carry
        out.append((int(da), int(db), carry, s, s // 10))
        carry = s // 10
    return out


def _worked_columns(trace: str, meta: dict[str, Any]) -> list[tuple[int, ...] | None]:
    """The columns a trace works, in its order, as `_columns` spells them (None: a step that
    does not parse)."""
    if meta.get("style") == "words":
        return [(int(x), int(y), int(c or 0), int(s), int(c_out))
                for x, y, c, s, c_out in _WORD_STEP.findall(trace)]
    return [tuple(int(g) for g in m.groups()) if (m := _STEP.match(part)) else None
            for part in trace.strip().split("|")]
