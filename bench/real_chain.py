"""R1's chain past GRPO on a real model (SmolLM2-135M-Instruct), on CPU, checked against its goals.

The RL model through a second SFT round and DPO, and distilled into two pruned students against
RL on each student alone.

Continues bench/real_model.py's run `smol` (base eval → SFT → GRPO, with its recipes and
overrides: when they are absent they run here first, when done they are skipped) through
recipes/smollm2-135m/:

    rejection    rejection.yaml         the RL model's verified samples, as SFT data
    sft_rs       sft_rs.yaml            the base retrained on them (R1's second SFT round)
    dpo          dpo.yaml               DPO from grpo on its own verifier-scored pairs
    students     posttrain.student      14 of the 30 layers (spread:14) of the teacher's base checkpoint (the
                                        GGUF its sft started from, read off the manifest) as a
                                        Llama and a Qwen2 model, at runs/<run>/students/{llama,qwen2}
                                        where the recipes' `init_from` points
    per student: distill_{traces,logits,on_policy}_<s>.yaml (teacher: grpo) and
                 rl_only_<s>.yaml (GRPO on the student alone; `rl_<s>` in the JSON)

Every model is evaluated on eval/smollm2.yaml (2-digit sums in words, the trained task, and
GSM8K), the students also before training. Every eval scores the same prompts, so a comparison
of two stages is the mean per-prompt difference with its standard error (real_model.py's
`paired`); the done-when checks are computed that way and printed as a table.

Resumable: runs live under `--runs_dir` (default: the repo's runs/, where the recipes' student
paths point; real_model.py writes to a fresh temp dir, so pass its `runs` folder to continue
that run); a stage done with the same plan is skipped by `run_stage`, a student already made is
reused, and evals of unchanged models come from the rollout cache.

Run: `python bench/real_chain.py [--threads 2] [--runs_dir DIR] [--smoke]` (`make real-chain`).
`--smoke` checks the plumbing, not the figures: run `smol_smoke`, every training stage 2
optimizer steps but the cold start (real_model.py's steps: two steps leave no sample in the
answer format, and rejection sampling would have nothing to keep), the sampling stages 16
prompts, every eval 4 prompts x 2 samples.
Last line: `{"stages": {name: {task: {pass@1, pass@1_se, format_rate}}} (the trained task and
gsm8k; names as STAGE_NAMES), "rejection_kept", "teacher_params", "student_params", "minutes"
(after GRPO), "checks": {check: passed}, "smoke"}`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.real_model import RECIPE as GRPO_RECIPE  # noqa: E402
from bench.real_model import SUITE, TASK, figures, paired, per_prompt  # noqa: E402

R = "recipes/smollm2-135m"
TASKS = (TASK, "gsm8k")
STUDENTS = {"llama": "llama", "qwen": "qwen2"}  # stage suffix → architecture (and student dir)
METHODS = ("traces", "logits", "on_policy")
# The recipes' students: 14 of SmolLM2's 30 layers, first and last kept (0.58x the parameters;
# every other layer, 15, is 0.605x: its tied 28M-parameter embedding is a fifth of the teacher).
LAYERS = "spread:14"
# (name here and in the JSON, stage kind, recipe, name in the manifest)
TEACHER_STAGES = [("rejection", "rejection", f"{R}/rejection.yaml", "rejection"),
                  ("sft_rs", "sft", f"{R}/sft_rs.yaml", "sft_rs"),
                  ("dpo", "dpo", f"{R}/dpo.yaml", "dpo")]


def student_stages(s: str) -> list[tuple[str, str, str, str]]:
    """The arms of student `s` (llama, qwen), in the same form as TEACHER_STAGES."""
    return [*((f"distill_{m}_{s}", "distill", f"{R}/distill_{m}_{s}.yaml", f"distill_{m}_{s}")
              for m in METHODS),
            (f"rl_{s}", "grpo", f"{R}/rl_only_{s}.yaml", f"rl_only_{s}")]


STAGE_NAMES = ["base", "sft", "grpo", "sft_rs", "dpo",
               *(n for s in STUDENTS for n in (f"student_{s}",
                                               *(a[0] for a in student_stages(s))))]
SMOKE_STEPS, SMOKE_PROMPTS, SMOKE_EVAL = 2, 16, {"n_prompts": 4, "n": 2, "k": 2}


def log(message: str) -> None:
    print(f"[chain] {message}", file=sys.stderr, flush=True)


def vs(pp: dict, a: str, b: str, task: str, factor: float = 1.0) -> tuple[float, float]:
    """Mean per-prompt `a - factor * b` on `task` and its standard error (paired)."""
    before, after = pp[b][task], pp[a][task]
    if len(before) != len(after) or len(after) < 2:
        raise SystemExit(f"{a} and {b} were not scored on the same prompts of {task} "
                         f"({len(after)} vs {len(before)})")
    return paired([factor * x for x in before], after)


def done_when(pp: dict[str, dict[str, list[float]]], teacher_params: int,
              student_params: int) -> list[dict]:
    """The issue's done-when checks from per-prompt pass@1 (`pp[stage][task]`, stage names as
    STAGE_NAMES): rows of {check, margin, se (None: not a paired figure), need, ok, and
    detail where one row stands for several comparisons}."""

    def row(check: str, margin_se: tuple[float, float], k: float) -> dict:
        margin, se = margin_se
        # k > 0 means "above by >= k SE", which a zero difference with a zero SE is not
        ok = margin >= k * se and (k <= 0 or margin > 0)
        return {"check": check, "margin": margin, "se": se, "need": f">= {k:+g} se", "ok": ok}

    rows = [row(f"sft_rs - grpo ({TASK})", vs(pp, "sft_rs", "grpo", TASK), -2),
            row(f"sft_rs - sft ({TASK})", vs(pp, "sft_rs", "sft", TASK), 3),
            row(f"dpo - grpo ({TASK})", vs(pp, "dpo", "grpo", TASK), -2)]
    for s in STUDENTS:
        arms = [f"distill_{m}_{s}" for m in METHODS]
        best = max(arms, key=lambda a: statistics.mean(pp[a][TASK]))
        rows += [row(f"{best} - 0.8 x grpo ({TASK})", vs(pp, best, "grpo", TASK, 0.8), 0),
                 row(f"{best} - rl_{s} ({TASK})", vs(pp, best, f"rl_{s}", TASK), 3)]
    ratio = student_params / teacher_params
    rows.append({"check": "student_params / teacher_params", "margin": ratio, "se": None,
                 "need": "<= 0.6", "ok": ratio <= 0.6})
    # GSM8K: every stage against base; the row shows the stage closest to failing.
    gsm = {n: row(f"gsm8k: {n} - base", vs(pp, n, "base", "gsm8k"), -2)
           for n in pp if n != "base"}
    worst = min(gsm.values(), key=lambda r: r["margin"] + 2 * r["se"])
    failed = [n for n, r in gsm.items() if not r["ok"]]
    rows.append({**worst, "check": f"{worst['check']} (worst of {len(gsm)})", "ok": not failed,
                 **({"detail": f"below base by more than 2 se: {', '.join(failed)}"}
                    if failed else {})})
    return rows


def print_stages(figs: dict[str, dict], pp: dict[str, dict[str, list[float]]]) -> None:
    n = next(iter(figs.values()))[TASK].get("n_samples", "?")
    print(f"\nSmolLM2-135M-Instruct's chain on 2-digit sums in words ({TASK}) and GSM8K, "
          f"pass@1 ± se ({n} samples per prompt; vs base: paired over prompts)")
    print(f"{'stage':<26}{'task':<12}{'pass@1':>8}{'±se':>8}{'format':>8}{'vs base':>9}{'±se':>8}")
    for name, res in figs.items():
        for task in TASKS:
            gain = "" if name == "base" else \
                "{:>+9.3f}{:>8.3f}".format(*vs(pp, name, "base", task))
            print(f"{name:<26}{task:<12}{res[task]['pass@1']:>8.3f}{res[task]['pass@1_se']:>8.3f}"
                  f"{res[task]['format_rate']:>8.3f}{gain}")


def print_checks(rows: list[dict]) -> None:
    print("\ndone when (paired per-prompt differences; margin in pass@1)")
    print(f"{'check':<58}{'margin':>9}{'±se':>8}{'need':>13}  result")
    for r in rows:
        se = f"{r['se']:>8.3f}" if r["se"] is not None else f"{'':>8}"
        print(f"{r['check']:<58}{r['margin']:>+9.3f}{se}{r['need']:>13}  "
              f"{'pass' if r['ok'] else 'FAIL'}")
        if r.get("detail"):
            print(f"  {r['detail']}")


def teacher_base(manifest, stage: str = "grpo") -> str:
    """The checkpoint at the start of `stage`'s lineage (grpo → sft → the GGUF), as its first
    stage's recipe named it: what the students are cut from."""
    ref = manifest.stage(stage)["plan"]["refs"]["init"]
    while "stage" in ref:
        ref = manifest.stage(ref["stage"])["plan"]["refs"]["init"]
    return ref["from"]


