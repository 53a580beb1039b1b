"""Chat templates posttrain brings for tokenizers that lack one: R1-Zero's prompt for base
checkpoints.

DeepSeek-R1-Zero trained a base model with no chat template: the question goes into a fixed
prompt that asks for the reasoning in `<think>` tags, and generation starts inside the think
block. A base checkpoint (no `chat_template` in its tokenizer) is prompted this way by default,
in the recipe's answer format (`tags`: the paper's wording with `<answer>` tags; `boxed`: the
answer in `\\boxed{}`; `code`: in a Python block). A recipe picks one by name with
`chat_template: r1_zero` or gives its own Jinja template.

The templates render a conversation so that the generation prompt is a prefix of the rendered
conversation (TRL splits prompt from completion by that prefix); system turns are dropped (the
fixed prompt states the format); an assistant turn that starts with `<think>` (posttrain's SFT
targets) does not repeat the one the prompt opened.
"""

from __future__ import annotations

_R1_ZERO_INTRO = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer. ")
# What the intro says about the answer, per answer format (posttrain.answer_format).
_R1_ZERO_FORMAT = {
    "tags": "The reasoning process and answer are enclosed within <think> </think> and <answer> "
            "</answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> "
            "answer here </answer>.",
    "boxed": "The reasoning process is enclosed within <think> </think> tags and the final answer "
             "is put within \\\\boxed{}, i.e., <think> reasoning process here </think> The answer "
             "is \\\\boxed{answer here}.",
    "code": "The reasoning process is enclosed within <think> </think> tags and the answer is a "
            "Python program in a ```python code block, i.e., <think> reasoning process here "
            "</think> ```python\\ncode here\\n```.",
}


def r1_zero(answer_format: str = "tags") -> str:
    """R1-Zero's prompt as a Jinja chat template, in `answer_format`."""
    intro = _R1_ZERO_INTRO + _R1_ZERO_FORMAT[answer_format]
    return (
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}"
        "{{- '" + intro.replace("'", "\\'") + " User: ' + message['content'] + '. Assistant:' -}}"
        "{%- elif message['role'] == 'assistant' -%}"
        "{%- set reply = message['content'] -%}"
        "{%- if reply.startswith('<think>') -%}{%- set reply = reply[7:] -%}{%- endif -%}"
        "{{- ' <think>' + reply + eos_token -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- ' <think>' -}}{%- endif -%}"
    )


NAMED = {"r1_zero": r1_zero}


def named_or_jinja(template: str, answer_format: str) -> str:
    """A recipe's `chat_template` value as Jinja: a name from `NAMED`, or the template itself."""
    return NAMED[template](answer_format) if template in NAMED else template
