"""Rule-based rewards for GRPO: pure functions with TRL's reward signature.

Each reward is `fn(completions, **columns) -> list[float | None]`: `completions` are strings or
chat-message lists, dataset columns (`answer`, `solution`, `task`, `meta`, ...) and TRL's extras
(`prompts`, `completion_ids`, ...) arrive as keyword lists aligned with them, and `None` means
"skip this sample" (e.g. its gold answer cannot be parsed). No neural reward model.

Rewards (keys of `REWARDS`; tunable parameters in brackets, with defaults):
    accuracy              1/0: final answer right (task checker, else math-verify on answer/solution)
                          [last_number=False: also take a bare last number as the answer]
    format                1/0: `<think>…</think><answer>…</answer>` (template-opened `<think>` ok)
    tag_count             0.25 per think/answer tag present exactly once
    reasoning_steps       share of explicit steps in the reasoning [min_steps=3, separator=None]
    step_accuracy         share of the reasoning's steps that are right (synthetic tasks' step
                          checkers: partial credit where every sample misses the answer)
    length                Kimi-1.5: shorter within the group is better, never pays when wrong
    cosine                correctness scaled by length on a cosine [max_len=1000,
                          min_value_correct=0.5, max_value_correct=1.0, min_value_wrong=-1.0,
                          max_value_wrong=-0.5]
    soft_overlong         DAPO: 0, then a ramp to -1 over the last `cache` tokens [max_len=1024,
                          cache=256]
    repetition            n-gram repetition penalty [ngram_size=3, max_penalty=-1.0, unit="word"]
    language_consistency  R1: share of target-language words in the reasoning [language="en"]
    code                  share of the row's `tests` (asserts, after its `test_imports`) the final
                          Python block passes in the local sandbox; None without tests
                          [all_or_nothing=False, timeout=5.0, memory_mb=512, budget_s=60.0]

`length` and `cosine` read the same columns as `accuracy`. Lengths are in tokens during GRPO (from
TRL's `completion_ids`), in characters on direct calls: set `max_len` to the trainer's
`max_completion_length` for `soft_overlong`.

Recipe syntax (GRPO stage): weights by name, optional parameters per reward:

    rewards: {accuracy: 1.0, format: 0.1, soft_overlong: 1.0}
    reward_kwargs: {soft_overlong: {max_len: 128, cache: 32}}

`build_reward_funcs(weights, kwargs)` turns those two fields into the `reward_funcs` and
`reward_weights` TRL's GRPOTrainer takes. `REWARDS` is the one explicit list: a new reward is a
function in a themed module and a line here (no registry, no plugins).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from posttrain.errors import UserError
from posttrain.rewards.code import code
from posttrain.rewards.correctness import accuracy, step_accuracy
from posttrain.rewards.format import format_reward, reasoning_steps, tag_count
from posttrain.rewards.language import language_consistency
from posttrain.rewards.length import cosine, length, soft_overlong
from posttrain.rewards.repetition import repetition

RewardFunc = Callable[..., list[float | None]]

REWARDS: dict[str, RewardFunc] = {
    "accuracy": accuracy,
    "format": format_reward,
    "tag_count": tag_count,
    "reasoning_steps": reasoning_steps,
    "step_accuracy": step_accuracy,
    "length": length,
    "cosine": cosine,
    "soft_overlong": soft_overlong,
    "repetition": repetition,
    "language_consistency": language_consistency,
    "code": code,
}

__all__ = ["REWARDS", "RewardFunc", "build_reward_funcs", "reward_params"]

# Keyword arguments TRL fills in on every call: never recipe parameters.
_TRL_ARGS = {"prompts", "completion_ids", "trainer_state", "log_extra", "log_metric",
             "environments"}


def reward_params(name: str) -> dict[str, Any]:
    """Tunable parameters of reward `name` with their defaults (its keyword-only arguments)."""
    sig = inspect.signature(REWARDS[name])
    return {p.name: p.default for p in sig.parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in _TRL_ARGS}


class _Reward:
    """A reward bound to its recipe parameters, named as the recipe names it (TRL logs
    `rewards/<name>/mean`). During GRPO it also logs the share of samples it could not score
    (None: unscorable gold) as `rewards/<name>/unscorable_frac`, through TRL's `log_metric` hook,
    and, when the rollouts called tools, its mean over the rollouts with a call and without
    (`rewards/<name>/with_tool`, `without_tool`); the first reward of a recipe also logs what the
    tools did (`tools/...`, see `tool_metrics`). A module-level class, so it pickles (TRL's vLLM
    and multiprocess paths need that)."""

    def __init__(self, func: RewardFunc, name: str, params: Mapping[str, Any],
                 logs_tools: bool = False):
        self.func, self.__name__, self.params = func, name, dict(params)
        self.logs_tools = logs_tools

    def __call__(self, completions: Any, **columns: Any) -> list[float | None]:
        out = self.func(completions, **self.params, **columns)
        log_metric = columns.get("log_metric")
        if callable(log_metric) and out:
            log_metric(f"rewards/{self.__name__}/unscorable_frac",
                       sum(r is None for r in out) / len(out))
            stats = [getattr(e, "stats", None) for e in columns.get("environments") or []]
            if len(stats) == len(out) and all(st is not None for st in stats):
                used = [st.calls > 0 for st in stats]
                for key, flag in (("with_tool", True), ("without_tool", False)):
                    scores = [r for r, u in zip(out, used) if u == flag and r is not None]
                    if scores:
                        log_metric(f"rewards/{self.__name__}/{key}", sum(scores) / len(scores))
                if self.logs_tools:
                    for key, value in tool_metrics(stats).items():
                        log_metric(key, value)
        return out


def tool_metrics(stats: list[Any]) -> dict[str, float]:
    """What a step's rollouts did with their tools (`posttrain.tools.ToolStats` each): calls per
    rollout, the share that called one, errors, timeouts and refused calls (budget spent) per
    rollout, and the sandbox seconds the step's calls took in all."""
    n = len(stats)
    return {"tools/calls_per_rollout": sum(s.calls for s in stats) / n,
            "tools/rollouts_with_call": sum(s.calls > 0 for s in stats) / n,
            "tools/errors_per_rollout": sum(s.errors for s in stats) / n,
            "tools/timeouts_per_rollout": sum(s.timeouts for s in stats) / n,
            "tools/refused_per_rollout": sum(s.refused for s in stats) / n,
            "tools/sandbox_s": sum(s.seconds for s in stats)}


