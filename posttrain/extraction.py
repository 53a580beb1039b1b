"""Find the final answer in a completion the way models write it, and clean it for comparison.

Where the answer is looked for, in order: the last `<answer>…</answer>`, the last `\\boxed{}`
(R1 and Qwen evaluations count the last), GSM8K's own final line `#### 18` (what models
fine-tuned on GSM8K write), a final-answer phrase ("The answer is …", "Final Answer: The final
answer is $18$. I hope it is correct.", "The final answer is:\\n18"), and — only where asked,
e.g. to evaluate a base model — the last number in the text. When the
completion closes a `</think>` block, only the text after it counts: an answer inside the
reasoning is a draft, not the answer.

Why by hand: math-verify parses LaTeX and numbers well once it has the answer, but its own
extraction reads `\\$` as a math delimiter, keeps markdown emphasis, and takes `:` for the answer
after "The answer is:". These are the forms real model outputs take (see tests/test_scoring.py).
"""

from __future__ import annotations

import ast
import re

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# "the answer is", "final answer:", "Answer =": the phrase, then what follows it. `is` must be
# the word (not "isn't"); a colon after "is" is allowed ("The answer is: 18").
_PHRASE = re.compile(r"\b(?:final\s+)?answer\b(?:\s+is(?![\w'’])|\s*[:=])\s*:?\s*",
                     re.IGNORECASE)
# Commas only as thousands separators: "3,4" is two numbers, "18," is 18, "1,000" is one.
NUMBER_TEXT = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_NUMBER = re.compile(rf"(?<![\d.]){NUMBER_TEXT}(?![\d])")
# A phrase that is a number followed by prose ("18, which is...", "3 apples."): keep the number.
_LEADING_NUMBER = re.compile(rf"^({NUMBER_TEXT})(?=[,;.!]?\s+[^\W\d_]|[,;.!]?\s*$)")
_SENTENCE_END = re.compile(r"[.;!?](?=\s|$)|\n")
# A math span's opening delimiter → its closing one (not an escaped dollar sign: `$\\$18$`).
_MATH_OPEN = {open_: re.compile(r"(?<!\\)" + re.escape(close))
              for open_, close in {"$$": "$$", "$": "$", "\\(": "\\)", "\\[": "\\]"}.items()}
_EMPHASIS = re.compile(r"^(\*\*|__|\*|_)(.+?)\1$", re.DOTALL)
_THOUSANDS = re.compile(r"(?<![\d.])(\d{1,3}(?:,\d{3})+)(?![\d])")
# GSM8K's answer line: `#### 18` alone on its line. A Markdown heading (`#### Step 1: add`) is
# told apart by what follows the marks: a number, a math span or a box, not words.
_GSM8K_LINE = re.compile(r"^[ \t]*####[ \t]*(\S[^\n]*?)[ \t]*$", re.MULTILINE)
# A fenced block tagged python (or untagged): "```python\n…```".
_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def final_part(text: str) -> str:
    """The text after the last `</think>` (the conclusion), or all of it when there is none."""
    return text.rsplit("</think>", 1)[1] if "</think>" in text else text


def code_block(text: str) -> str | None:
    """The program a completion ends with: the last fenced Python block after `</think>`, else
    the text after `</think>` itself when it parses as Python; None when there is neither."""
    tail = final_part(text)
    blocks = _FENCE.findall(tail)
    if blocks:
        return blocks[-1]
    if "</think>" in text and tail.strip():
        try:
            ast.parse(tail)
        except (SyntaxError, ValueError):
            return None
        return tail
    return None


def boxed(text: str) -> str | None:
    """Content of the last `\\boxed{…}` (balanced braces; also `\\fbox`), or None."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    name = "\\boxed" if text.startswith("\\boxed", start) else "\\fbox"
    rest = text[start + len(name):]
    i = start + len(name) + len(rest) - len(rest.lstrip())
    if i >= len(text) or text[i] != "{":
        # `\boxed 5` (brace-less, one token); a `{` further on belongs to something else.
        m = re.match(r"\s+([^\s${}]+)", rest)
        return m.group(1) if m else None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None


def _leading_math(rest: str) -> str:
    """What a final-answer phrase introduces: a math span, a box, or the sentence."""
    rest = rest.lstrip(" \t*_")
    for open_, close in _MATH_OPEN.items():
        if rest.startswith(open_):
            m = close.search(rest, len(open_))
            if m:
                return rest[len(open_):m.start()]
    if rest.startswith(("\\boxed", "\\fbox")):
        return boxed(rest) or ""
    m = _SENTENCE_END.search(rest)
    sentence = rest[:m.start()] if m else rest
    lead = _LEADING_NUMBER.match(clean(sentence))
    return lead.group(1) if lead else sentence


def extract_answer(text: str, last_number: bool = True) -> str | None:
    """The final answer of a completion (see the module docstring), or None.

    Args:
        text: The completion.
        last_number: Fall back to the last number in the text when nothing marks an answer
            (useful to evaluate base models; off for RL rewards, where it pays for a number
            that merely appears last).
    """
    part = final_part(text)
    tagged = _ANSWER.findall(part)
    if tagged:
        return tagged[-1].strip()
    box = boxed(part)
    if box is not None:
        return box.strip()
    marked = gsm8k_marker(part)
    if marked is not None:
        return marked
    phrases = list(_PHRASE.finditer(part))
    if phrases:
        answer = clean(_leading_math(part[phrases[-1].end():]))
        if answer:
            return answer
    if not last_number:
        return None
    numbers = _NUMBER.findall(part)
    return numbers[-1] if numbers else None


def gsm8k_marker(text: str) -> str | None:
    """The answer of the last `#### <answer>` line (GSM8K's convention), or None; a Markdown
    heading (`#### Step 1`, words after the marks) is no answer."""
    for m in reversed(list(_GSM8K_LINE.finditer(text))):
        value = clean(_leading_math(m.group(1)))
        if value and not re.search(r"[^\W\d_]{2,}\s+[^\W\d_]", value) \
                and not re.match(r"[^\W\d_]{3,}", value):
            return value
    return None


def clean(answer: str) -> str:
    """An answer without what never changes its value: markdown emphasis, `$` delimiters, `\\$`
    (a dollar sign, not math), degrees, percent signs, `\\text{}` units after a number, spacing
    commands, `{,}` and `,` thousands separators, a trailing full stop."""
    a = answer.strip()
    while True:
        m = _EMPHASIS.match(a)
        if not m:
            break
        a = m.group(2).strip()
    a = a.replace("**", "").replace("\\$", "").replace("$", "")
    if a.startswith("\\(") and a.endswith("\\)") or a.startswith("\\[") and a.endswith("\\]"):
        a = a[2:-2]
    a = re.sub(r"\^\s*\{?\\circ\}?|°|\\circ", "", a)
    a = re.sub(r"\\?%", "", a)
    a = re.sub(r"\\[,!;: ]|~", "", a).replace("{,}", ",")
    a = re.sub(r"(\d)\s*\\(?:text|mbox|mathrm)\{\s*[^{}]*\}", r"\1", a)  # 18 \text{ dollars}
    a = re.sub(r"\\[dt]frac", r"\\frac", a)
    a = re.sub(r"(\d)\s+(\\frac)", r"\1\2", a)  # 12 \frac{3}{5}: a mixed number
    a = _THOUSANDS.sub(lambda m: m.group(1).replace(",", ""), a)
    return a.strip().rstrip(".").strip()
