"""`make demo`: the whole staged chain on the tiny embedded world, then the per-stage eval table.

Stages run through the same code path as `posttrain <stage>`; a stage already done with the same
recipe is skipped, so rerunning `make demo` after a crash resumes where it stopped. With `--jobs N`
(default: 2 where there are 2 cores) the stages whose inputs are ready run side by side, one worker
process each sharing the cores: a second thread speeds a tiny model's step only ~1.2x, so two
stages on one thread each get more done than one stage on two.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from multiprocessing import get_context
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


def _values(recipe: str, overrides: dict[str, str] | None) -> dict:
    """A recipe file's top-level values with the chain's overrides for it applied."""
    from posttrain.recipe import read_yaml
    return {**read_yaml(recipe), **(overrides or {})}


def stage_name(recipe: str, overrides: dict[str, str] | None = None) -> str:
    """The name a chain entry's stage gets in the manifest (its recipe's `name`, else its kind)."""
    data = _values(recipe, overrides)
    return str(data.get("name") or data["stage"])


def upstream(recipe: str, chain_names: set[str], overrides: dict[str, str] | None = None) -> set[str]:
    """The chain's stages a recipe reads — its `init_from`, `teacher` or `student`, and any
    `{stage: NAME}` data source: it starts only when they are done."""
    data = _values(recipe, overrides)
    refs = {data.get(key) for key in ("init_from", "teacher", "student")}
    for key in ("train_data", "prompt_data"):
        sources = data.get(key)
        for item in sources if isinstance(sources, list) else []:
            if isinstance(item, dict):
                refs.add(item.get("stage"))
    return {r for r in refs if isinstance(r, str) and r in chain_names}


def run_chain(run: str, chain: list[tuple[str, str]],
              overrides: dict[str, dict[str, str]] | None = None, force: bool = False,
              suite: str | None = None, jobs: int = 1) -> list[str]:
    """Run `chain`, then make sure every done stage has `suite` figures, then write the report.
    `overrides` maps a recipe path to its `--key value` overrides. With `jobs` > 1 stages run in
    that many worker processes as their inputs allow (`run_parallel`), else in order in this
    one. Returns the stage names, in chain order."""
    from posttrain.evaluate import run_eval
    from posttrain.manifest import Manifest
    from posttrain.recipe import read_yaml
    from posttrain.report import write_report
    from posttrain.runner import run_stage

    overrides = overrides or {}
    if jobs > 1:
        names = run_parallel(run, chain, overrides, force, jobs)
    else:
        names = []
        for kind, recipe in chain:
            t = time.time()
            entry = run_stage(kind, recipe, run, overrides.get(recipe), force=force)
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


def run_parallel(run: str, chain: list[tuple[str, str]], overrides: dict[str, dict[str, str]],
                 force: bool, jobs: int) -> list[str]:
    """Run `chain` in `jobs` worker processes: each entry starts once the entries it reads
    (`upstream`) are done, earlier entries first; the cores are split between the workers. Each
    stage's output goes to `runs/<run>/logs/<stage>.log`. A failed stage starts nothing new;
    the stages running finish, then its error is raised here."""
    from posttrain.manifest import Manifest

    names = [stage_name(recipe, overrides.get(recipe)) for _, recipe in chain]
    needs = {name: upstream(recipe, set(names), overrides.get(recipe))
             for name, (_, recipe) in zip(names, chain)}
    logs = Manifest(run).run_dir / "logs"
    cores = int(os.environ.get("POSTTRAIN_THREADS", 0)) or os.cpu_count() or 1
    pending = list(zip(names, chain))
    running: dict[Future, tuple[str, float]] = {}
    done: set[str] = set()
    failure: BaseException | None = None
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn"),
                             initializer=_worker_init) as pool:
        while pending or running:
            ready = [item for item in pending if needs[item[0]] <= done]
            share = thread_share(cores, jobs, len(running), len(ready))
            for item in ready:
                name, (kind, recipe) = item
                if failure is not None or len(running) >= jobs:
                    break
                pending.remove(item)
                logs.mkdir(parents=True, exist_ok=True)
                log = logs / f"{name}.log"
                running[pool.submit(_run_logged, kind, recipe, run, overrides.get(recipe),
                                    force, str(log), share)] = (name, time.time())
                print(f"[demo] {name} ({recipe}) started on {share} thread(s); log: {log}",
                      file=sys.stderr)
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                name, t = running.pop(future)
                try:
                    future.result()
                except BaseException as e:  # noqa: BLE001 - re-raised once the others finish
                    failure = failure or e
                    log = logs / f"{name}.log"
                    tail = log.read_text(errors="replace").splitlines()[-15:]
                    if not tail:  # refused before it started: nothing to keep
                        log.unlink()
                    print("\n".join(tail + [f"[demo] {name} failed after "
                                             f"{time.time() - t:.0f}s"]), file=sys.stderr)
                    continue
                done.add(name)
                print(f"[demo] {name} took {time.time() - t:.0f}s", file=sys.stderr)
    if failure is not None:
        raise failure
    if pending:  # nothing failed, yet these never became ready: they read each other
        raise UserError(f"{', '.join(n for n, _ in pending)}: each waits for a stage that waits "
                        f"for it (init_from / teacher / stage data); the chain cannot be ordered")
    return names


def thread_share(cores: int, jobs: int, running: int, ready: int) -> int:
    """Threads for a stage starting now: every core when nothing runs or waits beside it, else an
    equal share of `jobs`. Nothing can become ready while a stage runs alone (only a finished
    stage readies others), so the cores are never oversubscribed."""
    return max(1, cores // max(1, min(jobs, running + ready)))


def _worker_init() -> None:
    """One OpenMP thread until a stage sets its share (`run_stage` reads $POSTTRAIN_THREADS)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    from posttrain import runtime
    runtime.quiet()


def _run_logged(kind: str, recipe: str, run: str, overrides: dict[str, str] | None, force: bool,
                log: str, threads: int) -> str:
    """`run_stage` in a worker on `threads` threads, its output (progress bars, libraries'
    prints) into `log`."""
    from posttrain.runner import run_stage

    os.environ["POSTTRAIN_THREADS"] = str(threads)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "a") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            return run_stage(kind, recipe, run, overrides, force=force)["plan"]["name"]
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="posttrain-demo")
    p.add_argument("--run", default="demo")
    p.add_argument("--force", action="store_true")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="stages run side by side, sharing the cores (default: 2, or 1 on one core)")
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
        names = run_chain(args.run, chain, force=args.force, jobs=max(1, args.jobs))
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
