"""FP8 (DeepSeek-V3 §3.3) against BF16, the paper's baseline, measured so a 0.25% gap can be seen.

1. GEMM: E4M3 blockwise (1x128 activations, 128x128 weights, power-of-two scales) vs FP32 on
   Gaussian inputs, as DeepGEMM's `calc_diff = 1 − 2Σxy / Σ(x² + y²)`; per-tensor E4M3 next to it
   for contrast, also with a few outlier tokens (judged on the other tokens).
2. Accumulation: the same E4M3 operands summed by an emulated ~14-bit accumulator over all of K,
   vs the same accumulator promoted to FP32 every 128 (N_C), for K = 512 … 16384; error relative
   to a float64 sum.
3. Training, by branches: a DeepSeek-V3-style MoE (MLA attention, shared + routed experts) whose
   every FP8 GEMM spans several 128-wide tiles (hidden 512, experts 256 wide, MLA ranks 256) is
   trained in FP32 at a stable learning rate on mixed tiny-world text (sums and countdown,
   interleaved) into one shared checkpoint (weights and AdamW state). From it, `--branches`
   branches each continue `--branch_steps` steps on a data window of their own, once per arm
   (FP32; BF16; FP8; the ablation arms), all from the same weights; every branch's
   weights are then scored on one fixed held-out set, in FP32. The figure of an arm is the mean,
   over branches, of its paired relative held-out loss difference to BF16 (signed), with the
   standard error of that mean; FP32 − BF16 is the null (what a precision change that should
   not matter looks like). Branching from a stable point at a stable learning rate keeps runs
   from drifting apart chaotically, so a fraction of a percent can be resolved.
   A from-scratch pair of curves (FP8 vs BF16, same init and data order) goes to the PNG.

The FP8 GEMMs here are the CPU reference (exact E4M3 products, FP32 per 128-block; the routed
experts through the grouped GEMMs' reference). The BF16 arm computes what a BF16 tensor-core GEMM
does — operands rounded to BF16, products accumulated in FP32 — on the same layers FP8 covers
(the FP8 layers with `_bf16_linear` / `_bf16_grouped` below as their GEMM), with FP32 master
weights: CPU autocast emulates BF16 matmuls at ~9x the FP32 step time on this machine's AVX2,
which the branch protocol cannot afford, and this keeps the FP8-vs-BF16 difference to the GEMMs.

Run: `python bench/fp8.py [--branches 20] [--branch_steps 15] [--ablations a,b] [--png ...]`.
Last line: `{"fp8_vs_bf16_rel", "fp8_vs_bf16_se", "fp32_vs_bf16_rel", "fp32_vs_bf16_se",
"branches", "branch_steps", "train_hidden_size", "ablations": {arm: {"rel", "se"}},
"gemm_calc_diff", "accum_error_ratio"}` (relative figures as fractions: 0.0025 = 0.25%).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
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
# arm -> how it trains: "fp32", "bf16" (the FP8 layers with a BF16 GEMM, `_bf16_linear`), or an
# FP8Config mapping; the table's order.
ARMS: dict[str, str | dict] = {
    "fp32": "fp32",
    "bf16": "bf16",
    "fp8": {},
    "fp8_amax_scales": {"pow2_scales": False},          # amax/448 instead of powers of two
    "fprop_only": {"dgrad": False, "wgrad": False},
    "dgrad_only": {"fprop": False, "wgrad": False},
    "wgrad_only": {"fprop": False, "dgrad": False},
    "attention_fp32": {"keep": ["self_attn"]},
    "acc14_promoted": {"accumulator_bits": 14, "promote_every": 128},
    "acc14_unpromoted": {"accumulator_bits": 14, "promote_every": None},
}
CORE = ("fp32", "bf16", "fp8")
# The ablation run by default (the whole bench: 16.2 min on 2 idle cores): FP8 in every GEMM
# but attention's, the cheap arm that locates where FP8's branch-to-branch spread comes from
# (20 branches: -0.03% ± 0.03%, against full FP8's -0.09% ± 0.10%). The others (`--ablations`)
# cost 10-15 s a branch each; a 16-branch run read Wgrad-only FP8 -0.004% ± 0.014%, an
# 8-branch run amax scales +0.04% ± 0.09% and 14-bit unpromoted accumulation +0.34% ± 0.25%.
DEFAULT_ABLATIONS = ("attention_fp32",)


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
        block = calc_diff(fp8_gemm(quantize(x, pow2=True), quantize(w, WEIGHT_BLOCK, True))[rows],
                          ref)
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


def lm_stream(tokens: int, seq: int):
    """(tokenizer, token stream cut into rows of `seq`): the tiny world's worked sums and countdown
    problems, shuffled together (both tasks all along the stream), EOS between examples."""
    import random
    import tempfile

    from posttrain.data import task_rows
    from posttrain.models import train_tokenizer

    rows = task_rows({"task": "arithmetic", "n": 12000, "digits": [1, 3]}, 0) + \
        task_rows({"task": "countdown", "n": 4000, "count": 3}, 0)
    random.Random(0).shuffle(rows)
    texts = [f"{r['prompt']} {r['trace']} {r['answer']}" for r in rows]
    tok = train_tokenizer(texts, Path(tempfile.mkdtemp(prefix="bench-fp8-tok-")))
    ids = [t for text in texts for t in (*tok(text)["input_ids"], tok.eos_token_id)]
    need = tokens // seq * seq
    if len(ids) < need:
        raise SystemExit(f"the task text holds {len(ids)} tokens, {need} asked for")
    return tok, torch.tensor(ids[:need]).view(-1, seq)


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).to(torch.float32)   # round to nearest even


class _Bf16Gemm(torch.autograd.Function):
    """`x @ wᵀ` as a BF16 GEMM computes it: operands in BF16, FP32 accumulation, in all three
    GEMMs (the incoming gradient rounded to BF16 too)."""

    @staticmethod
    def forward(ctx, x, w):
        xb, wb = _bf16(x.reshape(-1, x.shape[-1])), _bf16(w)
        ctx.save_for_backward(xb, wb)
        ctx.shape = x.shape
        return (xb @ wb.t()).view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, grad):
        xb, wb = ctx.saved_tensors
        gb = _bf16(grad.reshape(-1, wb.shape[0]))
        return (gb @ wb).view(ctx.shape), gb.t() @ xb


def _bf16_linear(x, weight, bias=None, config=None):
    y = _Bf16Gemm.apply(x, weight)
    return y + bias if bias is not None else y


class _Bf16GroupedGemm(torch.autograd.Function):
    """The experts' grouped `x @ w_eᵀ` (posttrain.fp8.experts' layout) as BF16 GEMMs compute it,
    on the same row tiles the FP8 arm's grouped GEMMs use."""

    @staticmethod
    def forward(ctx, x, w, layout):
        from posttrain.fp8.experts import matmul_t, per_tile
        xb, wb = _bf16(x), _bf16(w)
        ctx.save_for_backward(xb, wb)
        ctx.layout = layout
        return per_tile(xb, wb, layout, matmul_t)

    @staticmethod
    def backward(ctx, grad):
        from posttrain.fp8.experts import matmul_t, per_group, per_tile
        xb, wb = ctx.saved_tensors
        gb = _bf16(grad)
        return (per_tile(gb, wb.transpose(1, 2), ctx.layout, matmul_t),
                per_group(gb.t(), xb.t(), ctx.layout, matmul_t), None)


