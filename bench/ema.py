"""Step-time cost of the CPU-memory EMA (posttrain.ema), side by side with no EMA, per thread budget.

The tiny DeepSeek-V3-style MoE trains with transformers' Trainer on fixed random token batches,
with and without `EMACallback` (decay 0.999, every step); rounds alternate in ABBA order so
machine-load drift hits both. Thread budgets, stated per row: the training loop runs torch with
T intra-op threads; the EMA worker folds each snapshot on one thread (posttrain.ema.fold). With
T = cores - 1 the two fit the machine's cores; with T = cores they share one (the case a user gets
by default, and the one a fresh clone on 2 cores measured as an 84% overhead before the worker
was held to one thread). Per side: the median wall time from `on_step_begin` to the end of
`on_step_end` (the snapshot the loop pays for included). `overhead` = median_with /
median_without − 1; the loop's time inside the snapshot is shown next to it. This is the CPU case;
the GPU case (pinned buffers, non-blocking copy, CUDA event) is measured by bench/gpu_check.py.

Run: `python bench/ema.py [--steps 14] [--rounds 6] [--threads 1,2]`. Last line:
`{"ema_overhead": at T = cores - 1, "ema_overhead_shared_core": at T = cores, "cores",
"by_threads": {T: overhead}, "ema_snapshot_fraction"}`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times: list[float] = []
        self._t0 = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._t0)


def tiny_moe(vocab: int = 384):
    from transformers import AutoConfig, AutoModelForCausalLM

    from posttrain.models import TINY_CONFIGS
    cfg = AutoConfig.for_model("deepseek_v3", vocab_size=vocab, **TINY_CONFIGS["deepseek_v3"])
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def train(steps: int, with_ema: bool, out: Path) -> tuple[list[float], float]:
    import datasets
    from transformers import Trainer, TrainingArguments

    from posttrain.ema import EMACallback, EMAConfig

    ids = torch.randint(0, 384, (16 * steps, 128), generator=torch.Generator().manual_seed(0))
    data = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    timer = StepTimer()
    callbacks: list = [timer]
    snap = 0.0
    ema = None
    if with_ema:
        ema = EMACallback(EMAConfig(0.999, 1), out / "ema")
        inner = ema.snapshot

        def timed_snapshot():
            nonlocal snap
            t = time.perf_counter()
            inner()
            snap += time.perf_counter() - t

        ema.snapshot = timed_snapshot
        callbacks.insert(0, ema)   # its on_step_end runs inside the timed span
    args = TrainingArguments(output_dir=str(out / "ckpt"), max_steps=steps, learning_rate=1e-3,
                             per_device_train_batch_size=16, report_to="none", use_cpu=True,
                             save_strategy="no", logging_strategy="no", disable_tqdm=True)
    Trainer(model=tiny_moe(), args=args, train_dataset=data, callbacks=callbacks).train()
    return timer.times[2:], snap   # first steps warm up allocators


def measure(threads: int, steps: int, rounds: int, out: Path) -> dict[str, float]:
    """Median step times with and without EMA, the loop at `threads` torch threads."""
    from posttrain import runtime
    runtime.configure(threads)
    times: dict[str, list[float]] = {"without": [], "with_ema": []}
    snap_total = 0.0
    for r in range(rounds):
        for side in (list(times) if r % 2 == 0 else list(times)[::-1]):   # ABBA order
            t, snap = train(steps, side == "with_ema", out / f"{side}{threads}")
            times[side] += t
            snap_total += snap
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"without_ms": med["without"] * 1e3, "with_ms": med["with_ema"] * 1e3,
            "overhead": med["with_ema"] / med["without"] - 1,
            "snapshot_fraction": snap_total / sum(times["with_ema"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=14)
    p.add_argument("--rounds", type=int, default=6)
    cores = os.cpu_count() or 1
    p.add_argument("--threads", default=",".join(str(t) for t in sorted({max(1, cores - 1), cores})))
    args = p.parse_args()
    from posttrain import runtime
    runtime.quiet()
    out = Path(tempfile.mkdtemp(prefix="bench-ema-"))
    rows = {int(t): measure(int(t), args.steps, args.rounds, out) for t in args.threads.split(",")}
    n_params = sum(p.numel() for p in tiny_moe().parameters())
    print(f"tiny MoE, {n_params / 1e6:.2f}M params, batch 16 x 128 tokens, {args.rounds} rounds x "
          f"{args.steps} steps, {cores} cores; EMA worker: 1 thread")
    print(f"{'loop threads':<14}{'without (ms)':>13}{'with EMA (ms)':>15}{'overhead':>10}"
          f"{'snapshot':>10}")
    for t, r in rows.items():
        print(f"{t:<14}{r['without_ms']:>13.1f}{r['with_ms']:>15.1f}{r['overhead']:>+10.2%}"
              f"{r['snapshot_fraction']:>10.2%}")
    fit = rows.get(max(1, cores - 1), next(iter(rows.values())))
    shared = rows.get(cores)
    print(json.dumps({"ema_overhead": round(fit["overhead"], 4),
                      "ema_overhead_shared_core": round(shared["overhead"], 4) if shared else None,
                      "cores": cores,
                      "by_threads": {t: round(r["overhead"], 4) for t, r in rows.items()},
                      "ema_snapshot_fraction": round(fit["snapshot_fraction"], 4)}))


if __name__ == "__main__":
    main()
