"""Tools a model calls mid-generation: `python`, backed by the sandbox (posttrain.tools.python),
and how tool calls are written in each model's chat format (posttrain.tools.chat).

Recipes and eval suites name tools with `tools: [python]`; GRPO hands them to TRL's tool loop
(`environment_factory`: one tool instance per rollout), every other generation runs the same loop
in `posttrain.rollout.multiturn`.
"""

from __future__ import annotations

from posttrain.errors import UserError
from posttrain.tools.python import PythonTool, StepClock, ToolLimits, ToolStats

TOOLS = ("python",)

__all__ = ["TOOLS", "PythonTool", "StepClock", "ToolLimits", "ToolStats", "check_tools",
           "tool_methods"]


def check_tools(names: list[str] | tuple[str, ...], where: str = "tools") -> None:
    """UserError unless every name is a known tool (and named once)."""
    unknown = [n for n in names if n not in TOOLS]
    if unknown:
        raise UserError(f"{where}: unknown tool {unknown[0]!r}; tools: {', '.join(TOOLS)}")
    if len(set(names)) != len(names):
        raise UserError(f"{where}: a tool is named twice")


def tool_methods(session: PythonTool, names: list[str] | tuple[str, ...]) -> list:
    """The bound methods of a rollout's tool session the model may call, by name."""
    return [getattr(session, name) for name in names]