def _bf16_grouped(x, weight, layout, config=None):
    return _Bf16GroupedGemm.apply(x, weight, layout)


def build(tok, arm: str, init_seed: int = 0):
    from posttrain.fp8 import FP8Config, convert_to_fp8
    from posttrain.models import build_tiny_model

    model = build_tiny_model("deepseek_v3", tok, seed=init_seed, **WIDE)
    spec = ARMS[arm]
    if isinstance(spec, dict):
        convert_to_fp8(model, FP8Config.parse(spec if spec else True))
    elif spec == "bf16":   # the FP8 layers' own swap, each GEMM then computed as BF16 does
        convert_to_fp8(model, FP8Config())
        for module in model.modules():
            if type(module).__name__ == "FP8Linear":
                module.linear_fn = _bf16_linear
            elif type(module).__name__ == "FP8Experts":
                module.grouped_fn = _bf16_grouped
    return model


def train(model, arm: str, opt, batches: torch.Tensor, losses: list | None = None) -> None:
    """Steps on `batches` (steps x batch x seq) in the arm's precision."""
    for x in batches:
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if losses is not None:
            losses.append(float(loss.detach()))


def heldout_loss(tok, state: dict, heldout: torch.Tensor) -> float:
    """Mean loss of the weights `state` on the held-out batches, in FP32 (no FP8 layers)."""
    model = build(tok, "fp32")
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        return sum(float(model(input_ids=x, labels=x).loss) for x in heldout) / len(heldout)


