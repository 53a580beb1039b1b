"""Training curves from a stage's `logs.jsonl` (one trainer log record per line) as PNG files.

matplotlib with the Agg backend: no display needed, safe on a headless training box. The GRPO
stage writes `reward_curve.png` with it; the run report reuses `read_log` and `plot_curves`.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def read_log(path: str | Path) -> list[dict]:
    """The log records of a `logs.jsonl`; unreadable lines (a crash mid-write) are skipped."""
    records = []
    path = Path(path)
    if not path.exists():
        return records
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` over the records that have a finite number for it."""
    steps, values = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, str):
            try:
                v = float(v)
            except ValueError:
                continue
        if isinstance(v, (int, float)) and math.isfinite(v):
            steps.append(int(r.get("step", len(steps))))
            values.append(float(v))
    return steps, values


_NO_MATPLOTLIB_SAID = False


def _pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed), imported only when plotting;
    None where matplotlib is not installed (an offline GPU image: no PNGs, said once)."""
    global _NO_MATPLOTLIB_SAID
    try:
        import matplotlib
    except ImportError:
        if not _NO_MATPLOTLIB_SAID:
            _NO_MATPLOTLIB_SAID = True
            print("[posttrain] matplotlib is not installed: no plots", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, out: str | Path) -> Path:
    """Write `fig` to the PNG `out` (its folder made as needed) and free it; returns the path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    _pyplot().close(fig)
    return out


def plot_curves(records: list[dict], panels: list[tuple[str, list[str]]], out: str | Path,
                title: str = "") -> Path | None:
    """One panel per (label, keys) pair, each key a line over training steps.

    Returns the PNG path, or None when no key has any data (nothing is written then).
    """
    plt = _pyplot()
    if plt is None:
        return None

    panels = [(label, [k for k in keys if series(records, k)[0]]) for label, keys in panels]
    panels = [(label, keys) for label, keys in panels if keys]
    if not panels:
        return None
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.4 * len(panels)), sharex=True,
                             squeeze=False)
    for ax, (label, keys) in zip(axes[:, 0], panels):
        for key in keys:
            ax.plot(*series(records, key), label=key, linewidth=1.2)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    axes[-1, 0].set_xlabel("step")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, out)


def plot_reward_curve(log_path: str | Path, out: str | Path, title: str = "") -> Path | None:
    """GRPO curves: total and per-component reward, reward std / zero-std groups and dynamic
    sampling, length, KL, and — when generation ran in vLLM — the rollout/trainer mismatch TRL's
    importance-sampling correction measures (IS ratio, log-prob gap)."""
    records = read_log(log_path)
    components = sorted({k for r in records for k in r
                         if k.startswith("rewards/") and k.endswith("/mean")})
    panels = [
        ("reward", ["reward", *components]),
        ("spread", ["reward_std", "frac_reward_zero_std", "dynamic_sampling/kept_frac",
                    "dynamic_sampling/informative_frac"]),
        ("dynamic sampling", ["dynamic_sampling/rounds", "dynamic_sampling/generated_frac"]),
        ("tokens", ["completions/mean_length"]),
        ("KL / clip", ["kl", "clip_ratio/region_mean"]),
        ("vLLM vs trainer", ["sampling/importance_sampling_ratio/mean",
                             "sampling/importance_sampling_ratio/min",
                             "sampling/sampling_logp_difference/mean"]),
    ]
    return plot_curves(records, panels, out, title)


def plot_dpo_curves(log_path: str | Path, out: str | Path, title: str = "") -> Path | None:
    """DPO curves: implicit reward margin, preference accuracy, chosen/rejected rewards, loss."""
    panels = [
        ("reward margin", ["rewards/margins"]),
        ("pref. accuracy", ["rewards/accuracies"]),
        ("implicit reward", ["rewards/chosen", "rewards/rejected"]),
        ("loss", ["loss"]),
    ]
    return plot_curves(read_log(log_path), panels, out, title)


def plot_panels(panels: list[tuple[str, dict[str, tuple[list, list]]]], out: str | Path,
                title: str = "", ylabel: str = "", cols: int = 3) -> Path | None:
    """A grid of small panels, each (title, {label: (steps, values)}): curves of several stages
    side by side, each on its own scale (an SFT loss and a DPO loss do not share an axis).

    Returns the PNG path, or None when no panel has data.
    """
    plt = _pyplot()
    if plt is None:
        return None

    panels = [(name, {k: v for k, v in lines.items() if v[0]}) for name, lines in panels]
    panels = [(name, lines) for name, lines in panels if lines]
    if not panels:
        return None
    cols = min(cols, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (name, lines) in zip(axes.flat, panels):
        for label, (xs, ys) in lines.items():
            ax.plot(xs, ys, label=label, linewidth=1.2)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=6, loc="best")
    if title:
        fig.suptitle(title)
    # Fixed spacing instead of tight_layout: a grid of panels costs seconds to auto-lay out.
    # Margins in inches (the title, the x labels), so a single row keeps room for them too.
    height = fig.get_figheight()
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.45 / height,
                        top=1 - (0.6 if title else 0.3) / height, wspace=0.3, hspace=0.55)
    return _save(fig, out)


def plot_bars(groups: list[str], bars: dict[str, list[float]], out: str | Path, title: str = "",
              ylabel: str = "") -> Path | None:
    """Grouped bars: one group per x label (e.g. task), one bar per series (e.g. stage)."""
    plt = _pyplot()
    if plt is None:
        return None

    if not groups or not bars:
        return None
    width = 0.8 / len(bars)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(groups) * max(1, len(bars)) / 2), 3.2))
    for i, (label, values) in enumerate(bars.items()):
        xs = [g + (i - (len(bars) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, values, width=width, label=label)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return _save(fig, out)
