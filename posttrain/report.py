"""The run report: `runs/<run>/report.md` plus PNGs under `runs/<run>/plots/`.

Built from the manifest and the stages' `logs.jsonl` only, so `make report` reruns in seconds with
no model loaded, and a partial or crashed run still reports what it has (a section whose stages
are missing is left out). Tables are Markdown with padded columns: GitHub renders them, and they
read as plain text in a terminal; images are linked relative to the report.

Run: `posttrain report --run demo` (or `make report`).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from posttrain import atomic
from posttrain.errors import UserError
from posttrain.manifest import Manifest
from posttrain.plots import (
    plot_bars,
    plot_dpo_curves,
    plot_panels,
    plot_reward_curve,
    read_log,
    series,
)
from posttrain.tables import eval_table, fmt, markdown_table


def _duration(entry: dict[str, Any]) -> str:
    try:
        t0 = dt.datetime.fromisoformat(entry["started"])
        t1 = dt.datetime.fromisoformat(entry["ended"])
    except (KeyError, TypeError, ValueError):
        return "–"
    return f"{(t1 - t0).total_seconds():.0f}s"


def _source(entry: dict[str, Any]) -> str:
    """Where a stage's model came from: its init, and for distillation the teacher too."""
    plan = entry.get("plan") or {}
    refs, recipe = plan.get("refs") or {}, plan.get("recipe") or {}
    parts = [str((refs.get("init") or {}).get("from") or recipe.get("student") or "–")]
    if refs.get("teacher"):
        parts.append(f"teacher {refs['teacher']['from']}")
    return ", ".join(parts)


def stages_table(stages: dict[str, dict[str, Any]]) -> str:
    rows = []
    for name, e in stages.items():
        metrics = e.get("metrics") or {}
        loss = metrics.get("train_loss")
        rows.append([name, e.get("kind", ""), e.get("status", ""), _source(e),
                     _duration(e), fmt(loss) if isinstance(loss, float) else "–"])
    return markdown_table(["stage", "kind", "status", "from", "time", "train loss"], rows)


