"""`make gpu-check`: what the CPU machines cannot check, in one script for a CUDA machine (<= 6 min
on one H200).

Checks, each timed and reported with its target even when another fails (one that needs
something absent, vLLM on an offline image, is reported "skipped: why" and the others go on):
  fp8_gemm       cuBLAS blockwise FP8 GEMM against the reference GEMM for all three operand
                 pairs (Fprop, Dgrad, Wgrad) at shapes that need every padding rule, FP32 out;
                 the fused quantize kernels bit-equal to the reference at full size
  fp8_widths     FP8Linear forward + backward at widths that need padding (11008, 8960, 576, 90):
                 every GEMM on cuBLAS, y, dx, dW within calc_diff 1e-3 of FP32
  fp8_step       an FP8 MLP training step: FP32 master weights and grads, loss within 1% of FP32
  fp8_gemm_speed FP8 GEMM (cuBLAS) vs BF16 matmul TFLOP/s at 8192³ and 4096x7168x18432
  fp8_quantize   quantizing both operands (activation tiles + transposed copy, weight blocks +
                 transposed copy) as a share of the FP8 GEMM at the same two shapes
  fp8_mlp_4096   MLP training step 4096->14336->4096, 8192 tokens, FP32 master weights both:
                 FP8 step time / BF16-autocast step time
  fp8_mlp_1536   the same at 1536->8960->1536
  fp8_moe        MoE experts step (16 experts 7168->2048, top-4, 8192 tokens): FP8 grouped GEMMs
                 vs transformers' BF16 experts (grouped_mm) under autocast
  fp8_fallbacks  no FP8 op ran the reference on the GPU during the checks above
  fp32_master    a stage's model with `fp8` loads in FP32 on the GPU (bf16 without)
  hf_eval        HF generation and a suite eval on the GPU (the tiny world's arithmetic)
  grpo_hf        three GRPO steps with HF generation on a tiny Qwen2
  ema_1b         the EMA callback on a 1.1B-parameter Llama training step (bf16 autocast, FP32
                 master weights, fused AdamW): step time with and without
  vllm_greedy    vLLM (GPU) greedy completions equal to HF's, prompt for prompt
  grpo_vllm      three GRPO steps with `use_vllm: true`, `vllm_mode: colocate`

Prints a table and one JSON line (also written to `--out`); exits 1 when a check fails. Before
anything it imports what the checks need, and names a missing package in one line (exit 1).
Without CUDA it then says so in one line and exits 0, so `make gpu-check` is safe anywhere; where
`nvidia-smi` sees a GPU that torch does not, it says that and exits 1 (a CPU build of torch on a
GPU machine). Packages carried onto an offline image must sit under a path with `site-packages`
in it: dill (datasets' hashing) pickles a module from anywhere else by value, which breaks
datasets' map; the check says so in one line (exit 1) instead of failing inside GRPO.

Run: `python bench/gpu_check.py [--out gpu_check.json]` (or `make gpu-check`); on an offline GPU
image, with only the wheels the image lacks (trl, datasets and what it needs beyond the image,
math-verify), installed where dill treats them as installed packages:

    python3 -m pip install --no-index --no-deps --target .gpu_deps/lib/site-packages WHEELS \
      && PYTHONPATH=.gpu_deps/lib/site-packages:. python3 bench/gpu_check.py --out $OUT/gpu_check.json
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

WORK = Path(tempfile.mkdtemp(prefix="posttrain-gpu-check-"))
PROMPTS = [f"What is {a}+{b}?" for a, b in [(3, 4), (12, 30), (7, 8), (45, 21), (9, 9), (60, 3)]]


def tiny_qwen(name: str = "qwen") -> Path:
    """A tiny Qwen2 with the tiny world's tokenizer (8 heads of 64: every backend's kernels)."""
    out = WORK / name
    if out.exists():
        return out
    from posttrain.data import task_rows
    from posttrain.models import build_tiny_model, train_tokenizer
    rows = task_rows({"task": "arithmetic", "n": 500, "digits": [1, 2]}, 0)
    tok = train_tokenizer([f"{r['prompt']} {r['trace']} {r['answer']}" for r in rows], out)
    build_tiny_model("qwen2", tok, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                     num_attention_heads=8, num_key_value_heads=2).save_pretrained(out)
    return out


def _median_ms(fn, reps: int = 10, warmup: int = 2) -> float:
    """Median GPU time of `fn()` in ms (CUDA events)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _paired_ms(first, second, reps: int = 10) -> tuple[float, float]:
    """Median wall ms of two step functions, interleaved (each warmed up first)."""
    times: tuple[list, list] = ([], [])
    for r in range(reps + 2):
        for i in ((0, 1) if r % 2 == 0 else (1, 0)):
            torch.cuda.synchronize()
            start = time.perf_counter()
            (first, second)[i]()
            torch.cuda.synchronize()
            if r >= 2:
                times[i].append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[0]), statistics.median(times[1])