def student(manifest, arch: str, source: str) -> Path:
    """The student dir of `arch` under the run, made from `source` unless it is there."""
    from posttrain.student import RECORD_FILE, make_student
    out = manifest.run_dir / "students" / arch
    if (out / RECORD_FILE).is_file():
        made = json.loads((out / RECORD_FILE).read_text())
        if (made["source"], made["layers"]) != (source, LAYERS):
            raise SystemExit(f"{out} holds a student of {made['source']} ({made['layers']}), not "
                             f"of {source} ({LAYERS}); remove it and rerun")
        return out
    make_student(source, out, LAYERS, arch, manifest.run)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="torch (and vLLM-CPU) threads")
    ap.add_argument("--runs_dir", default=None,
                    help="where the run lives (default: the repo's runs/); real_model.py's is "
                         "the `runs` folder of the work dir it printed")
    ap.add_argument("--sft_steps", type=int, default=12, help="as real_model.py's, if it runs")
    ap.add_argument("--grpo_steps", type=int, default=None, help="as real_model.py's, if it runs")
    ap.add_argument("--smoke", action="store_true",
                    help="2 optimizer steps a stage, tiny evals, run smol_smoke: plumbing only")
    args = ap.parse_args()
    start = time.time()
    # Runs dir before the chdir (a relative --runs_dir is the caller's); the default stays
    # relative to the repo root, as the CLI and the recipes' student paths have it, so the plan
    # hashes match runs made with `posttrain ... --run smol` there.
    os.environ["POSTTRAIN_RUNS_DIR"] = str(Path(args.runs_dir).resolve()) if args.runs_dir \
        else "runs"
    os.chdir(ROOT)
    # run_stage sets torch's threads from $POSTTRAIN_THREADS (the recipes leave `threads` unset,
    # which keeps their plans the CLI's); vLLM-CPU takes its budget from it too.
    os.environ["POSTTRAIN_THREADS"] = str(args.threads)
    from posttrain import runtime
    runtime.configure(args.threads)
    runtime.quiet()
    from posttrain.evaluate import (
        eval_model,
        evaluate_model,
        load_suite,
        local_path,
        run_eval,
        write_eval,
    )
    from posttrain.manifest import Manifest
    from posttrain.models import count_params, load_model
    from posttrain.recipe import read_yaml
    from posttrain.rollout import release_engines
    from posttrain.runner import run_stage

    run = "smol_smoke" if args.smoke else "smol"
    suite = SUITE
    if args.smoke:  # the same suite (name, prompts, sampling), fewer prompts and samples
        data = read_yaml(SUITE)
        data.update(n=SMOKE_EVAL["n"], k=SMOKE_EVAL["k"])
        data["tasks"] = [{**t, "n_prompts": SMOKE_EVAL["n_prompts"]} for t in data["tasks"]]
        path = Manifest(run).run_dir / "smollm2_smoke.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1))
        suite = str(path)
    loaded = load_suite(suite)
    gsm8k = next(t for t in loaded.tasks if t.name == "gsm8k")
    if not local_path(gsm8k, loaded).exists():
        sys.exit(f"GSM8K's test file not found at {local_path(gsm8k, loaded)}: set "
                 f"POSTTRAIN_DATA_DIR to the folder holding gsm8k/test.jsonl (no hub here)")

    def overrides(kind: str, recipe: str) -> dict[str, str]:
        """--smoke's: 2 steps, a few prompts to sample, the small suite; else none."""
        if not args.smoke:
            return {}
        out = {} if kind == "rejection" else {"max_steps": str(SMOKE_STEPS), "eval_suite": suite}
        specs = read_yaml(recipe).get("prompt_data")
        if kind != "grpo" and specs:  # GRPO samples per step; the others sample all up front
            out["prompt_data"] = json.dumps([{**s, "n": min(s["n"], SMOKE_PROMPTS)}
                                             for s in specs])
        return out

    def stage(name: str, kind: str, recipe: str, stage_name: str,
              extra: dict[str, str] | None = None) -> dict:
        """Run (or skip) one stage, then make sure its eval and sample dump are there."""
        t = time.time()
        entry = run_stage(kind, recipe, run, {**overrides(kind, recipe), **(extra or {})})
        m = Manifest(run)
        if entry.get("output_kind") == "dataset":
            log(f"{name}: {(time.time() - t) / 60:.1f} min")
            return {}
        res = (entry.get("eval") or {}).get(loaded.name)
        dump = m.run_dir / "eval" / stage_name / f"{loaded.name}.{TASK}.samples.jsonl"
        if res is None or not dump.exists():  # done earlier, its eval never finished
            try:
                res = run_eval(m, stage_name, suite, progress=False)
            finally:
                release_engines()
        log(f"{name}: {(time.time() - t) / 60:.1f} min")
        return res

    def model_eval(label: str, model_dir: Path) -> dict:
        """A model of no stage (a student before training) under runs/<run>/eval/<label>/."""
        t = time.time()
        try:
            res, dumps = evaluate_model(str(model_dir), loaded, progress=False)
        finally:
            release_engines()
        write_eval(Manifest(run).run_dir, label, loaded, res, dumps)
        log(f"{label} eval: {(time.time() - t) / 60:.1f} min")
        return res

    # real_model.py's stages, with its overrides: skipped when its run is there.
    figs, labels = {}, {}
    sft_over = {"max_steps": str(args.sft_steps)}  # in --smoke too: rejection needs its samples
    figs["sft"] = stage("sft", "sft", f"{R}/sft.yaml", "sft", sft_over)
    grpo_over = {"max_steps": str(args.grpo_steps)} if args.grpo_steps and not args.smoke else {}
    figs["grpo"] = stage("grpo", "grpo", GRPO_RECIPE, "grpo", grpo_over)
    base = teacher_base(Manifest(run))
    t = time.time()
    try:
        labels["base"], base_res = eval_model(Manifest(run), base, suite, progress=False)
    finally:
        release_engines()
    log(f"base eval ({base}): {(time.time() - t) / 60:.1f} min")
    figs = {"base": base_res, **figs}
    after_grpo = time.time()

    for name, kind, recipe, stage_name in TEACHER_STAGES:
        res = stage(name, kind, recipe, stage_name)
        if res:
            figs[name] = res
    students = {}
    for s, arch in STUDENTS.items():
        t = time.time()
        students[s] = student(Manifest(run), arch, base)
        log(f"student_{s} ({arch}, {LAYERS} layers of {base}): {(time.time() - t) / 60:.1f} min")
        figs[f"student_{s}"] = model_eval(f"student_{s}", students[s])
        for name, kind, recipe, stage_name in student_stages(s):
            # The recipes' init_from is runs/smol/students/<arch>: point it at this run's.
            same = Path(read_yaml(recipe)["init_from"]).resolve() == students[s].resolve()
            extra = {} if same else {"init_from": str(students[s])}
            figs[name] = stage(name, kind, recipe, stage_name, extra)
            labels[name] = stage_name

    m = Manifest(run)
    pp = {n: {task: per_prompt(m.run_dir, labels.get(n, n), task) for task in TASKS}
          for n in STAGE_NAMES}
    teacher_params = count_params(load_model(m.resolve("grpo")))
    student_params = count_params(load_model(students["llama"]))
    rows = done_when(pp, teacher_params, student_params)
    kept = m.stage("rejection")["metrics"]["n_kept"]
    minutes = (time.time() - after_grpo) / 60

    print_stages({n: figs[n] for n in STAGE_NAMES}, pp)
    print(f"\nrejection kept {kept} samples; teacher (grpo) {teacher_params / 1e6:.1f}M "
          f"parameters, Llama student {student_params / 1e6:.1f}M "
          f"({student_params / teacher_params:.3f}x)")
    print_checks(rows)
    print(f"{sum(r['ok'] for r in rows)} of {len(rows)} checks pass; after GRPO {minutes:.1f} min "
          f"(goal <= 75 on 2 idle cores, for a run not resumed), total "
          f"{(time.time() - start) / 60:.1f} min (run {m.run_dir})"
          + (" — SMOKE: plumbing only, not figures" if args.smoke else ""))
    print(json.dumps({"stages": {n: figures({t: figs[n][t] for t in TASKS}) for n in STAGE_NAMES},
                      "rejection_kept": kept, "teacher_params": teacher_params,
                      "student_params": student_params, "minutes": round(minutes, 1),
                      "checks": {r["check"]: r["ok"] for r in rows}, "smoke": args.smoke}))


if __name__ == "__main__":
    from posttrain.errors import UserError
    try:
        main()
    except UserError as e:  # a stage's own one-line error (rerunning resumes the chain)
        sys.exit(f"real_chain: {e}")
