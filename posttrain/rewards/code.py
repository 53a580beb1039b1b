"""Code: run the completion's program against the row's tests in the local sandbox (R1's reward
for code). The sandbox (`posttrain.sandbox`) isolates each execution; this module only turns
completions and dataset columns into jobs and verdicts into rewards.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from posttrain.extraction import code_block
from posttrain.rewards.columns import check_param, column, texts
from posttrain.sandbox import Job, shared

__all__ = ["code", "code_jobs"]


def _lines(value: Any) -> list[str] | None:
    """A tests / test_imports cell as a list of strings (a lone string is one line)."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def code_jobs(completions: Sequence[Any], columns: dict[str, Any]) -> list[Job | None]:
    """One sandbox job per completion; None where the row has no tests (not scorable). A
    completion with no program becomes a job with an empty program (its tests fail)."""
    jobs: list[Job | None] = []
    for i, text in enumerate(texts(completions)):
        tests = _lines(column(columns, "tests", i))
        if not tests:
            jobs.append(None)
            continue
        jobs.append(Job(program=code_block(text) or "", tests=tests,
                        imports=_lines(column(columns, "test_imports", i)) or []))
    return jobs


def code(completions: Sequence[Any], *, all_or_nothing: bool = False, timeout: float = 5.0,
         memory_mb: int = 512, budget_s: float = 60.0, **columns: Any) -> list[float | None]:
    """Share of the row's `tests` (assert statements, run after its `test_imports` lines) that the
    completion's final Python block passes in the sandbox; 1/0 with `all_or_nothing: true`; None
    for a row without tests. A program that exits, crashes or times out scores 0.

    `timeout` bounds one execution (seconds); `budget_s` the whole call, so a step never waits
    longer: executions whose turn comes after it are scored 0.
    """
    check_param("code", "timeout", timeout, isinstance(timeout, (int, float)) and timeout > 0,
                "a positive number of seconds")
    check_param("code", "budget_s", budget_s, isinstance(budget_s, (int, float)) and budget_s > 0,
                "a positive number of seconds")
    check_param("code", "memory_mb", memory_mb, isinstance(memory_mb, int) and memory_mb >= 64,
                "an integer of at least 64")
    jobs = code_jobs(completions, columns)
    runnable = [j for j in jobs if j is not None]
    if not runnable:
        return [None] * len(jobs)
    verdicts = iter(shared(timeout=timeout, memory_mb=memory_mb).run(runnable, budget_s=budget_s))
    out: list[float | None] = []
    for job in jobs:
        if job is None:
            out.append(None)
            continue
        v = next(verdicts)
        out.append(float(v.passed == v.total) if all_or_nothing else v.fraction)
    return out