def _fallbacks_since(before: set[str]) -> str:
    from posttrain.fp8 import backend
    new = [f"{k}: {v}" for k, v in backend.FALLBACKS.items() if k not in before]
    return f"; FELL BACK to the reference: {'; '.join(new)}" if new else ""


def check_fp8_gemm() -> tuple[bool, str]:
    from posttrain.fp8 import backend, calc_diff, fp8_gemm, gemm_reference, quantize
    from posttrain.fp8.cast import quantize_blocks, quantize_tiles
    from posttrain.fp8.quantize import TILE, WEIGHT_BLOCK
    before = set(backend.FALLBACKS)
    g = torch.Generator(device="cuda").manual_seed(0)
    worst, ok_dtype = 0.0, True
    # Fprop and Dgrad of a 1536->11008 layer on 1000 tokens (86 K-blocks; rows not of 16) and
    # Wgrad (1x128 x 1x128 along the tokens) of a 90-wide output.
    for (m, k, n), b_block in [((1000, 1536, 11008), WEIGHT_BLOCK),
                               ((1000, 11008, 1536), WEIGHT_BLOCK), ((90, 1000, 1536), TILE)]:
        x = torch.randn(m, k, device="cuda", generator=g)
        w = torch.randn(n, k, device="cuda", generator=g)
        a, b = quantize(x, TILE, True), quantize(w, b_block, True)
        got = fp8_gemm(a, b, torch.float32, name=f"check {m}x{k}x{n}")
        worst = max(worst, calc_diff(got, gemm_reference(a, b)))
        ok_dtype = ok_dtype and got.dtype == torch.float32
    x = torch.randn(8192, 4096, device="cuda", generator=g).to(torch.bfloat16)
    w = torch.randn(4096, 4096, device="cuda", generator=g)
    rows, cols = quantize_tiles(x, True, True, True)
    blocks, blocks_t = quantize_blocks(w, True, True)
    exact = all(torch.equal(got.dequantize(), want.dequantize()) for got, want in [
        (rows, quantize(x, TILE, True)), (cols, quantize(x.t(), TILE, True)),
        (blocks, quantize(w, WEIGHT_BLOCK, True)), (blocks_t, quantize(w.t(), WEIGHT_BLOCK, True))])
    fell = _fallbacks_since(before)
    return worst < 1e-5 and ok_dtype and exact and not fell, (
        f"worst calc_diff vs reference {worst:.1e} over Fprop/Dgrad/Wgrad pairs, FP32 out "
        f"{ok_dtype}; quantize kernels equal the reference at 8192x4096: {exact}{fell}")