def branch_table(args) -> dict:
    from posttrain.models import count_params
    from posttrain.plots import plot_panels

    batch, seq = args.batch, args.seq
    rows_needed = (args.base_steps + args.branches * args.branch_steps + args.heldout
                   + args.scratch_steps) * batch
    tok, rows = lm_stream(rows_needed * seq, seq)
    steps = rows.view(-1, batch, seq)
    base = steps[:args.base_steps]
    windows = [steps[args.base_steps + k * args.branch_steps:
                     args.base_steps + (k + 1) * args.branch_steps] for k in range(args.branches)]
    after = args.base_steps + args.branches * args.branch_steps
    heldout = steps[after:after + args.heldout]
    scratch = steps[after + args.heldout:after + args.heldout + args.scratch_steps]
    arms = [a for a in ARMS if a in CORE or a in args.ablations.split(",")]
    model = build(tok, "fp32")
    print(f"\nTraining by branches  DeepSeek-V3-style MoE, {count_params(model) / 1e6:.1f}M "
          f"params, hidden {WIDE['hidden_size']}; checkpoint: {args.base_steps} FP32 steps at "
          f"lr {args.lr}; {args.branches} branches x {args.branch_steps} steps x {batch} x {seq} "
          f"tokens per arm, each on its own data window; held-out: {args.heldout} x {batch} "
          f"x {seq} tokens, scored in FP32", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    t = time.perf_counter()
    train(model, "fp32", opt, base)
    checkpoint = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
    print(f"  checkpoint: held-out loss {heldout_loss(tok, checkpoint[0], heldout):.4f} "
          f"({time.perf_counter() - t:.0f}s)", flush=True)
    loss: dict[str, list[float]] = {a: [] for a in arms}
    seconds: dict[str, float] = dict.fromkeys(arms, 0.0)
    for k, window in enumerate(windows):
        for arm in arms:
            t = time.perf_counter()
            model = build(tok, arm)
            model.load_state_dict(checkpoint[0])
            opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
            # A copy: load_state_dict keeps the very tensors it is given (same dtype and
            # device), and AdamW updates them in place, so every later arm would start from the
            # moments and step count the previous arm left.
            opt.load_state_dict(copy.deepcopy(checkpoint[1]))
            train(model, arm, opt, window)
            loss[arm].append(heldout_loss(tok, model.state_dict(), heldout))
            seconds[arm] += time.perf_counter() - t
        print(f"  branch {k}: " + ", ".join(f"{a} {loss[a][-1]:.4f}" for a in arms), flush=True)

    def paired(arm: str) -> tuple[float, float]:
        rel = [(a - b) / b for a, b in zip(loss[arm], loss["bf16"])]
        return statistics.mean(rel), statistics.stdev(rel) / math.sqrt(len(rel))

    print(f"\n{'arm':<18}{'held-out':>10}{'vs BF16':>10}{'± se':>9}{'s':>7}   (mean over "
          f"{args.branches} branches; paired, signed)")
    figures = {}
    for arm in arms:
        mean_loss = statistics.mean(loss[arm])
        if arm == "bf16":
            print(f"{arm:<18}{mean_loss:>10.4f}{'':>10}{'':>9}{seconds[arm]:>7.0f}")
            continue
        rel, se = paired(arm)
        figures[arm] = {"rel": round(rel, 6), "se": round(se, 6)}
        print(f"{arm:<18}{mean_loss:>10.4f}{rel:>+10.3%}{se:>9.3%}{seconds[arm]:>7.0f}")

    curves = {}
    for arm in ("bf16", "fp8"):   # from scratch, same init and data order, stable lr
        model = build(tok, arm)
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
        curves[arm] = []
        train(model, arm, opt, scratch, curves[arm])
    xs = list(range(1, len(scratch) + 1))
    png = plot_panels([("loss", {a: (xs, c) for a, c in curves.items()}),
                       ("fp8 - bf16", {"fp8": (xs, [a - b for a, b in zip(curves["fp8"],
                                                                           curves["bf16"])])})],
                      Path(args.png), title="FP8 vs BF16 from scratch, same init and data", cols=2)
    print(f"from-scratch curves ({len(scratch)} steps): {png}")
    return figures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base_steps", type=int, default=300)
    p.add_argument("--branches", type=int, default=20)
    p.add_argument("--branch_steps", type=int, default=15)
    p.add_argument("--heldout", type=int, default=16, help="held-out batches")
    p.add_argument("--scratch_steps", type=int, default=80)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--ablations", default=",".join(DEFAULT_ABLATIONS),
                   help=f"arms besides {', '.join(CORE)}, from: "
                        f"{', '.join(a for a in ARMS if a not in CORE)}")
    p.add_argument("--png", default=str(ROOT / "runs" / "bench" / "fp8_loss.png"))
    p.add_argument("--threads", type=int, default=int(os.environ.get("POSTTRAIN_THREADS", 2)))
    args = p.parse_args()
    if args.branches < 2:
        p.error("--branches must be at least 2 (a standard error needs two)")
    from posttrain import runtime
    runtime.configure(args.threads)
    runtime.quiet()
    start = time.time()
    gemm = gemm_table()
    ratio = accumulation_table()
    figures = branch_table(args)
    print(f"total {(time.time() - start) / 60:.1f} min")
    print(json.dumps({
        "fp8_vs_bf16_rel": figures["fp8"]["rel"], "fp8_vs_bf16_se": figures["fp8"]["se"],
        "fp32_vs_bf16_rel": figures["fp32"]["rel"], "fp32_vs_bf16_se": figures["fp32"]["se"],
        "branches": args.branches, "branch_steps": args.branch_steps,
        "train_hidden_size": WIDE["hidden_size"],
        "ablations": {a: f for a, f in figures.items() if a not in CORE},
        "gemm_calc_diff": round(gemm, 6), "accum_error_ratio": round(ratio, 1)}))


if __name__ == "__main__":
    main()
