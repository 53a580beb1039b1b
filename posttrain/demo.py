"""`make demo`: the whole staged chain on the tiny embedded world, then the per-stage eval table.

Stages run through the same code path as `posttrain <stage>`; a stage already done with the same
recipe is skipped, so rerunning `make demo` after a crash resumes where it stopped. With `--jobs N`
(default: 2 where there are 2 cores) the stages whose inputs are ready run side by side, one worker
process each (two stages on one thread each get more done than one on two), and each stage's eval
is a job of its own, so the next stage starts as soon as the model is saved.

Each job's thread count is fixed by the chain, not by which job ended first: a stage of `ALONE`
(the critical path, with nothing to run beside it) starts when nothing runs and gets every core,
any other job its share (cores / jobs) beside another. On a CPU the last bits of a
result depend on the thread count, so this is what makes two runs on one machine print the same
table. `--seed N` gives every stage of the chain that seed (data, sampling, initialisation).
"""

from __future__ import annotations

import argparse
import contextlib
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
# Stages on the chain's critical path that nothing can run beside (each reads the one before,
# and the side lanes have ended by then): they get every core.
ALONE = frozenset({"sft", "grpo"})


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
              suite: str | None = None, jobs: int = 1, alone: frozenset[str] = frozenset()
              ) -> list[str]:
    """Run `chain`, then make sure every done stage has `suite` figures, then write the report.
    `overrides` maps a recipe path to its `--key value` overrides. With `jobs` > 1 stages run in
    that many worker processes as their inputs allow (`run_parallel`; the stages named in
    `alone` on every core), else in order in this one. Returns the stage names, in chain
    order."""
    from posttrain.evaluate import run_eval
    from posttrain.manifest import Manifest
    from posttrain.report import write_report
    from posttrain.runner import run_stage

    overrides = overrides or {}
    if jobs > 1:
        names = run_parallel(run, chain, overrides, force, jobs, suite, alone)
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
        suite_path = eval_due(m, name, suite)
        if suite_path:
            run_eval(m, name, suite_path)
    write_report(run)
    return names


def eval_due(m, name: str, suite: str | None) -> str | None:
    """The suite a done stage still lacks figures for (`suite`, else its recipe's), or None: a
    data stage has nothing to evaluate."""
    from posttrain.recipe import read_yaml
    suite_path = suite or m.recipe(name).get("eval_suite")
    if m.stage(name)["output_kind"] != "model" or not suite_path:
        return None
    has = m.stage(name).get("eval") or {}
    return None if read_yaml(suite_path).get("name", Path(suite_path).stem) in has else suite_path