def check_fp8_widths() -> tuple[bool, str]:
    from posttrain.fp8 import FP8Linear, backend, calc_diff
    before = set(backend.FALLBACKS)
    worst = 0.0
    for d_in, d_out in [(4096, 11008), (1536, 8960), (8960, 1536), (7168, 576), (200, 90)]:
        torch.manual_seed(0)
        ref = torch.nn.Linear(d_in, d_out, bias=False).cuda()
        fp8 = FP8Linear.from_linear(torch.nn.Linear(d_in, d_out, bias=False).cuda())
        fp8.weight = torch.nn.Parameter(ref.weight.detach().clone())
        x = torch.randn(1000, d_in, device="cuda", requires_grad=True)
        x_ref = x.detach().clone().requires_grad_()
        g = torch.randn(1000, d_out, device="cuda")
        y, y_ref = fp8(x), ref(x_ref)
        y.backward(g)
        y_ref.backward(g)
        worst = max(worst, calc_diff(y, y_ref), calc_diff(x.grad, x_ref.grad),
                    calc_diff(fp8.weight.grad, ref.weight.grad))
    fell = _fallbacks_since(before)
    return worst < 1e-3 and not fell, (
        f"widths 11008, 8960, 576, 90 on 1000 tokens: worst calc_diff vs FP32 over y, dx, dW "
        f"{worst:.1e}{fell or '; every GEMM on cuBLAS'}")


