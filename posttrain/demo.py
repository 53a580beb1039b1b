"""`make demo`: the whole staged chain on the tiny embedded world, then the per-stage eval table.

Stages run in order through the same code path as `posttrain <stage>`; a stage already done with
the same recipe is skipped, so rerunning `make demo` after a crash resumes where it stopped.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from posttrain.errors import UserError

# (command, recipe): the demo chain, in the order init_from imposes (each stage resolves its
# upstream through the manifest). A stage done with the same recipe is skipped on a rerun.
CHAIN: list[tuple[str, str]] = [
    ("base", "recipes/tiny/base.yaml"),                    # tiny DeepSeek-V3-style MoE (fixture)
    ("sft", "recipes/tiny/sft.yaml"),                      # cold start on CoT traces
    ("grpo", "recipes/tiny/grpo.yaml"),                    # reasoning RL, rule-based rewards
    ("rejection", "recipes/tiny/rejection.yaml"),          # verified samples of the RL model
    ("sft", "recipes/tiny/sft_rs.yaml"),                   # second SFT round on them (sft_rs)
    ("dpo", "recipes/tiny/dpo.yaml"),                      # preference pairs from own samples
    ("distill", "recipes/tiny/distill_qwen.yaml"),         # Qwen2 student on teacher traces
    ("distill", "recipes/tiny/distill_llama.yaml"),        # Llama student on teacher traces
    ("base", "recipes/tiny/student_base.yaml"),            # the student's own weak base
    ("grpo", "recipes/tiny/student_rl.yaml"),              # same student, RL only (R1 comparison)
]


def available(chain: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], list[str]]:
    """The entries this checkout can run, and a note for each it cannot (stage not built yet)."""
    from posttrain.stages import STAGES
    ok, notes = [], []
    for kind, recipe in chain:
        if kind not in STAGES:
            notes.append(f"{recipe}: no `{kind}` stage in this checkout")
        elif not Path(recipe).exists():
            notes.append(f"{recipe}: recipe not found")
        else:
            ok.append((kind, recipe))
    return ok, notes


def run_chain(run: str, chain: list[tuple[str, str]],
              overrides: dict[str, dict[str, str]] | None = None, force: bool = False,
              suite: str | None = None) -> list[str]:
    """Run `chain` in order, then make sure every done stage has `suite` figures, then write the
    report. `overrides` maps a recipe path to its `--key value` overrides. Returns stage names."""
    from posttrain.evaluate import run_eval
    from posttrain.manifest import Manifest
    from posttrain.recipe import read_yaml
    from posttrain.report import write_report
    from posttrain.runner import run_stage

    names = []
    for kind, recipe in chain:
        t = time.time()
        entry = run_stage(kind, recipe, run, (overrides or {}).get(recipe), force=force)
        names.append(entry["plan"]["name"])
        print(f"[demo] {names[-1]} ({recipe}) took {time.time() - t:.0f}s", file=sys.stderr)
    # The chain's `eval` step: every stage evaluates itself when it finishes; this fills in any
    # stage that ran without (e.g. `--no-eval`), so the table has no holes.
    m = Manifest(run)
    for name in names:
        suite_path = suite or m.recipe(name).get("eval_suite")
        is_model = m.stage(name)["output_kind"] == "model"  # a data stage has nothing to evaluate
        if is_model and suite_path and read_yaml(suite_path).get("name", Path(suite_path).stem) \
                not in (m.stage(name).get("eval") or {}):
            run_eval(m, name, suite_path)
    write_report(run)
    return names


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="posttrain-demo")
    p.add_argument("--run", default="demo")
    p.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    from posttrain import runtime
    from posttrain.manifest import Manifest
    from posttrain.tables import eval_table
    runtime.quiet()
    t0 = time.time()
    chain, notes = available(CHAIN)
    for note in notes:
        print(f"[demo] skipping {note}", file=sys.stderr)
    try:
        names = run_chain(args.run, chain, force=args.force)
    except UserError as e:
        print(f"posttrain: error: {e}", file=sys.stderr)
        return 2
    m = Manifest(args.run)
    print(f"\nrun {args.run}: {len(names)} stages in {time.time() - t0:.0f}s"
          + (f" ({len(notes)} skipped)" if notes else ""))
    print(eval_table({n: m.stages[n] for n in names}))
    print(f"\nreport: {m.run_dir / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
