"""Multi-digit multiplication: a task a tiny model cannot do in its head but can hand to Python.

`What is 347*58?` → `20126`. There is no short trace a 0.2M-parameter model can carry out for a
3-digit by 2-digit product, so a model that answers unaided mostly guesses; one that calls the
`python` tool (posttrain.tools) and copies the result gets it right. The cold start shows both:
`tool_share` of the examples carry a tool call in their trace (`meta["tool_calls"]`, turned into
a tool-calling conversation by `posttrain.data.to_sft`), the rest answer directly. Difficulty:
`digits` of each factor (int or [lo, hi], default 3 and 2).
"""

from __future__ import annotations

import random
import re
from typing import Any

from posttrain.tasks.base import Example, Task


def _range(digits: int | list[int]) -> tuple[int, int]:
    if isinstance(digits, int):
        return digits, digits
    return int(digits[0]), int(digits[1])


class Product(Task):
    name = "product"

    def sample(self, rng: random.Random, digits: int | list[int] = 3,
               other_digits: int | list[int] = 2, tool_share: float = 0.0) -> Example:
        if not 0.0 <= tool_share <= 1.0:
            raise ValueError(f"tool_share must be in [0, 1], got {tool_share}")
        (lo, hi), (lo2, hi2) = _range(digits), _range(other_digits)
        d, e = rng.randint(lo, hi), rng.randint(lo2, hi2)
        a, b = rng.randint(10 ** (d - 1), 10 ** d - 1), rng.randint(10 ** (e - 1), 10 ** e - 1)
        meta: dict[str, Any] = {"key": f"{a}*{b}", "a": a, "b": b}
        if rng.random() < tool_share:  # the trace hands the product to Python, then reads it
            meta["tool_calls"] = [{"name": "python", "code": f"print({a}*{b})",
                                   "result": f"{a * b}\n"}]
        return Example(task=self.name, prompt=f"What is {a}*{b}?", answer=str(a * b),
                       trace=f"{a}*{b}", meta=meta)

    def check_answer(self, answer: str, meta: dict[str, Any]) -> bool:
        text = answer.strip().replace(",", "")
        return bool(re.fullmatch(r"[+-]?\d+", text)) and int(text) == int(meta["answer"])

    def check_trace(self, trace: str, meta: dict[str, Any]) -> bool:
        """Nothing to check step by step: the trace names the product, a tool computes it."""
        return True