def _by_task(entry: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """`suite/task` → figures of one stage."""
    return {f"{s}/{t}": m for s, tasks in (entry.get("eval") or {}).items() for t, m in tasks.items()}


def _delta(a: Any, b: Any, digits: int = 3) -> str:
    return f"{b - a:+.{digits}f}" if isinstance(a, (int, float)) and isinstance(b, (int, float)) \
        else "–"


def dpo_table(init: dict[str, Any], dpo: dict[str, Any], name: str) -> str:
    """DPO against its init per suite/task: pass@1 should hold, format and length improve."""
    rows = []
    for t in sorted(set(_by_task(init)) & set(_by_task(dpo))):
        a, b = _by_task(init)[t], _by_task(dpo)[t]
        row = [t]
        for key, digits in (("pass@1", 3), ("format_rate", 3), ("mean_tokens", 1)):
            row += [fmt(a.get(key), digits), fmt(b.get(key), digits),
                    _delta(a.get(key), b.get(key), digits)]
        rows.append(row)
    header = ["suite/task"] + [f"{k} {s}" for k in ("pass@1", "format", "tokens")
                               for s in ("init", name, "Δ")]
    return markdown_table(header, rows)


def wide_table(stages: dict[str, dict[str, Any]], names: list[str], labels: dict[str, str],
               key: str = "pass@1") -> str:
    """One row per suite/task, one column of `key` per named stage."""
    names = [n for n in names if n in stages and _by_task(stages[n])]
    tasks = sorted({t for n in names for t in _by_task(stages[n])})
    rows = [[t, *(fmt(_by_task(stages[n]).get(t, {}).get(key)) for n in names)] for t in tasks]
    return markdown_table(["suite/task", *(labels.get(n, n) for n in names)], rows)


def _pass1_plot(stages: dict[str, dict[str, Any]], names: list[str], out: Path, title: str
                ) -> Path | None:
    names = [n for n in names if n in stages and _by_task(stages[n])]
    tasks = sorted({t for n in names for t in _by_task(stages[n])})
    bars = {n: [float(_by_task(stages[n]).get(t, {}).get("pass@1", 0.0)) for t in tasks]
            for n in names}
    return plot_bars(tasks, bars, out, title=title, ylabel="pass@1")


def _image(lines: list[str], path: Path | None, alt: str, run_dir: Path) -> None:
    if path is not None:
        lines += [f"![{alt}]({path.relative_to(run_dir).as_posix()})", ""]


def _init_stage(entry: dict[str, Any]) -> str | None:
    return (((entry.get("plan") or {}).get("refs") or {}).get("init") or {}).get("stage")


def distill_names(stages: dict[str, dict[str, Any]]) -> tuple[list[str], list[str], str | None]:
    """(distilled students, RL-only students, teacher) of the R1 comparison, as far as present.

    An RL-only student is a grpo stage named `student_rl*`, or one that starts from the same
    stage as a distilled student (the shared-init arms of a compute-matched comparison)."""
    students = [n for n, e in stages.items() if e.get("kind") == "distill"]
    inits = {_init_stage(stages[n]) for n in students} - {None}
    rl = [n for n, e in stages.items() if e.get("kind") == "grpo"
          and (n.startswith("student_rl") or _init_stage(e) in inits)]
    teacher = None
    for n in students:
        ref = ((stages[n].get("plan") or {}).get("refs") or {}).get("teacher") or {}
        if ref.get("stage") in stages:
            teacher = ref["stage"]
    return students, rl, teacher


BUDGET_COLUMNS = ("stage", "method", "init", "steps", "completions", "teacher passes",
                  "student tokens", "teacher tokens", "wall s")


def budget_table(stages: dict[str, dict[str, Any]], names: list[str]) -> str:
    """What each arm of the comparison spent (its manifest `budget`), one row per stage."""
    rows = []
    for n in names:
        metrics = stages[n].get("metrics") or {}
        b = metrics.get("budget")
        if not b:
            continue
        method = metrics.get("method") or ("rl_only" if stages[n].get("kind") == "grpo" else "–")
        rows.append([n, method, _init_stage(stages[n]) or "scratch", str(b["optimizer_steps"]),
                     str(b["completions"]), str(b["teacher_forward_passes"]),
                     str(b["student_generated_tokens"]), str(b["teacher_generated_tokens"]),
                     f"{b['wall_s']:.0f}"])
    return markdown_table(BUDGET_COLUMNS, rows) if rows else ""


def write_report(run: str, root: Path | None = None) -> Path:
    """Write runs/<run>/report.md and its plots; returns the report path."""
    m = Manifest(run, root)
    if not m.path.exists():
        raise UserError(f"run {run!r} has no manifest at {m.path}; run a stage first")
    stages, run_dir = m.stages, m.run_dir
    plots = run_dir / "plots"
    logs = {n: read_log(m.stage_dir(n) / "logs.jsonl") for n in stages}
    lines = [f"# Run `{run}`", "",
             f"{len(stages)} stage(s), {sum(e.get('status') == 'done' for e in stages.values())} "
             f"done. Generated from `manifest.json` and the stages' `logs.jsonl`.", "",
             "## Stages", "", stages_table(stages), ""]
    failed = {n: e.get("error") for n, e in stages.items() if e.get("status") == "failed"}
    lines += [f"- **{n} failed**: {err}" for n, err in failed.items()] + ([""] if failed else [])

    lines += ["## Eval", "", "Held-out suites, sampled (see each suite's temperature); pass@1 is "
              "the mean over the samples of a prompt.", "", eval_table(stages), ""]
    _image(lines, _pass1_plot(stages, list(stages), plots / "pass_at_1.png", "pass@1 per stage"),
           "pass@1 per stage", run_dir)

    loss = plot_panels([(n, {"loss": series(logs[n], "loss")}) for n in stages],
                       plots / "loss.png", title="training loss", ylabel="loss")
    if loss:
        lines += ["## Loss curves", ""]
        _image(lines, loss, "loss curves", run_dir)

    rl = [n for n in stages if series(logs[n], "reward")[0]]
    if rl:
        lines += ["## Reward curves", ""]
        for n in rl:
            _image(lines, plot_reward_curve(m.stage_dir(n) / "logs.jsonl",
                                            plots / f"{n}_reward.png", title=n), f"{n} reward",
                   run_dir)

    dpo = [n for n, e in stages.items() if e.get("kind") == "dpo"]
    if dpo:
        lines += ["## DPO", ""]
    for n in dpo:
        e = stages[n]
        metrics = e.get("metrics") or {}
        facts = {k: metrics.get(k) for k in ("pairs", "prompts_no_pair", "final_reward_margin",
                                             "final_preference_accuracy") if k in metrics}
        if facts:
            lines += [f"`{n}`: " + ", ".join(f"{k} {fmt(v)}" for k, v in facts.items()), ""]
        init = _init_stage(e)
        if init in stages and _by_task(stages[init]) and _by_task(e):
            lines += [f"Against its init `{init}`: the preference target is a higher format rate "
                      f"and shorter answers at unchanged pass@1.", "",
                      dpo_table(stages[init], e, n), ""]
        _image(lines, plot_dpo_curves(m.stage_dir(n) / "logs.jsonl", plots / f"{n}_margins.png",
                                      title=f"{n}: DPO margins and preference accuracy"),
               f"{n} DPO margins", run_dir)

    students, rl_students, teacher = distill_names(stages)
    if students or rl_students:
        names = [*students, *rl_students, *([teacher] if teacher else [])]
        labels = {teacher: f"{teacher} (teacher)"} if teacher else {}
        lines += ["## Distillation vs RL", "",
                  "pass@1 of small dense students distilled from the teacher, against the same "
                  "student trained by RL alone (the DeepSeek-R1 comparison).", "",
                  wide_table(stages, names, labels), ""]
        budgets = budget_table(stages, [*students, *rl_students])
        if budgets:
            lines += ["What each arm spent: optimizer steps, completions trained on, teacher "
                      "forward passes (sampled traces plus scored sequences), tokens generated, "
                      "wall time (teacher sampling included). Arms compare like with like only "
                      "where init, steps and completions match.", "", budgets, ""]
        _image(lines, _pass1_plot(stages, names, plots / "distill_vs_rl.png",
                                  "distilled vs RL-only students"), "distillation vs RL", run_dir)
    out = run_dir / "report.md"
    atomic.write_text(out, "\n".join(lines).rstrip() + "\n")
    return out
