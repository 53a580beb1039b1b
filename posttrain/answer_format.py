"""The answer format a recipe trains, rewards and judges: one concept, three values.

- `tags`: the tiny world's `<think>…</think><answer>…</answer>`, asked for by a system prompt.
- `boxed`: DeepSeek-R1's: `<think>…</think>`, then a summary with the final answer in
  `\\boxed{}`. Prompted as R1 is: no system prompt, the instruction in the user turn. R1-distilled
  templates open `<think>` in the generation prompt, so the completion may start inside the
  reasoning: the leading `<think>` is optional in every format.
- `code`: as `boxed`, with the final answer a fenced ```python block (code tasks, the `code`
  reward and code eval suites).

The format decides the prompt (system turn, instruction), what the `format` and `tag_count`
rewards check, which samples the rejection filter and DPO pairing call well formed, the eval's
format rate, and how synthetic task rows are written as SFT targets.
"""

from __future__ import annotations

import re

from posttrain.errors import UserError
from posttrain.extraction import boxed, code_block

ANSWER_FORMATS = ("tags", "boxed", "code")
TAGS_SYSTEM_PROMPT = (
    "Think step by step inside <think> </think>, then give the final answer inside "
    "<answer> </answer>."
)
# R1's evaluation prompt for math (DeepSeek-R1 paper, and the DeepSeek-R1-Distill model cards).
BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CODE_INSTRUCTION = ("Please reason step by step, then give your complete solution as Python code "
                    "in a ```python code block.")

# A body holds no think/answer tag (a stray `</think>` or nested `<answer>` is not the format).
_BODY = r"((?:(?!</?(?:think|answer)>).)+)"
_TAGS = re.compile(rf"^\s*(?:<think>)?{_BODY}</think>\s*<answer>{_BODY}</answer>\s*$", re.DOTALL)
_BOXED = re.compile(rf"^\s*(?:<think>)?{_BODY}</think>{_BODY}$", re.DOTALL)


def check(answer_format: str, where: str = "answer_format") -> str:
    """`answer_format` if it is one of ANSWER_FORMATS; UserError otherwise."""
    if answer_format not in ANSWER_FORMATS:
        raise UserError(f"{where} must be one of {', '.join(ANSWER_FORMATS)}, got "
                        f"{answer_format!r}")
    return answer_format


def default_system_prompt(answer_format: str) -> str | None:
    """The system turn a format asks for by default (R1 prompts with none)."""
    return TAGS_SYSTEM_PROMPT if answer_format == "tags" else None


def user_turn(question: str, answer_format: str) -> str:
    """The question as the user turn: R1's instruction follows it in the `boxed` format."""
    if answer_format == "boxed" and "\\boxed" not in question:
        return f"{question}\n{BOXED_INSTRUCTION}"
    if answer_format == "code" and "```" not in question:
        return f"{question}\n{CODE_INSTRUCTION}"
    return question


def completion(trace: str, answer: str, answer_format: str = "tags") -> str:
    """The assistant turn a worked trace and its answer make in this format (SFT targets)."""
    if answer_format == "boxed":
        return f"<think>\n{trace}\n</think>\n\nThe answer is $\\boxed{{{answer}}}$."
    if answer_format == "code":
        return f"<think>\n{trace}\n</think>\n\n```python\n{answer.strip()}\n```"
    return f"<think>{trace}</think><answer>{answer}</answer>"


def tool_turns(trace: str, answer: str, calls: list[dict], answer_format: str = "tags"
               ) -> list[dict]:
    """The turns of a worked trace that hands its computation to tools (`calls`: name, code,
    result): the reasoning up to the calls, the tool results, then the rest of the reasoning
    (` = <result>`) and the answer in this format. SFT targets of a tool-using cold start; read
    as one completion they are `<think>347*58 = 20126</think><answer>20126</answer>`
    (`posttrain.scoring.completion_text`)."""
    results = "".join(c["result"] for c in calls).strip()
    if answer_format == "tags":
        before, after = f"<think>{trace}", f" = {results}</think><answer>{answer}</answer>"
    elif answer_format == "boxed":
        before = f"<think>\n{trace}"
        after = f" = {results}\n</think>\n\nThe answer is $\\boxed{{{answer}}}$."
    else:
        raise UserError(f"answer_format {answer_format}: no tool-calling traces for it")
    calls_made = [{"type": "function", "function": {"name": c["name"],
                                                    "arguments": {"code": c["code"]}}}
                  for c in calls]
    return [{"role": "assistant", "content": before, "tool_calls": calls_made},
            *({"role": "tool", "name": c["name"], "content": c["result"]} for c in calls),
            {"role": "assistant", "content": after}]


def is_well_formed(text: str, answer_format: str = "tags") -> bool:
    """`tags`: `<think>…</think>` then one `<answer>…</answer>` and nothing after it. `boxed`:
    `<think>…</think>`, then a conclusion with a non-empty `\\boxed{}`. `code`: the same with a
    Python code block for the `\\boxed{}`. The reasoning must say something; the leading
    `<think>` may be in the prompt."""
    if answer_format == "code":
        m = _BOXED.match(text)
        return bool(m and m.group(1).strip() and (code_block(text) or "").strip())
    if answer_format == "boxed":
        m = _BOXED.match(text)
        if not (m and m.group(1).strip()):
            return False
        answer = boxed(m.group(2))
        return bool(answer and answer.strip())
    m = _TAGS.match(text)
    return bool(m and m.group(1).strip() and m.group(2).strip())


def tag_score(text: str, answer_format: str = "tags") -> float:
    """Partial format credit, 0.25 per check (R1-Zero starts near a 0 format rate, where the
    all-or-nothing reward carries no signal).

    `tags`: `<think>` (or a template-opened one), `</think>`, `<answer>`, `</answer>` each exactly
    once. `boxed`: the think block opened once, closed once, a `\\boxed{}` after it, and exactly
    one `\\boxed` there. `code`: the same with one fenced code block for the `\\boxed{}`.
    """
    n_open, n_close = text.count("<think>"), text.count("</think>")
    # No `<think>` is fine when the template opened it: then exactly one `</think>` is expected.
    think_open = n_open == 1 or (n_open == 0 and n_close == 1)
    after = text.rsplit("</think>", 1)[1] if n_close else ""
    if answer_format == "boxed":
        checks = (think_open, n_close == 1, boxed(after) is not None, after.count("\\boxed") == 1)
    elif answer_format == "code":
        checks = (think_open, n_close == 1, code_block(text) is not None, after.count("```") == 2)
    else:
        checks = (think_open, n_close == 1, text.count("<answer>") == 1,
                  text.count("</answer>") == 1)
    return 0.25 * sum(checks)
