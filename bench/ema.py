"""Step-time cost of the CPU-memory EMA (posttrain.ema), side by side with no EMA.

Each row trains a model with transformers' Trainer on fixed random token batches, with and
without `EMACallback` (decay 0.999, every step); rounds alternate in ABBA order so machine-load
drift hits both. The training loop runs torch with T intra-op threads; the EMA worker copies and
folds on one core at the lowest priority (posttrain.ema: the CPU case).

- `tiny`: the tiny DeepSeek-V3-style MoE, batch 16 x 128, at T = cores - 1 (the worker has a core
  of its own) and T = cores (it shares one with the loop: the case a user gets by default, once
  measured as an 84% overhead before the worker was held to one core).
- `slow fold`: a 100M-parameter Llama at batch 1 x 64 tokens, T = cores: the worker only gets the
  core time the loop leaves, so one fold takes longer than a training step (the row shows both).
  The EMA then skips snapshots and folds the next with decay ** k instead of making the loop wait.

Per side: the median wall time from `on_step_begin` to the end of `on_step_end` (the loop's part
of the snapshot and of the copy it must see finished before the optimizer step included).
`overhead` = median_with / median_without − 1. The GPU case (pinned buffers, a side stream, folds
on the free cores) is measured by bench/gpu_check.py.

Run: `python bench/ema.py [--steps 14] [--rounds 6] [--threads 1,2]`. Last line:
`{"ema_overhead": tiny at T = cores - 1, "ema_overhead_shared_core": tiny at T = cores, "cores",
"by_threads": {T: overhead}, "ema_snapshot_fraction", "ema_slow_fold_overhead",
"slow_fold_step_ms", "slow_fold_fold_ms", "slow_fold_effective_interval"}`.
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


def llama_100m():
    """A 100M-parameter Llama (SmolLM2-135M's widths, 12 layers, a 32k vocabulary, tied)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", vocab_size=32000, hidden_size=768, intermediate_size=2048,
                               num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                               tie_word_embeddings=True)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


# row name: (model builder, vocab, batch, tokens)
MODELS = {"tiny": (tiny_moe, 384, 16, 128), "slow fold": (llama_100m, 32000, 1, 64)}


def train(model_name: str, steps: int, with_ema: bool, out: Path
          ) -> tuple[list[float], float, dict | None]:
    """Step times (after warm-up), the loop's time inside the snapshot, and the EMA's stats."""
    import datasets
    from transformers import Trainer, TrainingArguments

    from posttrain.ema import EMACallback, EMAConfig

    build, vocab, batch, tokens = MODELS[model_name]
    ids = torch.randint(0, vocab, (batch * steps, tokens),
                        generator=torch.Generator().manual_seed(0))
    data = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    timer = StepTimer()
    callbacks: list = [timer]
    snap = 0.0
    ema = None
    if with_ema:
        ema = EMACallback(EMAConfig(0.999, 1), out / "ema")
        inner = ema.snapshot

        def timed_snapshot(*args, **kwargs):
            nonlocal snap
            t = time.perf_counter()
            taken = inner(*args, **kwargs)
            snap += time.perf_counter() - t
            return taken

        ema.snapshot = timed_snapshot
        callbacks.insert(0, ema)   # its on_step_end runs inside the timed span
    args = TrainingArguments(output_dir=str(out / "ckpt"), max_steps=steps, learning_rate=1e-3,
                             per_device_train_batch_size=batch, report_to="none", use_cpu=True,
                             save_strategy="no", logging_strategy="no", disable_tqdm=True)
    Trainer(model=build(), args=args, train_dataset=data, callbacks=callbacks).train()
    # first steps warm up allocators
    return timer.times[2:], snap, (ema.stats() | {"fold_s": ema.fold_seconds} if ema else None)


def measure(model_name: str, threads: int, steps: int, rounds: int, out: Path) -> dict[str, float]:
    """Median step times with and without EMA, the loop at `threads` torch threads."""
    from posttrain import runtime
    runtime.configure(threads)
    times: dict[str, list[float]] = {"without": [], "with_ema": []}
    snap_total = 0.0
    stats = []
    for r in range(rounds):
        for side in (list(times) if r % 2 == 0 else list(times)[::-1]):   # ABBA order
            t, snap, st = train(model_name, steps, side == "with_ema", out / f"{side}{threads}")
            times[side] += t
            snap_total += snap
            stats += [st] if st else []
    med = {k: statistics.median(v) for k, v in times.items()}
    folds = [s for st in stats for s in st["fold_s"]]
    return {"without_ms": med["without"] * 1e3, "with_ms": med["with_ema"] * 1e3,
            "overhead": med["with_ema"] / med["without"] - 1,
            "snapshot_fraction": snap_total / sum(times["with_ema"]),
            "fold_ms": statistics.median(folds) * 1e3 if folds else float("nan"),
            "interval": statistics.mean(st["effective_interval"] for st in stats)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=14)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--slow-steps", type=int, default=10)
    p.add_argument("--slow-rounds", type=int, default=2)
    cores = os.cpu_count() or 1
    p.add_argument("--threads", default=",".join(str(t) for t in sorted({max(1, cores - 1), cores})))
    args = p.parse_args()
    from posttrain import runtime
    runtime.quiet()
    out = Path(tempfile.mkdtemp(prefix="bench-ema-"))
    rows = {("tiny", int(t)): measure("tiny", int(t), args.steps, args.rounds, out)
            for t in args.threads.split(",")}
    rows[("slow fold", cores)] = measure("slow fold", cores, args.slow_steps, args.slow_rounds, out)
    sizes = {name: sum(p.numel() for p in MODELS[name][0]().parameters()) / 1e6
             for name in MODELS}
    print(f"{cores} cores; EMA every step, decay 0.999; worker: 1 core, lowest priority; "
          f"tiny: {sizes['tiny']:.2f}M params, batch 16 x 128, {args.rounds} rounds x "
          f"{args.steps} steps; slow fold: {sizes['slow fold']:.0f}M params, batch 1 x 64, "
          f"{args.slow_rounds} rounds x {args.slow_steps} steps")
    print(f"{'model':<11}{'threads':>8}{'without (ms)':>13}{'with EMA (ms)':>15}{'overhead':>10}"
          f"{'snapshot':>10}{'fold (ms)':>11}{'interval':>10}")
    for (name, t), r in rows.items():
        print(f"{name:<11}{t:>8}{r['without_ms']:>13.1f}{r['with_ms']:>15.1f}{r['overhead']:>+10.2%}"
              f"{r['snapshot_fraction']:>10.2%}{r['fold_ms']:>11.1f}{r['interval']:>10.2f}")
    fit = rows.get(("tiny", max(1, cores - 1)), next(iter(rows.values())))
    shared = rows.get(("tiny", cores))
    slow = rows[("slow fold", cores)]
    print(json.dumps({"ema_overhead": round(fit["overhead"], 4),
                      "ema_overhead_shared_core": round(shared["overhead"], 4) if shared else None,
                      "cores": cores,
                      "by_threads": {t: round(r["overhead"], 4) for (n, t), r in rows.items()
                                     if n == "tiny"},
                      "ema_snapshot_fraction": round(fit["snapshot_fraction"], 4),
                      "ema_slow_fold_overhead": round(slow["overhead"], 4),
                      "slow_fold_step_ms": round(slow["without_ms"], 1),
                      "slow_fold_fold_ms": round(slow["fold_ms"], 1),
                      "slow_fold_effective_interval": round(slow["interval"], 2)}))


if __name__ == "__main__":
    main()
