"""`make demo`'s chain over several seeds: does each stage's effect hold beyond the seed?

Runs `python -m posttrain.demo --run demo-seed<N> --seed N` once per seed (a run already done is
read back, not rerun), then prints each stage's arithmetic pass@1 per seed with its mean and
spread (min–max), and GRPO's gain over SFT per seed. Seed 42 is the recipes' own: its table is
`make demo`'s.

Run: `python bench/demo_seeds.py [--seeds 42,1,2]`. Last line: `{"seeds", "pass@1": {stage:
{seed: value}}, "mean": {stage: value}, "spread": {stage: [min, max]}, "grpo_gain": {seed:
value}, "minutes": {seed: value}}`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SUITE, TASK = "tiny", "arithmetic"


def run_seed(seed: int) -> float:
    """Run (or resume) the chain with `seed`; its wall minutes."""
    start = time.time()
    subprocess.run([sys.executable, "-m", "posttrain.demo", "--run", f"demo-seed{seed}",
                    "--seed", str(seed)], cwd=ROOT, check=True, env=os.environ.copy())
    return (time.time() - start) / 60


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="42,1,2")
    args = p.parse_args()
    from posttrain.demo import CHAIN, stage_name
    from posttrain.manifest import Manifest

    seeds = [int(s) for s in args.seeds.split(",")]
    minutes = {seed: round(run_seed(seed), 2) for seed in seeds}
    names = [stage_name(recipe) for _, recipe in CHAIN]
    figures: dict[str, dict[int, float]] = {}
    for seed in seeds:
        m = Manifest(f"demo-seed{seed}")
        for name in names:
            value = ((m.stage(name).get("eval") or {}).get(SUITE) or {}).get(TASK)
            if value is not None:
                figures.setdefault(name, {})[seed] = value["pass@1"]
    gain = {seed: round(figures["grpo"][seed] - figures["sft"][seed], 3) for seed in seeds}
    print(f"{'stage':<15}" + "".join(f"{'seed ' + str(s):>10}" for s in seeds)
          + f"{'mean':>8}{'spread':>15}")
    for name, by_seed in figures.items():
        values = [by_seed[s] for s in seeds if s in by_seed]
        print(f"{name:<15}" + "".join(f"{by_seed.get(s, float('nan')):>10.3f}" for s in seeds)
              + f"{statistics.mean(values):>8.3f}{f'{min(values):.3f}–{max(values):.3f}':>15}")
    print(f"{'grpo − sft':<15}" + "".join(f"{gain[s]:>+10.3f}" for s in seeds))
    print(f"{'minutes':<15}" + "".join(f"{minutes[s]:>10.1f}" for s in seeds))
    print(json.dumps({
        "seeds": seeds,
        "pass@1": {n: {str(s): round(v, 3) for s, v in b.items()} for n, b in figures.items()},
        "mean": {n: round(statistics.mean(b.values()), 3) for n, b in figures.items()},
        "spread": {n: [round(min(b.values()), 3), round(max(b.values()), 3)]
                   for n, b in figures.items()},
        "grpo_gain": {str(s): g for s, g in gain.items()},
        "minutes": {str(s): m for s, m in minutes.items()}}))


if __name__ == "__main__":
    main()