def run_parallel(run: str, chain: list[tuple[str, str]], overrides: dict[str, dict[str, str]],
                 force: bool, jobs: int, suite: str | None = None,
                 alone: frozenset[str] = frozenset()) -> list[str]:
    """Run `chain` in `jobs` worker processes: each entry starts once the entries it reads
    (`upstream`) are done and a worker is free, in chain order, on `job_threads` threads; a
    stage named in `alone` starts when nothing runs and runs with nothing beside it (a job that
    must wait holds back the ones after it, so such a stage is not starved).
    A stage's eval is a job of its own, queued when the stage is done behind the stages ready
    then, so the stages that read a model start as soon as it is saved. Each stage's output, its
    eval's too, goes to `runs/<run>/logs/<stage>.log`. A failed job starts nothing new; the jobs
    running finish, then its error is raised here."""
    from posttrain.manifest import Manifest

    names = [stage_name(recipe, overrides.get(recipe)) for _, recipe in chain]
    needs = {name: upstream(recipe, set(names), overrides.get(recipe))
             for name, (_, recipe) in zip(names, chain)}
    logs = Manifest(run).run_dir / "logs"
    cores = int(os.environ.get("POSTTRAIN_THREADS", 0)) or os.cpu_count() or 1
    pending = list(zip(names, chain))
    evals: list[tuple[str, str]] = []  # (stage, suite): done stages still to evaluate
    running: dict[Future, tuple[str, str, float, bool]] = {}  # label, stage, start, alone
    done: set[str] = set()
    failure: BaseException | None = None
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn"),
                             initializer=_worker_init) as pool:
        while pending or evals or running:
            ready = [("stage", item) for item in pending if needs[item[0]] <= done]
            for what, job in ready + [("eval", e) for e in evals]:
                by_itself = what == "stage" and job[0] in alone
                if failure is not None or len(running) >= jobs \
                        or any(a for *_, a in running.values()) or (by_itself and running):
                    break
                threads = job_threads(cores, jobs, by_itself)
                logs.mkdir(parents=True, exist_ok=True)
                if what == "stage":
                    pending.remove(job)
                    name, (kind, recipe) = job
                    label = name
                    args = (_run_logged, kind, recipe, run, overrides.get(recipe), force)
                else:
                    evals.remove(job)
                    name, suite_path = job
                    label = f"{name} eval"
                    args = (_eval_logged, run, name, suite_path)
                log = logs / f"{name}.log"
                running[pool.submit(*args, str(log), threads)] = (label, name, time.time(),
                                                                  by_itself)
                print(f"[demo] {label} started on {threads} thread(s); log: {log}",
                      file=sys.stderr)
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                label, name, t, _ = running.pop(future)
                try:
                    future.result()
                except BaseException as e:  # noqa: BLE001 - re-raised once the others finish
                    failure = failure or e
                    log = logs / f"{name}.log"
                    tail = log.read_text(errors="replace").splitlines()[-15:]
                    if not tail:  # refused before it started: nothing to keep
                        log.unlink()
                    print("\n".join(tail + [f"[demo] {label} failed after "
                                             f"{time.time() - t:.0f}s"]), file=sys.stderr)
                    continue
                print(f"[demo] {label} took {time.time() - t:.0f}s", file=sys.stderr)
                if label == name:
                    done.add(name)
                    suite_path = eval_due(Manifest(run), name, suite)
                    if suite_path:
                        evals.append((name, suite_path))
    if failure is not None:
        raise failure
    if pending:  # nothing failed, yet these never became ready: they read each other
        raise UserError(f"{', '.join(n for n, _ in pending)}: each waits for a stage that waits "
                        f"for it (init_from / teacher / stage data); the chain cannot be ordered")
    return names


def job_threads(cores: int, jobs: int, alone: bool) -> int:
    """A job's thread count, fixed whatever runs beside it: every core for a stage that runs
    alone, else an equal share of `jobs`; never below one."""
    return cores if alone else max(1, cores // jobs)


def _worker_init() -> None:
    """One OpenMP thread until a stage sets its share (`run_stage` reads $POSTTRAIN_THREADS)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    from posttrain import runtime
    runtime.quiet()


def _run_logged(kind: str, recipe: str, run: str, overrides: dict[str, str] | None, force: bool,
                log: str, threads: int) -> str:
    """`run_stage`, without its eval (a job of its own), in a worker (`_logged`)."""
    from posttrain.runner import run_stage

    with _logged(log, threads):
        entry = run_stage(kind, recipe, run, overrides, force=force, eval_after=False)
        return entry["plan"]["name"]


def _eval_logged(run: str, name: str, suite: str, log: str, threads: int) -> None:
    """A done stage's eval on `suite` in a worker (`_logged`), its table after the stage's log."""
    from posttrain.evaluate import load_suite, run_eval
    from posttrain.manifest import Manifest
    from posttrain.rollout import release_engines
    from posttrain.tables import eval_table

    with _logged(log, threads):
        try:
            results = run_eval(Manifest(run), name, suite)
        finally:
            release_engines()  # the worker's next job trains on this memory
        print(eval_table({name: {"eval": {load_suite(suite).name: results}}}))


@contextlib.contextmanager
def _logged(log: str, threads: int):
    """A worker's job on `threads` threads, its output (progress bars, libraries' prints)
    appended to `log`."""
    from posttrain import runtime

    os.environ["POSTTRAIN_THREADS"] = str(threads)
    runtime.configure()  # a stage sets its own again (a recipe may name its count)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "a") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
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
    p.add_argument("--seed", type=int, default=None,
                   help="the seed of every stage (data, sampling, initialisation; default: each "
                        "recipe's own)")
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
        overrides = {recipe: {"seed": str(args.seed)} for _, recipe in chain} \
            if args.seed is not None else None
        names = run_chain(args.run, chain, overrides, force=args.force, jobs=max(1, args.jobs),
                          alone=ALONE)
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