def check_fp8_step() -> tuple[bool, str]:
    from posttrain.fp8 import convert_to_fp8

    def step(fp8: bool) -> tuple[float, torch.nn.Module]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(1024, 2048), torch.nn.GELU(),
                                    torch.nn.Linear(2048, 1024)).cuda()
        if fp8:
            convert_to_fp8(model)
        x = torch.randn(256, 1024, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
        loss = (model(x) - x).pow(2).mean()
        loss.backward()
        torch.optim.AdamW(model.parameters(), lr=1e-3).step()
        return float(loss), model

    ref, _ = step(False)
    got, model = step(True)
    dtypes = {p.dtype for p in model.parameters()} | {p.grad.dtype for p in model.parameters()}
    rel = abs(got - ref) / ref
    ok = dtypes == {torch.float32} and rel < 0.01
    return ok, f"loss rel. diff {rel:.3%}; weights and grads {sorted(map(str, dtypes))}"


GEMM_SHAPES = [(8192, 8192, 8192), (4096, 7168, 18432)]   # M x K x N


_gemm_times: dict[tuple[int, int, int], dict[str, float]] = {}


def gemm_times(m: int, k: int, n: int) -> dict[str, float]:
    """Median ms of the FP8 GEMM (cuBLAS, operands quantized), the BF16 matmul, and quantizing
    the activation (bf16, with its transposed copy) and the FP32 weight (with its transpose's
    blocks), at one M x K x N; measured once for the two checks that read them."""
    from posttrain.fp8 import fp8_gemm
    from posttrain.fp8.cast import quantize_blocks, quantize_tiles
    if (m, k, n) not in _gemm_times:
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
        w = torch.randn(n, k, device="cuda", generator=g)
        wb = w.to(torch.bfloat16)
        a, _ = quantize_tiles(x, True)
        b, _ = quantize_blocks(w, True)
        _gemm_times[m, k, n] = {
            "fp8": _median_ms(lambda: fp8_gemm(a, b, torch.bfloat16)),
            "bf16": _median_ms(lambda: x @ wb.t()),
            "act": _median_ms(lambda: quantize_tiles(x, True, True, True)),
            "weight": _median_ms(lambda: quantize_blocks(w, True, True))}
    return _gemm_times[m, k, n]


def check_fp8_gemm_speed() -> tuple[bool, str, dict]:
    figures, parts = {}, []
    for m, k, n in GEMM_SHAPES:
        t = gemm_times(m, k, n)
        tf = {p: 2 * m * n * k / (t[p] * 1e-3) / 1e12 for p in ("fp8", "bf16")}
        figures[f"{m}x{k}x{n}"] = {"fp8_tflops": round(tf["fp8"]), "bf16_tflops": round(tf["bf16"])}
        parts.append(f"{m}x{k}x{n}: {tf['fp8']:.0f} vs {tf['bf16']:.0f} TFLOP/s "
                     f"({tf['fp8'] / tf['bf16']:.2f}x)")
    ok = all(f["fp8_tflops"] >= 1.4 * f["bf16_tflops"] for f in figures.values())
    return ok, "; ".join(parts), figures


def check_fp8_quantize() -> tuple[bool, str, dict]:
    figures, parts = {}, []
    for m, k, n in GEMM_SHAPES:
        t = gemm_times(m, k, n)
        share = (t["act"] + t["weight"]) / t["fp8"]
        figures[f"{m}x{k}x{n}"] = {"share": round(share, 3), "act_ms": round(t["act"], 3),
                                   "weight_ms": round(t["weight"], 3), "gemm_ms": round(t["fp8"], 3)}
        parts.append(f"{m}x{k}x{n}: {share:.0%} (activation + its transpose {t['act']:.3f} ms, "
                     f"weight + its transpose {t['weight']:.3f} ms, GEMM {t['fp8']:.3f} ms)")
    return all(f["share"] <= 0.25 for f in figures.values()), "; ".join(parts), figures


def _mlp_ratio(d: int, f: int, limit: float, tokens: int = 8192) -> tuple[bool, str, dict]:
    """FP8 / BF16-autocast step time of an MLP d->f->d, FP32 master weights on both sides."""
    from posttrain.fp8 import backend, convert_to_fp8
    before = set(backend.FALLBACKS)

    def make(fp8: bool):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(d, f, bias=False), torch.nn.GELU(),
                                    torch.nn.Linear(f, d, bias=False)).cuda()
        if fp8:
            convert_to_fp8(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
        x = torch.randn(tokens, d, device="cuda", requires_grad=True)   # inside a network: Dgrad

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(x).float().pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            x.grad = None
        return step

    fp8_ms, bf16_ms = _paired_ms(make(True), make(False))
    ratio = fp8_ms / bf16_ms
    fell = _fallbacks_since(before)
    return ratio <= limit and not fell, (
        f"{d}->{f}->{d}, {tokens} tokens: FP8 {fp8_ms:.2f} ms vs BF16 {bf16_ms:.2f} ms "
        f"({ratio:.2f}){fell}"), {"fp8_ms": round(fp8_ms, 2), "bf16_ms": round(bf16_ms, 2),
                                   "ratio": round(ratio, 3)}


def check_fp8_mlp_4096() -> tuple[bool, str, dict]:
    return _mlp_ratio(4096, 14336, 0.8)


def check_fp8_mlp_1536() -> tuple[bool, str, dict]:
    return _mlp_ratio(1536, 8960, 1.0)


def check_fp8_moe() -> tuple[bool, str, dict]:
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Experts

    from posttrain.fp8 import FP8Experts, backend
    before = set(backend.FALLBACKS)
    tokens, hidden, inter, n_experts, top_k = 8192, 7168, 2048, 16, 4
    cfg = DeepseekV3Config(hidden_size=hidden, moe_intermediate_size=inter,
                           n_routed_experts=n_experts, num_experts_per_tok=top_k)
    g = torch.Generator(device="cuda").manual_seed(0)
    index = torch.rand(tokens, n_experts, device="cuda", generator=g).topk(top_k).indices
    weights = torch.rand(tokens, top_k, device="cuda", generator=g)
    x = torch.randn(tokens, hidden, device="cuda", generator=g).requires_grad_()
    with torch.device("cuda"):
        experts = DeepseekV3Experts(cfg)
    torch.nn.init.normal_(experts.gate_up_proj, std=hidden ** -0.5)
    torch.nn.init.normal_(experts.down_proj, std=inter ** -0.5)
    # The BF16 side as transformers runs it at its fastest: torch's grouped GEMM over experts.
    baseline = "grouped_mm"
    try:
        cfg._experts_implementation = baseline
        with torch.autocast("cuda", dtype=torch.bfloat16), torch.no_grad():
            experts(x[:256].detach(), index[:256], weights[:256])
    except Exception as e:  # noqa: BLE001 - said in the detail: the baseline that ran instead
        baseline = f"eager; grouped_mm failed: {type(e).__name__}"
        cfg._experts_implementation = "eager"

    def make(module):
        opt = torch.optim.AdamW(experts.parameters(), lr=1e-5, fused=True)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = module(x, index, weights).float().pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            x.grad = None
        return step

    fp8_ms, bf16_ms = _paired_ms(make(FP8Experts(experts)), make(experts), reps=6)
    ratio = fp8_ms / bf16_ms
    fell = _fallbacks_since(before)
    return ratio <= 1.0 and not fell, (
        f"{n_experts} experts {hidden}->{inter}, top-{top_k}, {tokens} tokens: FP8 {fp8_ms:.1f} ms "
        f"vs BF16 ({baseline}) {bf16_ms:.1f} ms ({ratio:.2f}){fell}"), {
        "fp8_ms": round(fp8_ms, 2), "bf16_ms": round(bf16_ms, 2), "ratio": round(ratio, 3),
        "baseline": baseline}


def check_fp8_fallbacks() -> tuple[bool, str]:
    from posttrain.fp8 import backend
    if backend.FALLBACKS:
        return False, "; ".join(f"{k}: {v}" for k, v in backend.FALLBACKS.items())
    return True, "every FP8 GEMM and quantization ran on its GPU kernel"


def check_fp32_master() -> tuple[bool, str]:
    from types import SimpleNamespace

    from posttrain.stages.training import load_trainable
    path = str(tiny_qwen())
    fp8 = next(load_trainable(path, SimpleNamespace(fp8=True)).parameters()).dtype
    plain = next(load_trainable(path, SimpleNamespace(fp8=False)).parameters()).dtype
    return fp8 == torch.float32 and plain == torch.bfloat16, f"fp8: {fp8}, without: {plain}"


def check_hf_eval() -> tuple[bool, str]:
    from posttrain.evaluate import evaluate_model, load_suite
    suite = load_suite(ROOT / "eval" / "tiny.yaml")
    start = time.perf_counter()
    results, _ = evaluate_model(str(tiny_qwen()), suite, backend="hf", progress=False)
    seconds = time.perf_counter() - start
    figures = results["arithmetic"]
    ok = figures["n_prompts"] > 0 and 0 <= figures["pass@1"] <= 1 and figures["mean_tokens"] > 0
    return ok, (f"{figures['n_prompts']} prompts x {figures['n_samples']} in {seconds:.1f}s, "
                f"mean {figures['mean_tokens']:.1f} tokens")


def check_vllm_greedy() -> tuple[bool, str]:
    from posttrain.data import prompt_messages
    from posttrain.rollout import Sampling, generate, vllm_backend
    if not vllm_backend.available():
        raise Skipped("vLLM is not installed (pip install 'posttrain[vllm]')")
    model = str(tiny_qwen())
    prompts = [prompt_messages(p, None) for p in PROMPTS]
    greedy = Sampling(n=1, temperature=0.0, max_new_tokens=32, seed=0)
    hf = generate(model, prompts, greedy, backend="hf", progress=False, cache=False)
    vl = generate(model, prompts, greedy, backend="vllm", progress=False, cache=False)
    vllm_backend.close_engines()
    same = sum(a[0].text == b[0].text for a, b in zip(hf, vl))
    return same == len(prompts), f"{same}/{len(prompts)} greedy completions identical"


class Skipped(Exception):
    """A check that cannot run here, and why (reported, not failed)."""


def _grpo(name: str, vllm: bool) -> tuple[bool, str]:
    from posttrain.manifest import Manifest
    from posttrain.runner import run_stage
    os.environ["POSTTRAIN_RUNS_DIR"] = str(WORK / "runs")
    extra = {"use_vllm": "true", "vllm_mode": "colocate",
             "vllm_gpu_memory_utilization": "0.2"} if vllm else {"use_vllm": "false"}
    start = time.perf_counter()
    entry = run_stage("grpo", str(ROOT / "recipes/tiny/grpo.yaml"), "gpu",
                      {"name": name, "init_from": str(tiny_qwen()), **extra, "max_steps": "3",
                       "per_device_train_batch_size": "16", "num_generations": "4",
                       "objective": "grpo", "steps_per_generation": "1", "eval_suite": "null",
                       "save_steps": "1000"}, eval_after=False)
    logs = [json.loads(line) for line in
            (Manifest("gpu").stage_dir(name) / "logs.jsonl").read_text().splitlines()]
    steps = max(r.get("step", 0) for r in logs)
    return entry["status"] == "done" and steps == 3, (
        f"{steps} steps in {time.perf_counter() - start:.0f}s, status {entry['status']}")


def check_grpo_hf() -> tuple[bool, str]:
    return _grpo("grpo_hf", vllm=False)


def check_grpo_vllm() -> tuple[bool, str]:
    from posttrain.rollout import vllm_backend
    if not vllm_backend.available():
        raise Skipped("vLLM is not installed (it does not fit a 64 MiB wheel folder)")
    return _grpo("grpo_vllm", vllm=True)


def check_ema_1b() -> tuple[bool, str, dict]:
    """The EMA callback driven as the Trainer drives it, on a model of the size users train."""
    from transformers import (
        AutoModelForCausalLM,
        LlamaConfig,
        TrainerControl,
        TrainerState,
        TrainingArguments,
    )

    from posttrain.ema import EMACallback, EMAConfig

    cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4, vocab_size=32000)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    ids = torch.randint(0, cfg.vocab_size, (8, 1024), device="cuda")
    args = TrainingArguments(output_dir=str(WORK / "ema_args"), report_to=[])
    state, control = TrainerState(), TrainerControl()
    ema = EMACallback(EMAConfig(), WORK / "ema")
    ema.on_train_begin(args, state, control, model=model)

    def step(with_ema: bool):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if with_ema:
            ema.on_pre_optimizer_step(args, state, control)
        opt.step()
        if with_ema:
            ema.on_optimizer_step(args, state, control)
        opt.zero_grad(set_to_none=True)
        if with_ema:
            state.global_step += 1
            ema.on_step_end(args, state, control)

    without, with_ema = _paired_ms(lambda: step(False), lambda: step(True), reps=10)
    ema.wait()
    overhead = with_ema / without - 1
    stats = ema.stats() if hasattr(ema, "stats") else {"updates": ema.updates}
    return overhead <= 0.02 and ema.updates > 0, (
        f"{params / 1e9:.2f}B params, 8x1024 tokens: step {without:.0f} ms -> {with_ema:.0f} ms "
        f"({overhead:+.1%}); {stats}"), {"overhead": round(overhead, 4), **stats}


