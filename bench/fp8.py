"""FP8 (DeepSeek-V3 §3.3) against FP32, side by side: GEMM accuracy, accumulation precision, and
training at widths where the blocks matter.

1. GEMM: E4M3 blockwise (1x128 activations, 128x128 weights) vs FP32 on Gaussian inputs, as
   DeepGEMM's `calc_diff = 1 − 2Σxy / Σ(x² + y²)`; per-tensor E4M3 next to it for contrast,
   also with a few outlier tokens (judged on the other tokens).
2. Accumulation: the same E4M3 operands summed by an emulated ~14-bit accumulator over all of K,
   vs the same accumulator promoted to FP32 every 128 (N_C), for K = 512 … 16384; error relative
   to a float64 sum.
3. Training: a DeepSeek-V3-style MoE (MLA attention, shared + routed experts) whose every FP8
   GEMM spans several 128-wide tiles and blocks (hidden 512, expert width 256, MLA ranks 256),
   trained `--steps` steps on language-model batches of the tiny world's task text. Every run
   sees the identical batch sequence. FP32 against: FP8 (all three GEMMs of every eligible
   layer); ablations (only Fprop, only Dgrad, only Wgrad in FP8; attention kept in FP32; experts
   only); and FP8 with the emulated 14-bit accumulator, promoted every 128 and never. The noise
   floor is FP32 against FP32 from another init seed on the same batches. The figure is the
   relative difference of the loss averaged over the last 10% of steps (lr: warm-up, then cosine
   to 10%), for the full FP8 arm the mean over `--seeds` inits, each against FP32 from the same
   init; per-step curves go to a PNG. The FP8 GEMMs here are the CPU reference (exact E4M3
   products, FP32 per 128-block); the ablations run from one init.

Run: `python bench/fp8.py [--steps 300] [--png runs/bench/fp8_loss.png]`. Last line:
`{"gemm_calc_diff", "accum_error_ratio", "train_hidden_size", "train_steps",
"loss_rel_diff_last10", "noise_rel_diff_last10", "ablation": {arm: signed rel diff}}` (`--paired`
arms: the mean over inits).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from posttrain.fp8 import calc_diff, fp8_gemm, limited_precision_dot, quantize  # noqa: E402
from posttrain.fp8.quantize import E4M3_MAX, WEIGHT_BLOCK, to_e4m3  # noqa: E402

# Every FP8 GEMM spans >= 2 tiles/blocks along K and N: hidden 512 (q/kv-a, dense and expert
# up-projections), MLA ranks 256 (kv-b), 4 heads x 64 (o_proj, K 256), experts 256 wide.
WIDE = dict(hidden_size=512, intermediate_size=1024, moe_intermediate_size=256,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            n_routed_experts=4, num_experts_per_tok=2, kv_lora_rank=256, q_lora_rank=256,
            qk_rope_head_dim=64, qk_nope_head_dim=64, v_head_dim=64)
# arm -> FP8Config fields (None: FP32); the order of the table.
ARMS: dict[str, dict | None] = {
    "fp32": None,
    "fp8": {},
    "fprop_only": {"dgrad": False, "wgrad": False},
    "dgrad_only": {"fprop": False, "wgrad": False},
    "wgrad_only": {"fprop": False, "dgrad": False},
    "attention_fp32": {"keep": ["self_attn"]},
    "o_proj_fp32": {"keep": ["self_attn.o_proj"]},   # the paper's higher-precision o_proj input
    "experts_only": {"keep": ["self_attn", "shared_experts", "layers.0.mlp"]},
    "acc14_promoted": {"accumulator_bits": 14, "promote_every": 128},
    "acc14_unpromoted": {"accumulator_bits": 14, "promote_every": None},
}


def per_tensor(x: torch.Tensor) -> torch.Tensor:
    """E4M3 with one scale for the whole tensor (the coarse baseline)."""
    scale = x.abs().max() / E4M3_MAX
    return to_e4m3(x / scale).float() * scale


def gemm_table() -> float:
    print("GEMM  E4M3 blockwise vs FP32 (calc_diff, lower is better)")
    print(f"{'M x K x N':<20}{'inputs':<24}{'blockwise':>11}{'per-tensor':>12}")
    main = None
    for (m, k, n), outliers in [((256, 4096, 256), False), ((256, 4096, 256), True),
                                ((100, 1000, 300), False)]:
        g = torch.Generator().manual_seed(0)
        x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
        rows = slice(None)
        if outliers:   # 4 tokens 10^4x larger: one scale for all pushes the rest to subnormals
            x[:4] *= 1e4
            rows = slice(4, None)   # judged on the ordinary tokens
        ref = (x @ w.t())[rows]
        block = calc_diff(fp8_gemm(quantize(x), quantize(w, WEIGHT_BLOCK))[rows], ref)
        tensor = calc_diff((per_tensor(x) @ per_tensor(w).t())[rows], ref)
        label = "gaussian, 4 outlier rows" if outliers else "gaussian"
        print(f"{f'{m} x {k} x {n}':<20}{label:<24}{block:>11.2e}{tensor:>12.2e}")
        if main is None:
            main = block
    return main


def rel_error(c: torch.Tensor, ref: torch.Tensor) -> float:
    return float((c.double() - ref).norm() / ref.norm())


def accumulation_table() -> float:
    print("\nAccumulation  14-bit accumulator vs promotion to FP32 every 128 (relative error)")
    print(f"{'K':>6}{'14-bit':>12}{'promoted':>12}{'ratio':>8}")
    ratio_4096 = 0.0
    for k in (512, 1024, 2048, 4096, 8192, 16384):
        g = torch.Generator().manual_seed(k)
        a = quantize(torch.randn(64, k, generator=g)).dequantize()
        b = quantize(torch.randn(64, k, generator=g)).dequantize()
        ref = a.double() @ b.double().t()

        limited = rel_error(limited_precision_dot(a, b, bits=14), ref)
        promoted = rel_error(limited_precision_dot(a, b, bits=14, promote_every=128), ref)
        print(f"{k:>6}{limited:>12.2e}{promoted:>12.2e}{limited / promoted:>8.1f}")
        if k == 4096:
            ratio_4096 = limited / promoted
    return ratio_4096


def lm_batches(steps: int, batch: int, seq: int):
    """(tokenizer, batches): `steps` fixed batches of `seq` tokens cut from the tiny world's
    worked arithmetic and countdown text, one token stream, the same for every run."""
    import tempfile

    from posttrain.data import task_rows
    from posttrain.models import train_tokenizer

    rows = task_rows({"task": "arithmetic", "n": 6000, "digits": [1, 3]}, 0) + \
        task_rows({"task": "countdown", "n": 1500, "count": 3}, 0)
    texts = [f"{r['prompt']} {r['trace']} {r['answer']}" for r in rows]
    tok = train_tokenizer(texts, Path(tempfile.mkdtemp(prefix="bench-fp8-tok-")))
    ids = [t for text in texts for t in (*tok(text)["input_ids"], tok.eos_token_id)]
    need = steps * batch * seq
    stream = torch.tensor((ids * (need // len(ids) + 1))[:need]).view(steps, batch, seq)
    return tok, stream


def train_curve(tok, batches: torch.Tensor, fp8: dict | None, init_seed: int, lr: float
                ) -> tuple[list[float], float]:
    """Per-step training losses of the wide MoE (AdamW, warm-up + cosine) and the seconds taken."""
    from posttrain.fp8 import FP8Config, convert_to_fp8
    from posttrain.models import build_tiny_model

    model = build_tiny_model("deepseek_v3", tok, seed=init_seed, **WIDE)
    if fp8 is not None:
        convert_to_fp8(model, FP8Config.parse(fp8))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    steps, warmup = len(batches), max(1, len(batches) // 10)
    # Warm-up, then cosine to 10%: the last 10% of steps sit near a plateau, where a loss gap
    # is a gap in where training ends, not in how fast two runs happen to be falling.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warmup) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, i / steps)))))
    losses, start = [], time.perf_counter()
    for x in batches:
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses, time.perf_counter() - start


def last10(losses: list[float]) -> float:
    tail = losses[-max(1, len(losses) // 10):]
    return sum(tail) / len(tail)


def training_table(steps: int, batch: int, seq: int, lr: float, png: Path, arms: list[str],
                   seeds: int, paired: tuple[str, ...] = ()
                   ) -> tuple[float | None, float, dict[str, float]]:
    from posttrain.models import build_tiny_model, count_params
    from posttrain.plots import plot_panels

    tok, batches = lm_batches(steps, batch, seq)
    params = count_params(build_tiny_model("deepseek_v3", tok, **WIDE))
    print(f"\nTraining  DeepSeek-V3-style MoE, {params / 1e6:.1f}M params, hidden "
          f"{WIDE['hidden_size']}, experts {WIDE['moe_intermediate_size']} wide, {steps} steps x "
          f"{batch} x {seq} tokens, identical batches")
    curves, seconds = {}, {}
    # (name, FP8 arm or None for FP32, init seed): both inits in FP32 and, for `seeds` > 1, the
    # full FP8 arm from the second init as well (paired with the FP32 run from that init).
    runs = [("fp32", None, 0), ("fp32_init1", None, 1)]
    runs += [(arm, arm, 0) for arm in arms]
    runs += [(f"{arm}_init{s}", arm, s) for arm in ("fp8", *paired) if arm in arms
             for s in range(1, seeds)]
    runs += [(f"fp32_init{s}", None, s) for s in range(2, seeds)]
    for name, arm, seed in runs:
        if name in curves:
            continue
        curves[name], seconds[name] = train_curve(tok, batches, None if arm is None else ARMS[arm],
                                                  seed, lr)
        print(f"  {name}: last-10% loss {last10(curves[name]):.4f} ({seconds[name]:.0f}s)",
              flush=True)
    init_of = {name: seed for name, _, seed in runs}
    rel = {}
    signed = {}
    for name, c in curves.items():   # FP32 inits against init 0 (noise), the rest against FP32
        same_init = "fp32" if init_of[name] == 0 else f"fp32_init{init_of[name]}"
        ref = last10(curves["fp32" if name.startswith("fp32") else same_init])
        if name != "fp32":
            signed[name] = (last10(c) - ref) / ref
            rel[name] = abs(signed[name])
    fp8_pairs = [rel[n] for n in ("fp8", *(f"fp8_init{s}" for s in range(1, seeds))) if n in rel]
    print(f"\n{'run':<20}{'last-10% loss':>14}{'rel. diff':>11}{'s':>7}   (signed, vs FP32 from the same init)")
    for arm, c in curves.items():
        diff = "" if arm == "fp32" else f"{signed[arm]:+.3%}"
        print(f"{arm:<20}{last10(c):>14.4f}{diff:>11}{seconds[arm]:>7.0f}")
    xs = list(range(1, steps + 1))
    out = plot_panels([("loss", {a: (xs, c) for a, c in curves.items()}),
                       ("loss - fp32", {a: (xs, [v - r for v, r in zip(c, curves["fp32"])])
                                        for a, c in curves.items() if a != "fp32"})],
                      png, title="FP8 vs FP32 training loss, identical batches", cols=2)
    print(f"per-step curves: {out}")
    print("fp8 vs fp32 from the same init: "
          + ", ".join(f"{v:.3%}" for v in fp8_pairs) + f"; noise (init 0 vs 1) {rel['fp32_init1']:.3%}")
    ablation = {a: round(v, 5) for a, v in signed.items() if a in ARMS and a != "fp8"}
    for arm in paired:   # mean over the inits it ran from
        ablation[arm] = round(sum(signed[n] for n in (arm, *(f"{arm}_init{s}" for s in range(1, seeds))))
                              / seeds, 5)
    mean = sum(fp8_pairs) / len(fp8_pairs) if fp8_pairs else None   # None: an ablation-only run
    return mean, rel["fp32_init1"], ablation


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--arms", default=",".join(a for a in ARMS if a != "fp32"))
    p.add_argument("--seeds", type=int, default=2, help="init seeds of the FP8-vs-FP32 pair")
    p.add_argument("--paired", default="", help="arms also run from every init seed, e.g. attention_fp32")
    p.add_argument("--png", default=str(ROOT / "runs" / "bench" / "fp8_loss.png"))
    p.add_argument("--threads", type=int, default=int(os.environ.get("POSTTRAIN_THREADS", 2)))
    args = p.parse_args()
    from posttrain import runtime
    runtime.configure(args.threads)
    runtime.quiet()
    gemm = gemm_table()
    ratio = accumulation_table()
    loss_diff, noise, ablation = training_table(args.steps, args.batch, args.seq, args.lr,
                                                Path(args.png), args.arms.split(","), args.seeds,
                                                tuple(a for a in args.paired.split(",") if a))
    print(json.dumps({"gemm_calc_diff": round(gemm, 6), "accum_error_ratio": round(ratio, 1),
                      "train_hidden_size": WIDE["hidden_size"], "train_steps": args.steps,
                      "loss_rel_diff_last10": None if loss_diff is None else round(loss_diff, 5),
                      "noise_rel_diff_last10": round(noise, 5), "ablation": ablation}))


if __name__ == "__main__":
    main()
