"""A real pretrained model through the chain on CPU: SmolLM2-135M-Instruct, from its GGUF file.

base eval → cold-start SFT (recipes/smollm2-135m/sft.yaml) → GRPO with vLLM colocated
(recipes/smollm2-135m/grpo.yaml) → eval, every eval on eval/smollm2.yaml: 2-digit sums asked in
words (the trained task) and GSM8K (the real benchmark the model must not lose), R1's sampling.
pass@1 is the mean over each prompt's samples, with its standard error over prompts; a stage's
gain over the previous one also gets the standard error of the per-prompt difference (the same
prompts are scored at every stage).

The GRPO step is timed with each generation backend on equal work: two short runs from the SFT
model, one with vLLM generating and one with HF `generate`, same seed, prompts and settings, and
dynamic sampling off in both (the recipe's `mask` trains on the informative groups only, which
would make a step's work depend on its samples); a step's time is read off the stage's logs
(`elapsed_s`), its first step (warm-up: engine start, the first sync) left out.

Run: `python bench/real_model.py [--grpo_steps N] [--threads 2]` (`make real`).
Last line: `{"task", "base", "sft", "grpo" (each {task: {pass@1, pass@1_se, format_rate}} for the
trained task and gsm8k), "gains", "grpo_steps", "grpo_step_s_vllm", "grpo_step_s_hf",
"step_ratio", "minutes"}`.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._heldout import bench_workspace  # noqa: E402

SUITE = "eval/smollm2.yaml"
RECIPE = "recipes/smollm2-135m/grpo.yaml"
TASK = "arithmetic"


def per_prompt(run_dir: Path, label: str, task: str) -> list[float]:
    """Per-prompt pass@1 (mean over its samples) from the eval's sample dump."""
    path = run_dir / "eval" / label / f"smollm2.{task}.samples.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [statistics.mean(bool(s["correct"]) for s in r["samples"]) for r in rows]


def paired(before: list[float], after: list[float]) -> tuple[float, float]:
    """Mean per-prompt gain and its standard error."""
    diff = [b - a for a, b in zip(before, after)]
    return statistics.mean(diff), statistics.stdev(diff) / math.sqrt(len(diff))


def step_seconds(log: Path, skip: int = 1) -> tuple[float, float]:
    """Mean seconds per optimizer step after the first `skip` (warm-up), and the mean
    completion length over those steps."""
    recs = [json.loads(line) for line in log.read_text().splitlines()]
    recs = [r for r in recs if "elapsed_s" in r and "reward" in r]
    times = {r["step"]: r["elapsed_s"] for r in recs}
    steps = sorted(times)
    used = [s for s in steps if s > skip]
    seconds = (times[used[-1]] - times[skip]) / (len(used)) if used and skip in times else \
        times[steps[-1]] / len(steps)
    lengths = [r["completions/mean_length"] for r in recs if r["step"] > skip]
    return seconds, statistics.mean(lengths) if lengths else float("nan")