CHECKS = {"fp8_gemm": check_fp8_gemm, "fp8_widths": check_fp8_widths,
          "fp8_step": check_fp8_step, "fp8_gemm_speed": check_fp8_gemm_speed,
          "fp8_quantize": check_fp8_quantize, "fp8_mlp_4096": check_fp8_mlp_4096,
          "fp8_mlp_1536": check_fp8_mlp_1536, "fp8_moe": check_fp8_moe,
          "fp8_fallbacks": check_fp8_fallbacks, "fp32_master": check_fp32_master,
          "hf_eval": check_hf_eval, "grpo_hf": check_grpo_hf, "ema_1b": check_ema_1b,
          "vllm_greedy": check_vllm_greedy, "grpo_vllm": check_grpo_vllm}
TARGETS = {"fp8_gemm": "calc_diff < 1e-5", "fp8_widths": "calc_diff < 1e-3, cuBLAS",
           "fp8_step": "loss within 1%", "fp8_gemm_speed": "FP8 >= 1.4x BF16",
           "fp8_quantize": "<= 25% of GEMM", "fp8_mlp_4096": "FP8/BF16 <= 0.8",
           "fp8_mlp_1536": "FP8/BF16 <= 1.0", "fp8_moe": "FP8/BF16 <= 1.0",
           "fp8_fallbacks": "none", "ema_1b": "<= +2%"}
