"""Distillation three ways against RL on the same student, at one shared budget.

Compared, per tiny student (Qwen2 and Llama, ~0.2M params each) and seed: `traces` (SFT on the
teacher's verified traces), `logits` (the teacher's token distributions on those traces, forward
KL), `on_policy` (the student samples, the teacher scores every token, reverse KL) and `rl_only`
(R1-Zero-style GRPO on the student itself, no teacher). Every arm starts from the same student
init (the student's own weak base, recipes/tiny/student_base*.yaml) and runs the same number of
optimizer steps over the same number of completions per step (`--steps` x `--batch`, 64 new
tokens); a second RL line, `rl_only_wall`, gets the distilled arms' mean wall time for that
student and seed instead (teacher sampling included), through `max_train_seconds`.

The teacher is the demo's RL model (base -> sft -> grpo, built here unless `--teacher DIR` names
one). Reported: held-out pass@1 (200 unseen 1-2 digit sums x 4 samples at T=0.7) mean and spread
over seeds; teacher forward passes (sampled traces + scored sequences), tokens the student and the
teacher generated, wall time. The teacher samples each seed's traces once: the cache serves the
other arms and the other student, and every sampled arm is charged that one sampling's time.

Run: `python bench/distill_methods.py [--steps 500] [--seeds 2] [--teacher runs/demo/grpo/model]`.
Last line: `{"methods": {method: {"qwen2", "llama"}}, "rl_only": {...}, "rl_only_wall": {...},
"student_base": {...}, "optimizer_steps": {...}, "teacher": ...}` (held-out pass@1 means).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._heldout import bench_workspace  # noqa: E402

STUDENTS = {"qwen2": ("qwen", "recipes/tiny/student_base.yaml", "student_base"),
            "llama": ("llama", "recipes/tiny/student_base_llama.yaml", "student_base_llama")}
METHODS = ("traces", "logits", "on_policy")


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch", type=int, default=32, help="completions per optimizer step")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--students", default="qwen2,llama")
    ap.add_argument("--teacher", help="teacher model dir (default: build the demo's grpo model)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("POSTTRAIN_THREADS", 2)))
    args = ap.parse_args()

    work, suite = bench_workspace("distill", args.threads)
    from posttrain.evaluate import evaluate_model, load_suite, run_eval
    from posttrain.manifest import Manifest
    from posttrain.runner import run_stage

    run, quiet = "bench", {"save_steps": "100000", "eval_suite": "null"}

    def held_out(name: str) -> float:
        return run_eval(Manifest(run), name, suite, progress=False)["arithmetic"]["pass@1"]

    teacher = args.teacher
    if not teacher:
        print(f"building the teacher: base -> sft -> grpo ({work})", flush=True)
        for kind in ("base", "sft", "grpo"):
            run_stage(kind, f"recipes/tiny/{kind}.yaml", run, quiet, eval_after=False)
        teacher = str(Manifest(run).resolve("grpo"))
    teacher = str(Path(teacher).resolve())
    students = args.students.split(",")
    base_p1 = {}
    for student in students:
        _, recipe, name = STUDENTS[student]
        run_stage("base", recipe, run, quiet, eval_after=False)
        base_p1[student] = held_out(name)
    teacher_p1 = evaluate_model(teacher, load_suite(suite), progress=False)[0][
        "arithmetic"]["pass@1"]
    print(f"student bases: {base_p1}; teacher {teacher_p1}", flush=True)

    budget = {"max_steps": str(args.steps), "per_device_train_batch_size": str(args.batch)}
    rows: dict[tuple[str, str], list[dict]] = {}
    for seed in range(args.seeds):
        sampling_s = 0.0  # the one uncached teacher sampling of this seed
        for student in students:
            short, _, init = STUDENTS[student]
            walls = []
            for method in METHODS:
                name = f"{method}_{student}_s{seed}"
                run_stage("distill", f"recipes/tiny/distill/{method}_{short}.yaml", run,
                          {**quiet, **budget, "name": name, "teacher": teacher,
                           "seed": str(seed)}, eval_after=False)
                b = Manifest(run).stage(name)["metrics"]["budget"]
                sampling_s = max(sampling_s, b["teacher_sampling_s"])
                sampled = b["teacher_samples"] > 0
                wall = b["train_s"] + (sampling_s if sampled else 0.0)
                walls.append(wall)
                rows.setdefault((method, student), []).append(
                    {"p1": held_out(name), **b, "wall_s": wall})
                print(f"  {name}: pass@1 {rows[(method, student)][-1]['p1']:.3f}, "
                      f"{b['teacher_forward_passes']} teacher passes, {wall:.0f}s", flush=True)
            arms = [("rl_only", {}),
                    ("rl_only_wall", {"max_steps": "100000",
                                      "max_train_seconds": f"{statistics.mean(walls):.1f}"})]
            for arm, extra in arms:
                name = f"{arm}_{student}_s{seed}"
                run_stage("grpo", f"recipes/tiny/distill/rl_only_{short}.yaml", run,
                          {**quiet, **budget, **extra, "name": name, "init_from": init,
                           "seed": str(seed)}, eval_after=False)
                b = Manifest(run).stage(name)["metrics"]["budget"]
                rows.setdefault((arm, student), []).append({"p1": held_out(name), **b})
                print(f"  {name}: pass@1 {rows[(arm, student)][-1]['p1']:.3f}, "
                      f"{b['optimizer_steps']} steps, {b['wall_s']:.0f}s", flush=True)

    arms = [*METHODS, "rl_only", "rl_only_wall"]
    print(f"\n{args.steps} optimizer steps x {args.batch} completions from each student's base "
          f"(rl_only_wall: the distilled arms' wall time), {args.seeds} seeds; teacher pass@1 "
          f"{teacher_p1:.3f}")
    head = (f"{'arm':<13}{'student':<8}{'pass@1':>8}{'±std':>7}{'gain':>8}{'steps':>7}"
            f"{'teacher passes':>16}{'student tok':>13}{'teacher tok':>13}{'wall s':>8}"
            f"{'gain/1k passes':>16}")
    print(head)
    summary: dict[str, dict[str, float]] = {}
    steps: dict[str, int] = {}
    for arm in arms:
        for student in students:
            got = rows[(arm, student)]
            p1, sd = mean_std([r["p1"] for r in got])
            passes = statistics.mean(r["teacher_forward_passes"] for r in got)
            gain = p1 - base_p1[student]
            per_k = f"{gain / passes * 1000:.4f}" if passes else "–"
            summary.setdefault(arm, {})[student] = round(p1, 4)
            steps[arm] = round(statistics.mean(r["optimizer_steps"] for r in got))
            print(f"{arm:<13}{student:<8}{p1:>8.3f}{sd:>7.3f}{gain:>+8.3f}{steps[arm]:>7}"
                  f"{passes:>16.0f}{statistics.mean(r['student_generated_tokens'] for r in got):>13.0f}"
                  f"{statistics.mean(r['teacher_generated_tokens'] for r in got):>13.0f}"
                  f"{statistics.mean(r['wall_s'] for r in got):>8.0f}{per_k:>16}")
    for student in students:
        print(f"{'student_base':<13}{student:<8}{base_p1[student]:>8.3f}")
    at_steps = max(arms[:4], key=lambda a: statistics.mean(summary[a].values()))
    per_pass = max(METHODS, key=lambda a: statistics.mean(
        (summary[a][s] - base_p1[s]) / statistics.mean(r["teacher_forward_passes"]
                                                       for r in rows[(a, s)]) for s in students))
    print(f"winner at equal optimizer steps: {at_steps}; per teacher forward pass: {per_pass}")
    print(json.dumps({"methods": {m: summary[m] for m in METHODS},
                      "rl_only": summary["rl_only"], "rl_only_wall": summary["rl_only_wall"],
                      "student_base": {s: round(v, 4) for s, v in base_p1.items()},
                      "optimizer_steps": {a: steps[a] for a in (*METHODS, "rl_only")},
                      "rl_only_wall_steps": steps["rl_only_wall"],
                      "teacher": round(teacher_p1, 4),
                      "seeds": args.seeds, "completions_per_step": args.batch}))


if __name__ == "__main__":
    main()