def figures(results: dict) -> dict:
    return {t: {k: round(m[k], 4) for k in ("pass@1", "pass@1_se", "format_rate")}
            for t, m in results.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sft_steps", type=int, default=12)
    ap.add_argument("--grpo_steps", type=int, default=None, help="default: the recipe's")
    ap.add_argument("--time_steps", type=int, default=3, help="steps of each timing run")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    start = time.time()
    work, _ = bench_workspace("real", args.threads)
    from posttrain.evaluate import eval_model, load_suite, local_path
    from posttrain.gguf_import import SMOLLM2
    from posttrain.manifest import Manifest
    from posttrain.runner import run_stage
    gsm8k = next(t for t in load_suite(SUITE).tasks if t.name == "gsm8k")
    if not local_path(gsm8k, load_suite(SUITE)).exists():
        sys.exit(f"GSM8K's test file not found at {local_path(gsm8k, load_suite(SUITE))}: set "
                 f"POSTTRAIN_DATA_DIR to the folder holding gsm8k/test.jsonl (no hub here)")
    run = "smol"
    m = Manifest(run)
    t = time.time()
    base_label, base = eval_model(m, SMOLLM2, SUITE, progress=False)
    print(f"[bench] base eval {time.time() - t:.0f}s: {figures(base)}", file=sys.stderr)
    t = time.time()
    run_stage("sft", "recipes/smollm2-135m/sft.yaml", run, {"max_steps": str(args.sft_steps)})
    sft = Manifest(run).stage("sft")["eval"]["smollm2"]
    print(f"[bench] sft + eval {time.time() - t:.0f}s: {figures(sft)}", file=sys.stderr)
    t = time.time()
    steps = {"max_steps": str(args.grpo_steps)} if args.grpo_steps else {}
    run_stage("grpo", RECIPE, run, steps)
    grpo_entry = Manifest(run).stage("grpo")
    grpo = grpo_entry["eval"]["smollm2"]
    grpo_steps = grpo_entry["plan"]["trainer"]["max_steps"]
    print(f"[bench] grpo (vLLM) + eval {time.time() - t:.0f}s: {figures(grpo)}", file=sys.stderr)
    run_dir = Manifest(run).run_dir
    timing = {}
    for backend, use_vllm in (("vllm", "true"), ("hf", "false")):
        t = time.time()
        run_stage("grpo", RECIPE, run, {
            "name": f"grpo_time_{backend}", "use_vllm": use_vllm, "dynamic_sampling": "false",
            "max_steps": str(args.time_steps), "save_steps": "1000", "eval_suite": "null"},
            eval_after=False)
        print(f"[bench] grpo timing ({backend}) {time.time() - t:.0f}s", file=sys.stderr)
        timing[backend] = step_seconds(run_dir / f"grpo_time_{backend}" / "logs.jsonl", skip=1)
    (vllm_s, vllm_len), (hf_s, hf_len) = timing["vllm"], timing["hf"]
    batch = grpo_entry["plan"]["trainer"]["per_device_train_batch_size"]

    gains = {}
    for name, (a, b) in {"sft": (base_label, "sft"), "grpo": ("sft", "grpo")}.items():
        for task in (TASK, "gsm8k"):
            g, se = paired(per_prompt(run_dir, a, task), per_prompt(run_dir, b, task))
            gains.setdefault(name, {})[task] = {"gain": round(g, 4), "se": round(se, 4)}

    rows = [("base", base), ("sft", sft), (f"grpo ({grpo_steps} steps)", grpo)]
    print(f"\nSmolLM2-135M-Instruct (GGUF Q4_1) on 2-digit sums in words ({TASK}) and GSM8K, "
          f"pass@1 ± se ({base[TASK]['n_samples']} samples per prompt)")
    print(f"{'stage':<18}{'task':<12}{'pass@1':>8}{'±se':>8}{'format':>8}{'gain':>9}{'±se':>8}")
    for name, res in rows:
        for task in (TASK, "gsm8k"):
            g = gains.get(name.split()[0], {}).get(task)
            print(f"{name:<18}{task:<12}{res[task]['pass@1']:>8.3f}{res[task]['pass@1_se']:>8.3f}"
                  f"{res[task]['format_rate']:>8.3f}"
                  + (f"{g['gain']:>+9.3f}{g['se']:>8.3f}" if g else ""))
    print(f"GRPO step (steps 2-{args.time_steps}, {batch} completions, all trained): "
          f"vLLM {vllm_s:.1f}s "
          f"(mean length {vllm_len:.1f}), HF generate {hf_s:.1f}s (mean length {hf_len:.1f}); "
          f"ratio {vllm_s / hf_s:.2f}")
    minutes = (time.time() - start) / 60
    print(f"total {minutes:.1f} min (work dir {work})")
    print(json.dumps({"task": TASK, "base": figures(base), "sft": figures(sft),
                      "grpo": figures(grpo), "gains": gains, "grpo_steps": grpo_steps,
                      "grpo_step_s_vllm": round(vllm_s, 2), "grpo_step_s_hf": round(hf_s, 2),
                      "step_ratio": round(vllm_s / hf_s, 3), "minutes": round(minutes, 1)}))


if __name__ == "__main__":
    main()