# What the checks import: a missing one is named before anything runs.
NEEDS = ("posttrain.fp8", "posttrain.ema", "posttrain.evaluate", "posttrain.stages.grpo",
         "posttrain.stages.sft", "trl", "datasets", "math_verify", "peft", "accelerate")


def missing_imports() -> list[str]:
    """The modules of NEEDS that do not import here, each with the missing package."""
    import importlib
    missing = []
    for name in NEEDS:
        try:
            importlib.import_module(name)
        except ImportError as e:
            missing.append(f"{name} ({e.name or e})")
    return missing


def gpu_seen_by_driver() -> bool:
    """Whether `nvidia-smi` lists a GPU (a machine with CUDA, whatever torch says)."""
    import shutil
    import subprocess
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


# Carried onto an offline image (what it lacks): dill must count them as installed packages.
CARRIED = ("trl", "datasets", "math_verify", "dill", "multiprocess")


def pickled_by_value() -> list[str]:
    """The carried packages that dill would pickle by value: by dill's own rule
    (`_is_builtin_module`), a module counts as installed only if its file is under the
    interpreter's prefixes or has `site-packages` in its path."""
    import importlib
    prefixes = {os.path.realpath(getattr(sys, n)) for n in
                ("base_prefix", "base_exec_prefix", "exec_prefix", "prefix") if hasattr(sys, n)}
    bad = []
    for name in CARRIED:
        try:
            path = importlib.import_module(name).__file__ or ""
        except ImportError:
            continue
        real = os.path.realpath(path)
        if "site-packages" not in path and not any(real.startswith(p) for p in prefixes):
            bad.append(f"{name} ({Path(path).parent.parent})")
    return bad


