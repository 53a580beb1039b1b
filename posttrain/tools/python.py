"""The `python` tool: the model runs Python in the sandbox in the middle of its reasoning.

One `PythonTool` serves one rollout (TRL's `environment_factory` gives every rollout its own
instance, and `reset` starts it afresh): each call runs in `posttrain.sandbox` with the code
reward's confinement, limits and escape defences, and what the cell printed (capped), or its
error's last line, comes back as the tool result. State persists across the calls of one rollout
— a variable set in call 1 is there in call 2 — because each call runs the rollout's earlier
cells again first, in a fresh confined process (harness `run_cell`); nothing lives on between
calls, so nothing can cross from one rollout to another.

Budgets: calls per rollout, seconds per call, seconds per step (all the rollouts' calls of one
generation, a `StepClock` they share). A budget that runs out is a tool result saying so, never
an exception or a hung step.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any

from posttrain.sandbox import Cell, shared

TOOLS = ("python",)


@dataclasses.dataclass(frozen=True)
class ToolLimits:
    """What one rollout's tool may spend.

    Attributes:
        max_calls: Tool calls per rollout; later calls are answered that the budget is spent.
        call_seconds: Wall seconds one call may run (the sandbox's timeout).
        step_seconds: Wall seconds all the calls of one generation step may take together.
        output_chars: Characters of a call's output the model gets back.
        memory_mb: Memory one call may add.
    """

    max_calls: int = 4
    call_seconds: float = 3.0
    step_seconds: float = 120.0
    output_chars: int = 500
    memory_mb: int = 256


class StepClock:
    """The step budget all rollouts of a generation share: `start()` opens a step, `left()` says
    how many seconds of it remain (thread-safe: TRL may call tools from several threads)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self._lock = threading.Lock()
        self._deadline = time.monotonic() + seconds

    def start(self) -> None:
        with self._lock:
            self._deadline = time.monotonic() + self.seconds

    def left(self) -> float:
        with self._lock:
            return self._deadline - time.monotonic()


@dataclasses.dataclass
class ToolStats:
    """What a rollout's tool did: calls, errors (the cell raised), timeouts, refused calls."""

    calls: int = 0
    errors: int = 0
    timeouts: int = 0
    refused: int = 0
    seconds: float = 0.0


class PythonTool:
    """One rollout's Python interpreter, exposed to the model as the tool `python`."""

    def __init__(self, limits: ToolLimits | None = None, clock: StepClock | None = None):
        self.limits = limits or ToolLimits()
        self.clock = clock or StepClock(self.limits.step_seconds)
        self.history: list[str] = []
        self.stats = ToolStats()

    def reset(self, **row: Any) -> None:
        """A new rollout: no earlier cells, no calls made (TRL passes the dataset row)."""
        self.history, self.stats = [], ToolStats()

    def python(self, code: str) -> str:
        """Run Python code and return what it prints.

        Args:
            code: Python source to run. Variables persist between calls; print what you need.
        """
        stats, limits = self.stats, self.limits
        if stats.calls >= limits.max_calls:
            stats.refused += 1
            return f"Tool budget spent: at most {limits.max_calls} python calls per answer."
        left = self.clock.left()
        if left <= 0.05:
            stats.refused += 1
            return "Tool budget spent: no time left for python in this step."
        stats.calls += 1
        [result] = shared().run_cells([Cell(str(code), tuple(self.history))],
                                      timeout=min(limits.call_seconds, left),
                                      memory_mb=limits.memory_mb,
                                      output_chars=limits.output_chars)
        stats.seconds += result.seconds
        if result.status in ("ok", "error"):
            self.history.append(str(code))
        if result.status == "ok":
            return result.output if result.output.strip() else "(no output)"
        if result.status == "error":
            stats.errors += 1
            return (result.output + result.error).strip()
        if result.status in ("timeout", "skipped"):
            stats.timeouts += 1
            return f"Timed out after {min(limits.call_seconds, left):.0f} s."
        stats.errors += 1
        return "The program stopped without a result (it exited or was killed)."
