"""Expert load with DeepSeek-V3's auxiliary-loss-free bias update on vs off, and the sequence-wise
balance loss on its own, side by side on the tiny MoE.

The same SFT stage from the same base, seed and data runs three times, differing only in
`moe_balance`: off `{gamma: 0, alpha: 0}` (load only logged); bias only `{gamma: G, alpha: 0}` at
the paper's update rate G = 0.001 by default; sequence-wise loss only `{gamma: 0, alpha: A}` at
the paper's A = 0.0001. The figure is max/mean routed tokens per expert, per MoE layer, averaged
over the last half of the steps and over layers (1.0 = perfectly even).

Run: `python bench/moe_balance.py [--steps 300] [--gamma 0.001] [--alpha 0.0001]`. Last line:
`{"max_mean_load_bias_on", "max_mean_load_bias_off", "update_rate", "max_mean_load_seqwise_only",
"seqwise_alpha"}`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def loads(stage_dir: Path) -> list[list[float]]:
    return [json.loads(line)["max_mean_load"]
            for line in (stage_dir / "moe_load.jsonl").read_text().splitlines()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--gamma", type=float, default=0.001, help="bias update rate (paper: 0.001)")
    p.add_argument("--alpha", type=float, default=0.0001, help="sequence-wise loss (paper: 1e-4)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("POSTTRAIN_THREADS", 2)))
    args = p.parse_args()
    from posttrain import runtime
    from posttrain.runner import run_stage
    runtime.configure(args.threads)
    runtime.quiet()
    os.environ["POSTTRAIN_RUNS_DIR"] = tempfile.mkdtemp(prefix="bench-moe-")
    os.chdir(ROOT)
    run_stage("base", "recipes/tiny/base.yaml", "bench",
              {"max_steps": "40", "save_steps": "1000", "eval_suite": "null",
               "disable_tqdm": "true"}, eval_after=False)
    common = {"max_steps": str(args.steps), "save_steps": "1000", "eval_suite": "null",
              "logging_steps": "10", "disable_tqdm": "true", "per_device_train_batch_size": "16"}
    sides = {"off": "{gamma: 0, alpha: 0}", "bias_on": f"{{gamma: {args.gamma}, alpha: 0}}",
             "seqwise_only": f"{{gamma: 0, alpha: {args.alpha}}}"}
    curves = {}
    for name, balance in sides.items():
        entry = run_stage("sft", "recipes/tiny/sft.yaml", "bench",
                          {**common, "name": f"sft_{name}", "moe_balance": balance},
                          eval_after=False)
        curves[name] = loads(Path(entry["output_dir"]).parent)

    n_layers = len(curves["off"][0])
    print(f"\nmax/mean expert load per step (mean over {n_layers} MoE layers; gamma "
          f"{args.gamma}, alpha {args.alpha})")
    print(f"{'step':>5}" + "".join(f"{k:>14}" for k in curves))
    for i in range(0, args.steps, max(1, args.steps // 12)):
        print(f"{i + 1:>5}" + "".join(f"{sum(curves[k][i]) / n_layers:>14.3f}" for k in curves))
    tail = slice(args.steps // 2, None)

    def figure(name: str) -> float:
        rows = curves[name][tail]
        return sum(sum(r) / len(r) for r in rows) / len(rows)

    print(f"{'last half, per layer':<22}" + "  ".join(
        f"{k}: " + ", ".join(f"{sum(r[j] for r in curves[k][tail]) / len(curves[k][tail]):.3f}"
                             for j in range(n_layers)) for k in curves))
    print(json.dumps({"max_mean_load_bias_on": round(figure("bias_on"), 3),
                      "max_mean_load_bias_off": round(figure("off"), 3),
                      "update_rate": args.gamma,
                      "max_mean_load_seqwise_only": round(figure("seqwise_only"), 3),
                      "seqwise_alpha": args.alpha}))


if __name__ == "__main__":
    main()
