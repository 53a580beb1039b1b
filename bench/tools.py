"""Tool-integrated RL: the same student trained by GRPO with and without the `python` tool.

One cold-start model (recipes/tiny/tools_base.yaml, then tools_sft.yaml: 3-digit by 2-digit
products, half of the traces calling Python) is trained by GRPO (recipes/tiny/grpo_tools.yaml)
twice per seed, at equal optimizer steps: with the tool (each rollout its own sandboxed Python)
and with `tools: []` (the same recipe, no tool: products in its head). Each arm is scored on the
held-out products (eval/tiny_tools.yaml: 100 prompts x 4 samples), the tool arm with the tool,
the other without.

Reported: pass@1 of each arm (mean ± std over seeds), the share of the tool arm's eval samples
that called the tool, the sandbox's share of a tool-arm step's wall time (`tools/sandbox_s`
summed over the steps / the steps' time), and the step time with the tool / without.

Run: `python bench/tools.py [--steps 40] [--seeds 2] [--threads 2]`.
Last line: `{"with_tool": {"pass@1", "std"}, "without_tool": {"pass@1", "std"}, "tool_call_rate",
"sandbox_seconds_share", "step_time_ratio", "steps", "seeds"}`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._heldout import bench_workspace  # noqa: E402


def logs_of(run_dir: Path, name: str) -> list[dict]:
    path = run_dir / name / "logs.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def step_time(records: list[dict]) -> float:
    """Mean seconds per step after the first (warm-up), from the stage's log."""
    times = {r["step"]: r["elapsed_s"] for r in records if "elapsed_s" in r and "reward" in r}
    steps = sorted(times)
    return (times[steps[-1]] - times[steps[0]]) / (len(steps) - 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    start = time.time()
    work, _ = bench_workspace("tools", args.threads)
    from posttrain.evaluate import evaluate_model, load_suite
    from posttrain.manifest import Manifest
    from posttrain.runner import run_stage

    run = "tools"
    run_stage("base", "recipes/tiny/tools_base.yaml", run, {})
    run_stage("sft", "recipes/tiny/tools_sft.yaml", run, {"eval_suite": "null"}, eval_after=False)
    no_tool_suite = work / "no_tool.yaml"
    spec = yaml.safe_load((ROOT / "eval" / "tiny_tools.yaml").read_text())
    no_tool_suite.write_text(yaml.safe_dump({**spec, "tools": []}))
    arms: dict[str, list[dict]] = {"with_tool": [], "without_tool": []}
    for seed in range(args.seeds):
        for arm, tools, suite in (("with_tool", "[python]", "eval/tiny_tools.yaml"),
                                  ("without_tool", "[]", str(no_tool_suite))):
            name = f"{arm}_{seed}"
            t = time.time()
            run_stage("grpo", "recipes/tiny/grpo_tools.yaml", run,
                      {"name": name, "tools": tools, "seed": str(seed),
                       "max_steps": str(args.steps), "eval_suite": "null"}, eval_after=False)
            m = Manifest(run)
            results, _ = evaluate_model(m.resolve(name), load_suite(suite), progress=False)
            records = logs_of(m.run_dir, name)
            arms[arm].append({"pass@1": results["product"]["pass@1"],
                              "tool_use": results["product"].get("tool_use_rate", 0.0),
                              "step_s": step_time(records),
                              "sandbox_s": sum(r.get("tools/sandbox_s", 0.0) for r in records
                                               if "reward" in r),
                              "train_s": max(r["elapsed_s"] for r in records if "elapsed_s" in r)})
            print(f"[bench] {name}: pass@1 {arms[arm][-1]['pass@1']:.3f} "
                  f"({time.time() - t:.0f}s)", file=sys.stderr)

    def summary(arm: str) -> dict:
        xs = [a["pass@1"] for a in arms[arm]]
        return {"pass@1": round(statistics.mean(xs), 4),
                "std": round(statistics.stdev(xs), 4) if len(xs) > 1 else 0.0}

    with_tool, without = summary("with_tool"), summary("without_tool")
    share = sum(a["sandbox_s"] for a in arms["with_tool"]) / \
        sum(a["train_s"] for a in arms["with_tool"])
    ratio = statistics.mean(a["step_s"] for a in arms["with_tool"]) / \
        statistics.mean(a["step_s"] for a in arms["without_tool"])
    rate = statistics.mean(a["tool_use"] for a in arms["with_tool"])
    print(f"\nGRPO on 3-digit x 2-digit products, {args.steps} steps x 64 completions, "
          f"{args.seeds} seeds, from one cold start (held-out: 100 products x 4 samples)")
    print(f"{'arm':<14}{'pass@1':>8}{'±std':>8}{'per seed':>24}{'step s':>8}")
    for arm, s in (("with_tool", with_tool), ("without_tool", without)):
        seeds = " ".join(f"{a['pass@1']:.3f}" for a in arms[arm])
        step = statistics.mean(a["step_s"] for a in arms[arm])
        print(f"{arm:<14}{s['pass@1']:>8.3f}{s['std']:>8.3f}{seeds:>24}{step:>8.2f}")
    print(f"tool call rate (eval, with tool) {rate:.3f}; sandbox share of a step {share:.3f}; "
          f"step time with / without {ratio:.2f}; {(time.time() - start) / 60:.1f} min")
    print(json.dumps({"with_tool": with_tool, "without_tool": without,
                      "tool_call_rate": round(rate, 4), "sandbox_seconds_share": round(share, 4),
                      "step_time_ratio": round(ratio, 3), "steps": args.steps,
                      "seeds": args.seeds}))


if __name__ == "__main__":
    main()
