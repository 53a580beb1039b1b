"""RL objective presets side by side: held-out pass@1 gain over the same cold-start SFT model.

Every preset of `posttrain.stages.objectives` trains the tiny world's policy from one SFT
checkpoint (built here: the demo's base and sft recipes), with the same prompts, rewards, batch
(`--prompts` x 8 completions), learning rate and number of optimizer steps, for each of
`--seeds` seeds; the only differences are what the preset sets. Two more arms isolate DAPO's
dynamic sampling: `dapo` as preset (refill) against `dapo` with `dynamic_sampling: mask`.

Reported per preset: the gain in held-out pass@1 (200 unseen 1-2 digit sums x 4 samples at
T=0.7, the demo's eval) over the SFT model, mean and standard deviation over seeds; completion
tokens generated in training (refill's extra rounds included); training wall time (noisy on a
shared machine: read it as a rough cost).

Run: `python bench/objectives.py [--steps 40] [--seeds 2] [--prompts 8]`.
Last line: `{"presets": {name: {"gain", "gain_std", "tokens", "seconds"}}, "dynamic_sampling":
{"refill_gain", "mask_gain", "refill_extra_generation"}, "steps", "seeds"}`
(`refill_extra_generation`: completions generated per step / the batch, minus 1).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._heldout import bench_workspace  # noqa: E402
from posttrain.stages.objectives import OBJECTIVES  # noqa: E402

# The demo's GRPO recipe without the keys a preset sets (so each preset's own values apply).
PRESET_KEYS = ("loss_type", "beta", "dynamic_sampling", "epsilon", "epsilon_high",
               "scale_rewards", "importance_sampling_level")


def logs_of(manifest, name: str) -> list[dict]:
    path = Path(manifest.stage(name)["output_dir"]).parent / "logs.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def generated_tokens(records: list[dict], batch: int) -> tuple[float, float]:
    """Completion tokens generated over training, and the mean generated/batch ratio. A record
    with completion figures is one generation of `batch` (the generation batch: with
    `steps_per_generation` > 1, several optimizer steps' worth) times its refill factor."""
    steps = [r for r in records if "completions/mean_length" in r]
    fracs = [r.get("dynamic_sampling/generated_frac", 1.0) for r in steps]
    tokens = sum(r["completions/mean_length"] * batch * f for r, f in zip(steps, fracs))
    return tokens, statistics.mean(fracs) if fracs else 1.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step (x 8 completions)")
    ap.add_argument("--presets", default=",".join(OBJECTIVES))
    ap.add_argument("--threads", type=int, default=int(os.environ.get("POSTTRAIN_THREADS", 2)))
    args = ap.parse_args()

    work, suite = bench_workspace("objectives", args.threads)
    from posttrain.evaluate import run_eval
    from posttrain.manifest import Manifest
    from posttrain.runner import run_stage

    recipe = yaml.safe_load((ROOT / "recipes/tiny/grpo.yaml").read_text())
    for key in PRESET_KEYS:
        recipe.pop(key, None)
    recipe_path = work / "grpo.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))
    run, batch = "bench", args.prompts * 8
    quiet = {"save_steps": "100000", "eval_suite": "null"}
    print(f"building the cold-start SFT model ({work})", flush=True)
    run_stage("base", "recipes/tiny/base.yaml", run, quiet, eval_after=False)
    run_stage("sft", "recipes/tiny/sft.yaml", run, quiet, eval_after=False)
    manifest = Manifest(run)
    base_p1 = run_eval(manifest, "sft", suite, progress=False)["arithmetic"]["pass@1"]
    print(f"sft held-out pass@1 {base_p1:.3f}", flush=True)

    arms = [(p, p, {}) for p in args.presets.split(",")]
    arms.append(("dapo_mask", "dapo", {"dynamic_sampling": "mask"}))
    results: dict[str, list[dict]] = {}
    for arm, preset, extra in arms:
        for seed in range(args.seeds):
            name = f"{arm}_s{seed}"
            over = {**quiet, "name": name, "objective": preset, "seed": str(seed),
                    "max_steps": str(args.steps), "per_device_train_batch_size": str(batch),
                    **extra}
            start = time.perf_counter()
            run_stage("grpo", str(recipe_path), run, over, eval_after=False)
            seconds = time.perf_counter() - start
            p1 = run_eval(Manifest(run), name, suite, progress=False)["arithmetic"]["pass@1"]
            plan = Manifest(run).stage(name)["plan"]["trainer"]
            generation_batch = batch * plan.get("steps_per_generation", 1)
            tokens, frac = generated_tokens(logs_of(Manifest(run), name), generation_batch)
            results.setdefault(arm, []).append({"gain": p1 - base_p1, "tokens": tokens,
                                                "seconds": seconds, "generated_frac": frac})
            print(f"  {name}: pass@1 {p1:.3f} (gain {p1 - base_p1:+.3f}), {tokens:.0f} tokens, "
                  f"{seconds:.0f}s", flush=True)

    def summary(rows: list[dict]) -> dict:
        gains = [r["gain"] for r in rows]
        return {"gain": round(statistics.mean(gains), 4),
                "gain_std": round(statistics.stdev(gains), 4) if len(gains) > 1 else 0.0,
                "tokens": round(statistics.mean(r["tokens"] for r in rows)),
                "seconds": round(statistics.mean(r["seconds"] for r in rows), 1)}

    table = {arm: summary(rows) for arm, rows in results.items()}
    print(f"\n{args.steps} optimizer steps x {batch} completions, {args.seeds} seeds, from SFT "
          f"pass@1 {base_p1:.3f}")
    print(f"{'preset':<14}{'gain':>8}{'±std':>8}{'tokens':>10}{'seconds':>9}")
    for arm, row in sorted(table.items(), key=lambda kv: -kv[1]["gain"]):
        print(f"{arm:<14}{row['gain']:>+8.3f}{row['gain_std']:>8.3f}{row['tokens']:>10}"
              f"{row['seconds']:>9.1f}")
    presets = {k: v for k, v in table.items() if k != "dapo_mask"}
    refill_extra = statistics.mean(r["generated_frac"] for r in results["dapo"]) - 1.0
    winner = max(presets, key=lambda k: presets[k]["gain"])
    print(f"winner at equal optimizer steps: {winner}; dynamic sampling: refill "
          f"{table['dapo']['gain']:+.3f} vs mask {table['dapo_mask']['gain']:+.3f}, refill "
          f"generated {refill_extra:+.1%} more completions")
    print(json.dumps({"presets": presets,
                      "dynamic_sampling": {"refill_gain": table["dapo"]["gain"],
                                           "mask_gain": table["dapo_mask"]["gain"],
                                           "refill_extra_generation": round(refill_extra, 4)},
                      "steps": args.steps, "seeds": args.seeds}))


if __name__ == "__main__":
    main()