def main(argv: list[str] | None = None) -> int:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "runs" / "gpu_check.json"),
                    help="where the JSON line is written too")
    args = ap.parse_args(argv)
    missing = missing_imports()
    if missing:
        print(f"gpu-check: cannot import {', '.join(missing)}; install the project "
              f"(make install) or, offline, the wheels of bench/gpu_wheels.py")
        return 1
    if not torch.cuda.is_available():
        if gpu_seen_by_driver():
            print(f"gpu-check: nvidia-smi sees a GPU but torch {torch.__version__} has no CUDA "
                  f"(a CPU build): reinstall with `make install GPU=1`")
            return 1
        print("gpu-check: no CUDA device on this machine; nothing to check here (run it on a GPU)")
        return 0
    by_value = pickled_by_value()
    if by_value:
        print(f"gpu-check: {', '.join(by_value)} not under a 'site-packages' path: dill pickles "
              f"such modules by value and datasets' map breaks; install the wheels with "
              f"`pip install --target .gpu_deps/lib/site-packages` and PYTHONPATH=.gpu_deps/lib/"
              f"site-packages:.")
        return 1
    from posttrain import runtime
    runtime.quiet()
    device = torch.cuda.get_device_name()
    print(f"gpu-check on {device} (capability "
          f"{'.'.join(map(str, torch.cuda.get_device_capability()))}), torch {torch.__version__}",
          flush=True)
    results = {}
    for name, check in CHECKS.items():
        start = time.perf_counter()
        figures = {}
        try:
            ok, detail, *more = check()
            figures = more[0] if more else {}
            status = "ok" if ok else "FAIL"
        except Skipped as e:
            status, detail = "skipped", str(e)
        except Exception as e:  # noqa: BLE001 - a failing check is reported, the others still run
            status, detail = "FAIL", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            traceback.print_exc(file=sys.stderr)
        torch.cuda.empty_cache()   # what a check built is gone; the next starts with the memory
        results[name] = {"status": status, "target": TARGETS.get(name, ""), "detail": detail,
                         "seconds": round(time.perf_counter() - start, 1), **figures}
        print(f"  {name}: {status} ({detail})", flush=True)
    print(f"\n{'check':<16}{'result':<9}{'target':<26}{'s':>7}  detail")
    for name, r in results.items():
        print(f"{name:<16}{r['status']:<9}{r['target']:<26}{r['seconds']:>7.1f}  {r['detail']}")
    line = json.dumps({"device": device, "torch": torch.__version__,
                       "passed": sum(r["status"] == "ok" for r in results.values()),
                       "skipped": sum(r["status"] == "skipped" for r in results.values()),
                       "checks": results})
    print(line)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(line + "\n")
    return 0 if all(r["status"] != "FAIL" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
