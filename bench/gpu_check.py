"""`make gpu-check`: what the CPU machines cannot check, in one script for a CUDA machine (<= 6 min
on one H200).

Checks, each timed and reported even when another fails (one that needs something absent, vLLM
on an offline image, is reported "skipped: why" and the others go on):
  fp8_gemm     cuBLAS blockwise-scaled FP8 GEMM (1x128 x 128x128) against the reference GEMM:
               calc_diff, and that an FP32 output is FP32 (not bf16)
  fp8_step     an FP8 Linear training step on the GPU: FP32 master weights, FP32 Wgrad, the
               loss within 1% of the same step in FP32
  fp32_master  a stage's model with `fp8` loads in FP32 on the GPU (bf16 without)
  hf_eval      HF generation and a suite eval on the GPU (the tiny world's arithmetic)
  grpo_hf      three GRPO steps with HF generation on a tiny Qwen2
  ema_overlap  the EMA's pinned, non-blocking snapshot: step time with and without the EMA
  vllm_greedy  vLLM (GPU) greedy completions equal to HF's, prompt for prompt
  grpo_vllm    three GRPO steps with `use_vllm: true`, `vllm_mode: colocate`

Prints a table and one JSON line (also written to `--out`); exits 1 when a check fails. Before
anything it imports what the checks need, and names a missing package in one line (exit 1).
Without CUDA it then says so in one line and exits 0, so `make gpu-check` is safe anywhere; where
`nvidia-smi` sees a GPU that torch does not, it says that and exits 1 (a CPU build of torch on a
GPU machine).

Run: `python bench/gpu_check.py [--out gpu_check.json]` (or `make gpu-check`); on an offline GPU
image, with the wheels of `bench/gpu_wheels.py` (the command it prints).
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


def check_fp8_gemm() -> tuple[bool, str]:
    from posttrain.fp8 import calc_diff, fp8_gemm, gemm_reference, quantize
    from posttrain.fp8.gemm import cuda_path_available
    from posttrain.fp8.quantize import WEIGHT_BLOCK
    if not cuda_path_available():
        return False, "cuBLAS blockwise scaled_mm unavailable or disagreeing (see the warning)"
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(512, 4096, device="cuda", generator=g)
    w = torch.randn(1024, 4096, device="cuda", generator=g)
    a, b = quantize(x), quantize(w, WEIGHT_BLOCK)
    got = fp8_gemm(a, b, torch.float32)
    diff_ref = calc_diff(got, gemm_reference(a, b))
    diff_fp32 = calc_diff(got, x @ w.t())
    ok = got.dtype == torch.float32 and diff_ref < 1e-5 and diff_fp32 < 1e-3
    return ok, f"calc_diff vs reference {diff_ref:.2e}, vs FP32 {diff_fp32:.2e}, out {got.dtype}"


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


def check_ema_overlap() -> tuple[bool, str]:
    from transformers import AutoModelForCausalLM

    from posttrain.ema import EMACallback, EMAConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen(), dtype=torch.float32).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (16, 256), device="cuda")
    ema = EMACallback(EMAConfig(0.999, 1), WORK / "ema")
    state = type("S", (), {"global_step": 0})()
    ema.on_train_begin(None, state, None, model=model)
    pinned = all(b.is_pinned() for b in ema._free.queue[0].values())

    def step(with_ema: bool) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        if with_ema:
            state.global_step += 1
            ema.on_step_end(None, state, None)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(3):
        step(False), step(True)
    times = {"without": [], "with": []}
    for r in range(10):
        for side in (("without", "with") if r % 2 == 0 else ("with", "without")):
            times[side].append(step(side == "with"))
    ema.wait()
    med = {k: statistics.median(v) for k, v in times.items()}
    overhead = med["with"] / med["without"] - 1
    return pinned and ema.updates > 0 and overhead < 0.10, (
        f"pinned buffers {pinned}; step {med['without'] * 1e3:.1f} ms -> {med['with'] * 1e3:.1f} ms "
        f"({overhead:+.1%}), {ema.updates} updates folded")


CHECKS = {"fp8_gemm": check_fp8_gemm, "fp8_step": check_fp8_step,
          "fp32_master": check_fp32_master, "hf_eval": check_hf_eval,
          "grpo_hf": check_grpo_hf, "ema_overlap": check_ema_overlap,
          "vllm_greedy": check_vllm_greedy, "grpo_vllm": check_grpo_vllm}
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
    from posttrain import runtime
    runtime.quiet()
    device = torch.cuda.get_device_name()
    print(f"gpu-check on {device} (capability "
          f"{'.'.join(map(str, torch.cuda.get_device_capability()))}), torch {torch.__version__}",
          flush=True)
    results = {}
    for name, check in CHECKS.items():
        start = time.perf_counter()
        try:
            ok, detail = check()
            status = "ok" if ok else "FAIL"
        except Skipped as e:
            status, detail = "skipped", str(e)
        except Exception as e:  # noqa: BLE001 - a failing check is reported, the others still run
            status, detail = "FAIL", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            traceback.print_exc(file=sys.stderr)
        results[name] = {"status": status, "detail": detail,
                         "seconds": round(time.perf_counter() - start, 1)}
        print(f"  {name}: {status} ({detail})", flush=True)
    print(f"\n{'check':<14}{'result':<9}{'s':>7}  detail")
    for name, r in results.items():
        print(f"{name:<14}{r['status']:<9}{r['seconds']:>7.1f}  {r['detail']}")
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
