"""Tool calls in a model's own chat format: whether its template can express them, the tool
schema it is shown, how a turn is parsed back into calls, and the tokens a tool result adds.

Each family writes tool calls its own way (Qwen2.5 `<tool_call>{json}</tool_call>`, Llama-3.2 a
bare JSON object, the tiny world `<tool_call>python\\ncode</tool_call>`). transformers renders
them through the chat template and parses them back with the tokenizer's `response_template`;
TRL knows the templates of the well-known families (`add_response_schema`) and the tiny world's
tokenizer carries its own. The rollout loop (posttrain.rollout.tools) and TRL's GRPO loop use
the same parser (TRL's `parse_response`), so a tool call is the same thing in training, sampling
and evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from posttrain.errors import UserError


def check_tool_template(tokenizer, where: str) -> None:
    """One-line UserError unless the tokenizer's chat template can render a tool-calling
    conversation and a parser for its tool calls is known; sets TRL's parser where TRL has one
    for the template and the tokenizer has none."""
    from trl.chat_template_utils import add_response_schema, supports_tool_calling

    if not supports_tool_calling(tokenizer):
        raise UserError(f"{where}: the chat template of this model cannot express tool calls (it "
                        f"drops a tool call or a tool result when rendering one); use a model "
                        f"whose template has tool turns, or drop `tools:`")
    if getattr(tokenizer, "response_template", None) is None \
            and getattr(tokenizer, "response_schema", None) is None:
        try:
            add_response_schema(tokenizer)
        except ValueError:
            raise UserError(f"{where}: no parser is known for this model's tool-call format (set "
                            f"`tokenizer.response_template`, see transformers' response "
                            f"parsing), or drop `tools:`") from None


def schemas(tools: list[Callable]) -> list[dict[str, Any]]:
    """The JSON schemas the chat template shows the model (from signatures and docstrings)."""
    from transformers.utils import get_json_schema
    return [get_json_schema(t) for t in tools]


def parse_turn(tokenizer, ids: list[int], prefix: list[int], tools: list[Callable]) -> dict:
    """One generated assistant turn as a message (`content`, `tool_calls`), as TRL parses it."""
    from trl.chat_template_utils import parse_response
    return parse_response(tokenizer, ids, prefix=prefix, tools=tools)


def result_suffix_ids(tokenizer, tool_messages: list[dict[str, Any]]) -> list[int]:
    """The tokens that follow an assistant turn that called tools: the tool results, rendered by
    the template, then the next assistant turn's opening (TRL's construction: render a dummy
    conversation with and without the tool messages, keep the difference)."""
    name = tool_messages[0].get("name", "tool")
    dummy = [{"role": "user", "content": "dummy"},
             {"role": "assistant", "content": "",
              "tool_calls": [{"type": "function", "function": {"name": name, "arguments": {}}}]}]
    prefix = tokenizer.apply_chat_template(dummy, tokenize=True, return_dict=False)
    full = tokenizer.apply_chat_template(dummy + tool_messages, add_generation_prompt=True,
                                         tokenize=True, return_dict=False)
    eos = [i for i, t in enumerate(prefix) if t == tokenizer.eos_token_id]
    if eos:
        prefix = prefix[:eos[-1] + 1]
    if full[:len(prefix)] != prefix:
        raise UserError("the chat template renders earlier turns differently once a tool result "
                        "follows; tool calls need a prefix-preserving template")
    return full[len(prefix):]
