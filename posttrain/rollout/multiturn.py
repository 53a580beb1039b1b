"""Generation with tool calls, for both backends: generate, run the calls, continue.

The same loop TRL's GRPO trainer runs (its `_tool_call_loop`), so evals, rejection sampling and
DPO pairs see the tool-using policy exactly as GRPO trained it: a turn is parsed with the
tokenizer's response parser (TRL's `parse_response`); its tool calls run (`posttrain.tools`, one
session per sample, so state persists within a sample and never crosses to another); the results
are appended as the chat template renders a tool turn, followed by the opening of the next
assistant turn, and generation continues from those exact token ids. A sample ends when a turn
makes no call, its calls are spent, or its length budget (`max_new_tokens`, tool results
included, as TRL counts them) runs out.

The completion's text is the model's own turns (`posttrain.scoring.completion_text` of the parsed
messages: what GRPO's rewards read), its `tokens` the tokens the model generated, `tool_calls`
the calls it made.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from posttrain.rollout.types import Completion, Sampling

# (token-id prompts, sampling, seed) -> per prompt, `sampling.n` (new ids, finish reason)
Generate = Callable[[list[list[int]], Sampling, int], list[list[tuple[list[int], str]]]]


@dataclasses.dataclass
class _Sample:
    """One sample's conversation so far: its prompt, everything after it (model turns and tool
    results), the parsed messages, its tool session."""

    prompt: list[int]
    session: Any
    ids: list[int] = dataclasses.field(default_factory=list)
    generated: int = 0
    messages: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    last: tuple[list[int], list[int]] = ((), ())  # (prefix, new ids) of the latest turn
    finish: str = "length"
    done: bool = False

    def add_turn(self, new: list[int], finish: str) -> None:
        self.last = (self.prompt + self.ids, new)
        self.ids = self.ids + new
        self.generated += len(new)
        self.finish = finish


def generate_with_tools(tokenizer, prompts: list[list[dict[str, Any]]], sampling: Sampling,
                        generate: Generate) -> list[list[Completion]]:
    """`sampling.n` tool-using completions per chat prompt; `generate` is a backend's raw
    token-id generation."""
    from posttrain.scoring import completion_text
    from posttrain.tools import PythonTool, StepClock, ToolLimits, tool_methods
    from posttrain.tools.chat import schemas

    limits = ToolLimits(max_calls=sampling.max_tool_calls)
    clock = StepClock(limits.step_seconds)
    shown = schemas(tool_methods(PythonTool(limits, clock), sampling.tools))
    prompt_ids = [tokenizer.apply_chat_template(p, tools=shown, add_generation_prompt=True,
                                                tokenize=True, return_dict=False)
                  for p in prompts]
    groups: list[list[_Sample]] = []
    for ids, outs in zip(prompt_ids, generate(prompt_ids, sampling, sampling.seed)):
        groups.append([])
        for new, finish in outs:
            groups[-1].append(_Sample(prompt=ids, session=PythonTool(limits, clock)))
            groups[-1][-1].add_turn(new, finish)
    samples = [s for g in groups for s in g]
    for rnd in range(1, sampling.max_tool_calls + 1):
        clock.start()
        going = [s for s in samples if not s.done and _run_calls(s, tokenizer, sampling)]
        by_room: dict[int, list[_Sample]] = {}
        for s in going:
            by_room.setdefault(sampling.max_new_tokens - len(s.ids), []).append(s)
        for room, group in by_room.items():
            step = dataclasses.replace(sampling, n=1, max_new_tokens=room)
            outs = generate([s.prompt + s.ids for s in group], step, sampling.seed + 7919 * rnd)
            for s, [(new, finish)] in zip(group, outs):
                s.add_turn(new, finish)
    for s in samples:
        if not s.done:  # the last turn: parsed, its calls (if any) not run any more
            _parse_last(s, tokenizer, sampling)
    return [[Completion(completion_text(s.messages), s.generated, s.finish,
                        sum(m.get("role") == "tool" for m in s.messages), tuple(s.messages))
             for s in g] for g in groups]


def _parse_last(sample: _Sample, tokenizer, sampling: Sampling) -> dict[str, Any]:
    from posttrain.tools import tool_methods
    from posttrain.tools.chat import parse_turn
    prefix, new = sample.last
    message = parse_turn(tokenizer, new, prefix, tool_methods(sample.session, sampling.tools))
    sample.messages.append(message)
    sample.done = True
    return message


def _run_calls(sample: _Sample, tokenizer, sampling: Sampling) -> bool:
    """Parse the sample's latest turn; when it calls tools (and may), run them and append their
    results. True when the sample goes on generating."""
    from posttrain.tools.chat import result_suffix_ids

    message = _parse_last(sample, tokenizer, sampling)
    calls = message.get("tool_calls") or []
    made = sum(m.get("role") == "tool" for m in sample.messages)
    if sample.finish != "stop" or not calls or made >= sampling.max_tool_calls:
        return False
    results = []
    for call in calls:
        fn = call.get("function", call)
        name, args = fn.get("name"), fn.get("arguments") or {}
        if name in sampling.tools and isinstance(args, dict):
            try:
                out = getattr(sample.session, name)(**args)
            except TypeError as e:  # arguments the tool does not take: the model is told
                out = f"error: {e}"
        else:
            out = f"error: no tool {name!r}"
        results.append({"role": "tool", "name": name or "tool", "content": str(out)})
    sample.messages.extend(results)
    sample.ids = sample.ids + result_suffix_ids(tokenizer, results)
    if len(sample.ids) >= sampling.max_new_tokens:
        return False  # no room left to answer after the results
    sample.done = False
    return True
