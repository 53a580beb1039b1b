"""Is a completion right? One code path for the eval suites, the RL rewards, rejection sampling
and DPO pairing.

Synthetic tasks use their own checkers on the extracted answer. Everything else: the gold is read
as datasets write it (GSM8K `#### 42`, a solution's last `\\boxed{}`, or bare), the answer is
found as models write it (posttrain.extraction), and math-verify decides equivalence (LaTeX,
fractions, intervals, tuples, `x = 5` against `5`, `1,000` = `1000`, `0.5` = `\\frac12`).

A gold that is neither a math object nor a clean literal (a word such as `Monday`, a choice such
as `(C)`) makes the sample unscorable: `score` returns None, rewards skip it, evals count it. This
matters: math-verify reads prose as a product of symbols, so `two forty` would "equal" `forty two`.
"""

from __future__ import annotations

import logging
import re
import threading
from functools import lru_cache
from typing import Any

from posttrain.extraction import boxed, clean, extract_answer
from posttrain.tasks import TASKS
from posttrain.tasks.base import load_meta

__all__ = ["answers_equal", "boxed", "completion_text", "extract_answer", "gold_answer",
           "gold_value", "math_equal", "score", "think_text"]

_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_GSM8K_GOLD = re.compile(r"####\s*(.+?)\s*$", re.DOTALL)
# Words that are math, not prose, when they appear in an answer.
_MATH_WORDS = {"sin", "cos", "tan", "cot", "sec", "csc", "arcsin", "arccos", "arctan", "log",
               "ln", "exp", "sqrt", "pi", "infty", "inf", "mod", "gcd", "lcm", "max", "min", "deg",
               "and", "or", "i", "e"}
_LITERAL = re.compile(r"^\(?([A-Za-z]+)\)?$")
# A hedge or an enumeration is not an answer: longer than this many times the gold (and 32
# characters), it scores 0.
_MAX_LENGTH_RATIO = 4


def completion_text(completion: Any) -> str:
    """Plain text of a completion given as a string or as chat messages (TRL passes both).

    Of a message list only the assistant turns count (tool results are not the model's words,
    and a tool call is no part of its answer); a turn's parsed-out reasoning goes back inside
    `<think>` tags, so a tool-using completion reads like any other to the format and answer
    checks.
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        # A message's content is a string or a list of parts ({"type": "text", "text": ...}).
        content = completion.get("content", completion.get("text"))
        text = content if isinstance(content, str) else completion_text(content or [])
        reasoning = completion.get("reasoning_content")
        return f"<think>{reasoning}</think>{text}" if reasoning else text
    if isinstance(completion, (list, tuple)):
        return "".join(completion_text(m) for m in completion
                       if isinstance(m, str) or (isinstance(m, dict) and m.get("role") != "tool"))
    return ""


def think_text(text: str) -> str | None:
    """The reasoning inside <think>…</think> (or before </think> if <think> was in the prompt)."""
    m = _THINK.search(text)
    if m:
        return m.group(1)
    if "</think>" in text:
        return text.split("</think>", 1)[0]
    return None


def gold_answer(gold: str) -> str:
    """A gold answer as written in common datasets: GSM8K `#### 42`, a `\\boxed{}` solution, or bare."""
    gold = str(gold)
    m = _GSM8K_GOLD.search(gold)
    if m:
        return m.group(1).strip()
    box = boxed(gold)
    return box.strip() if box is not None else gold.strip()


# math-verify's timeouts use SIGALRM, which only works in the main thread; elsewhere run without.
logging.getLogger("math_verify").setLevel(logging.ERROR)


def _timeout() -> int | None:
    return 5 if threading.current_thread() is threading.main_thread() else None


@lru_cache(maxsize=65536)
def _parse(text: str):
    """math-verify's parse of a cleaned answer (wrapped in `$…$`: it reads LaTeX only inside
    delimiters or `\\boxed{}`, so a bare `\\frac{\\pi}{2}` would parse to nothing)."""
    from math_verify import parse
    if not text:
        return []
    try:
        return parse(f"${text}$", parsing_timeout=_timeout()) or \
            parse(text, parsing_timeout=_timeout())
    except Exception:  # noqa: BLE001 - sympy/antlr can fail on odd input: unparsed, never a crash
        return []


def _literal(text: str) -> str | None:
    """A clean literal (one word, or a choice letter like `(C)`), lower-cased; else None."""
    inner = re.sub(r"^\\(?:text|textbf|mathrm)\{(.*)\}$", r"\1", text.strip())
    m = _LITERAL.match(inner.strip())
    return m.group(1).lower() if m else None


def _prose(text: str) -> bool:
    """Does a cleaned answer read as words ("forty two", "is odd")? Two words of 2+ letters next
    to each other, outside LaTeX commands and `\\text{}`, and not math words ("x and y", "sin x"),
    make prose; variable names (`dM/dt`, `MR=SRMC`) do not."""
    bare = re.sub(r"\\(?:text|mathrm|textbf|mbox|operatorname)\s*\{[^{}]*\}", " ", text)
    bare = re.sub(r"\\[A-Za-z]+", " ", bare)
    pairs = re.findall(r"(?=\b([A-Za-z]{2,})\s+([A-Za-z]{2,})\b)", bare)
    return any(a.lower() not in _MATH_WORDS and b.lower() not in _MATH_WORDS for a, b in pairs)


@lru_cache(maxsize=65536)
def gold_value(gold: str) -> tuple[str, Any] | None:
    """How a gold is compared: ("math", parsed), ("literal", word), or None when unscorable."""
    g = clean(gold_answer(gold))
    literal = _literal(g)
    if literal is not None and (len(literal) == 1 and "(" in g or len(literal) > 1):
        return ("literal", literal)
    if not g or _prose(g):
        return None
    parsed = _parse(g)
    return ("math", parsed) if parsed else None


def math_equal(answer: str, gold: str) -> bool | None:
    """Is `answer` equivalent to `gold`? None when the gold is unscorable (the sample is skipped)."""
    value = gold_value(str(gold))
    if value is None:
        return None
    a = clean(answer)
    if not a or len(a) > max(32, _MAX_LENGTH_RATIO * len(clean(gold_answer(str(gold))))):
        return False
    kind, parsed = value
    if kind == "literal":
        return _literal(a) == parsed
    if _prose(a):
        return False
    pred = _parse(a)
    if not pred:
        return False
    from math_verify import verify
    try:
        return bool(verify(parsed, pred, timeout_seconds=_timeout()))
    except Exception:  # noqa: BLE001 - sympy can fail on odd input: count it wrong, never crash
        return False


def answers_equal(a: str, b: str) -> bool:
    """Are two extracted answers the same value (majority vote groups by this)?"""
    if a == b or clean(a) == clean(b):
        return True
    return math_equal(a, b) is True


def score(text: str, gold: str | None = None, task: str | None = None,
          meta: str | dict[str, Any] | None = None, last_number: bool = True) -> bool | None:
    """Is completion `text` right? Synthetic tasks use their checker; others math-verify.

    Returns None when there is no gold or it is unscorable (callers skip such samples).
    `last_number`: allow the last-number fallback of `extract_answer` (off for RL rewards).
    """
    if task in TASKS and meta is not None:
        answer = extract_answer(text, last_number)
        return answer is not None and TASKS[task].check_answer(answer, load_meta(meta))
    if gold is None or gold_value(str(gold)) is None:
        return None
    answer = extract_answer(text, last_number)
    return False if answer is None else math_equal(answer, str(gold))
