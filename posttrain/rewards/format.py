"""Format rewards: the shape of the recipe's answer format (posttrain.answer_format).

Every regex is `re.DOTALL` (reasoning spans lines), and the opening `<think>` is optional: chat
templates of reasoning models (and R1-Zero prompts) often end the prompt with `<think>`, so the
completion starts inside the reasoning. A format reward that insists on it scores valid output 0
— the pitfall open-r1 and TRL users hit.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from posttrain.answer_format import is_well_formed, tag_score
from posttrain.rewards.columns import check_param, column, texts
from posttrain.scoring import think_text

__all__ = ["format_reward", "tag_count", "reasoning_steps"]

# Explicit step markers, as in open-r1: "Step 2:", numbered or bulleted lines, transition words.
_STEP_MARKER = re.compile(
    r"(?:\bStep\s*\d+\s*[:.)]|^\s*\d+[.)]\s|^\s*[-*•]\s|\b(?:First|Second|Third|Next|Then|Finally),)",
    re.MULTILINE | re.IGNORECASE)


def _formats(columns: dict[str, Any], n: int) -> list[str]:
    """Each sample's answer format: the `answer_format` column the stage adds, else `tags`."""
    return [column(columns, "answer_format", i) or "tags" for i in range(n)]


def format_reward(completions: Sequence[Any], **columns: Any) -> list[float]:
    """1.0 if the completion is well formed in its row's answer format (`tags`: `<think>…</think>`
    then one `<answer>…</answer>` and nothing after it; `boxed`: `<think>…</think>` then a final
    `\\boxed{}`); 0.0 otherwise. The leading `<think>` may be in the prompt."""
    items = texts(completions)
    return [float(is_well_formed(t, f)) for t, f in zip(items, _formats(columns, len(items)))]


format_reward.__name__ = "format"  # logged by TRL as rewards/format/mean


def tag_count(completions: Sequence[Any], **columns: Any) -> list[float]:
    """0.25 per format check passed (`tags`: `<think>`, `</think>`, `<answer>`, `</answer>` each
    exactly once; `boxed`: think opened and closed once, one `\\boxed{}` after it).

    A dense, partial-credit version of `format`: R1-Zero starts near 0 format rate, where the
    all-or-nothing reward carries no signal.
    """
    items = texts(completions)
    return [tag_score(t, f) for t, f in zip(items, _formats(columns, len(items)))]


def reasoning_steps(completions: Sequence[Any], *, min_steps: int = 3,
                    separator: str | None = None, **_: Any) -> list[float]:
    """Share of `min_steps` explicit reasoning steps, capped at 1.0.

    Steps are counted in the chain of thought (the whole completion if it has none): by default
    open-r1's markers ("Step 1:", numbered or bulleted lines, "First," "Next," "Finally,"); with
    `separator` set (e.g. "|" for the tiny arithmetic traces, "\\n" for line-per-step), the
    non-empty segments between separators instead.

    Args:
        min_steps: Steps needed for the full reward.
        separator: Count segments split by this string instead of markers.
    """
    check_param("reasoning_steps", "min_steps", min_steps,
                isinstance(min_steps, int) and not isinstance(min_steps, bool) and min_steps > 0,
                "a positive integer")
    check_param("reasoning_steps", "separator", separator,
                separator is None or (isinstance(separator, str) and separator != ""),
                "a non-empty string or null")
    out = []
    for text in texts(completions):
        cot = think_text(text)
        cot = text if cot is None else cot
        if separator is None:
            n = len(_STEP_MARKER.findall(cot))
        else:
            n = sum(1 for seg in cot.split(separator) if seg.strip())
        out.append(min(1.0, n / min_steps))
    return out