def _known() -> str:
    return ", ".join(REWARDS)


def build_reward_funcs(weights: Mapping[str, float],
                       kwargs: Mapping[str, Mapping[str, Any]] | None = None
                       ) -> tuple[list[RewardFunc], list[float]]:
    """Reward functions and weights for GRPOTrainer from a recipe's `rewards` / `reward_kwargs`.

    Parameters are bound in a `_Reward` (named as the recipe names it, picklable, logging its
    unscorable share); each bound reward is called once on an empty batch so a bad parameter
    fails here, before any model is loaded.

    Args:
        weights: Reward name → weight, in the order TRL should see them.
        kwargs: Reward name → parameters overriding that reward's defaults.

    Returns:
        (reward functions, weights), aligned.

    Raises:
        UserError: unknown reward or parameter, non-numeric weight, bad parameter value.
    """
    if not isinstance(weights, Mapping) or not weights:
        raise UserError(f"rewards: need a mapping of reward name to weight, e.g. "
                        f"{{accuracy: 1.0, format: 0.1}}; got {weights!r}. Known rewards: {_known()}")
    kwargs = {} if kwargs is None else kwargs
    if not isinstance(kwargs, Mapping):
        raise UserError(f"reward_kwargs: need a mapping of reward name to parameters, got {kwargs!r}")
    for name in list(weights) + list(kwargs):
        if name not in REWARDS:
            raise UserError(f"unknown reward {name!r}; known rewards: {_known()}")
    stray = [name for name in kwargs if name not in weights]
    if stray:
        raise UserError(f"reward_kwargs given for {', '.join(map(repr, stray))}, which is not in "
                        f"rewards: add it there with a weight, or drop its parameters")
    funcs: list[RewardFunc] = []
    out_weights: list[float] = []
    for name, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise UserError(f"rewards: weight of {name!r} must be a number, got {weight!r}")
        params = kwargs.get(name) or {}
        if not isinstance(params, Mapping):
            raise UserError(f"reward_kwargs.{name}: need a mapping of parameters, got {params!r}")
        allowed = reward_params(name)
        unknown = [k for k in params if k not in allowed]
        if unknown:
            raise UserError(f"reward {name!r} has no parameter {unknown[0]!r}; its parameters: "
                            f"{', '.join(allowed) or '(none)'}")
        func = _Reward(REWARDS[name], name, params, logs_tools=not funcs)
        func([])  # validates the parameters now (UserError) rather than at the first step
        funcs.append(func)
        out_weights.append(float(weight))
    return funcs, out_weights
