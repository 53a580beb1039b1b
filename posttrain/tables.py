"""Tables for people: Markdown with padded columns (GitHub renders them, a terminal reads them
as they are), and the one eval table every command prints (`posttrain eval`, a stage's eval,
`make demo`, the run report)."""

from __future__ import annotations

from typing import Any

EVAL_COLUMNS = ("stage", "suite/task", "pass@1", "±se", "unscored", "pass@k", "maj@k", "format",
                "tokens")


def markdown_table(header: list[str] | tuple[str, ...], rows: list[list[str]]) -> str:
    """A Markdown table padded to column width (text left, figures right)."""
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(header)]
    numeric = [bool(rows) and all(_is_number(r[i]) for r in rows) for i in range(len(header))]

    def line(cells):
        return "| " + " | ".join(str(c).rjust(w) if num else str(c).ljust(w)
                                 for c, w, num in zip(cells, widths, numeric)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2))
                          for w, num in zip(widths, numeric)) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def _is_number(text: str) -> bool:
    try:
        float(str(text).rstrip("%s"))
        return True
    except ValueError:
        return str(text) == "–"


def _k_value(m: dict[str, Any], prefix: str) -> float | None:
    return next((v for k, v in m.items() if k.startswith(prefix) and k != "pass@1"
                 and k[len(prefix):].isdigit()), None)


def fmt(v: Any, digits: int = 3) -> str:
    """A figure as a table shows it: floats to `digits` places, none as a dash."""
    if isinstance(v, bool) or v is None:
        return "–" if v is None else str(v)
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def eval_rows(stages: dict[str, dict[str, Any]], tools: bool = False) -> list[list[str]]:
    """One row per (stage, suite, task) with the main figures, in the run's stage order
    (`stages`: manifest entries, or anything with an `eval: {suite: {task: figures}}`)."""
    rows = []
    for name, entry in stages.items():
        for suite, tasks in (entry.get("eval") or {}).items():
            for task, m in tasks.items():
                row = [name, f"{suite}/{task}", fmt(m.get("pass@1")), fmt(m.get("pass@1_se")),
                       fmt(m.get("unscorable", 0)), fmt(_k_value(m, "pass@")),
                       fmt(_k_value(m, "maj@")), fmt(m.get("format_rate")),
                       fmt(m.get("mean_tokens"), 1)]
                rows.append(row + ([fmt(m.get("tool_calls"), 2)] if tools else []))
    return rows


def eval_table(stages: dict[str, dict[str, Any]]) -> str:
    """The per-stage eval table; a `tool calls` column (per sample) when a suite used tools."""
    figures = [m for e in stages.values() for tasks in (e.get("eval") or {}).values()
               for m in tasks.values()]
    tools = any("tool_calls" in m for m in figures)
    rows = eval_rows(stages, tools)
    k = next((key.split("@")[1] for m in figures for key in m if key.startswith("maj@")), "k")
    header = [c.replace("@k", f"@{k}") for c in EVAL_COLUMNS] + (["tool calls"] if tools else [])
    return markdown_table(header, rows) if rows else "(no eval figures yet)"
