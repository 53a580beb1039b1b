"""What every rollout backend takes and returns."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sampling:
    """Sampling settings shared by all backends.

    Attributes:
        n: Samples per prompt.
        temperature: 0 means greedy.
        top_p: Nucleus sampling mass.
        max_new_tokens: Generation cap per sample (tool results included, as TRL counts them).
        seed: Makes a backend's output reproducible.
        tools: Tools the model may call mid-generation (names in `posttrain.tools.TOOLS`).
        max_tool_calls: Tool calls per sample.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    seed: int = 0
    tools: tuple[str, ...] = ()
    max_tool_calls: int = 4


@dataclass(frozen=True)
class Completion:
    """One sample: text (special tokens removed, tags kept; with tools, the model's own turns
    only), the tokens the model generated, why it stopped, and the tool calls it made."""

    text: str
    tokens: int
    finish_reason: str  # "stop" (EOS) or "length" (hit max_new_tokens)
    tool_calls: int = 0
    messages: tuple = ()  # with tools: the completion's turns (assistant turns, tool results)
