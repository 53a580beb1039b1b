"""Run one stage of a run: resolve its plan, record it in the manifest, train, evaluate.

Order matters for the user's promises: the recipe, its references (init model, teacher, upstream
datasets), the trainer settings and the stage's own inputs are all resolved and checked into one
`StagePlan` (posttrain.plan) before anything is written, so a stage that did not start leaves no
trace. A stage already done with the same plan hash is skipped; an unfinished one with the same
plan resumes from its last checkpoint. The plan records when each upstream stage ended, so a
re-run upstream makes this stage run again.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import traceback
from pathlib import Path

from posttrain import dist
from posttrain.data import resolve_stage_data
from posttrain.errors import UserError
from posttrain.manifest import Manifest, process_state
from posttrain.plan import build_plan
from posttrain.preflight import check_fp8, check_writable
from posttrain.recipe import Recipe, load_recipe
from posttrain.stages import stage_module
from posttrain.stages.context import StageContext


def prepare(kind: str, recipe_path: str, run: str, overrides: dict[str, str],
            force: bool = False) -> tuple[Recipe, StageContext, object]:
    """Everything that can fail on user input, before anything is written."""
    module = stage_module(kind)
    recipe = load_recipe(module.Recipe, recipe_path, overrides)
    manifest = Manifest(run)
    name = recipe.stage_name
    prev = manifest.stage(name)
    if (prev and prev.get("status") == "running" and prev.get("pid") != os.getpid()
            and process_state(prev) == "alive"):
        raise UserError(f"stage {name!r} of run {run!r} is running now (pid {prev['pid']}); "
                        f"wait for it to end, or stop it, then rerun to resume")
    recipe, data_refs = resolve_stage_data(recipe, manifest)
    plan = build_plan(kind, recipe, run, manifest, manifest.stage_dir(name), data_refs)
    # Resume only an unfinished attempt of the same plan; a changed plan starts over.
    resume = bool(prev and prev.get("status") != "done" and not force
                  and prev.get("plan_sha256") == plan.sha256)
    ctx = StageContext(plan=plan, manifest=manifest, resume=resume)
    if recipe.eval_suite:
        from posttrain.evaluate import load_suite
        load_suite(recipe.eval_suite)
    with _quiet_datasets():  # an error here must be the only line the user sees
        module.preflight(recipe, ctx)
    check_fp8(recipe, ctx.init_path)
    check_writable(ctx.stage_dir, ctx.init_path)
    return recipe, ctx, module


@contextlib.contextmanager
def _quiet_datasets():
    """No `datasets` progress bars while the preflight loads data to check it."""
    from datasets.utils import logging as ds_logging

    was_on = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            ds_logging.enable_progress_bar()


def _trained(ctx: StageContext) -> bool:
    """Whether the stage has checkpoints worth resuming from (not resuming, the stale ones of an
    earlier attempt were removed at the start, so these are this attempt's)."""
    return ctx.checkpoint_dir.is_dir() and any(ctx.checkpoint_dir.glob("checkpoint-*"))


def _undo_start(ctx: StageContext, before: dict) -> None:
    """Take back what starting the stage wrote: its manifest entry, and the dirs it created."""
    ctx.manifest.restore(ctx.name, before["entry"], created=not before["manifest"])
    if not before["stage"]:
        shutil.rmtree(ctx.stage_dir, ignore_errors=True)
    if not before["run"] and ctx.manifest.run_dir.is_dir() \
            and not any(ctx.manifest.run_dir.iterdir()):
        ctx.manifest.run_dir.rmdir()


def run_stage(kind: str, recipe_path: str, run: str, overrides: dict[str, str] | None = None,
              force: bool = False, eval_after: bool = True) -> dict:
    """Run a stage end to end; returns its manifest entry."""
    from posttrain import runtime

    recipe, ctx, module = prepare(kind, recipe_path, run, overrides or {}, force)
    runtime.configure(recipe.threads)
    manifest, name, plan = ctx.manifest, ctx.name, ctx.plan
    prev = manifest.stage(name)
    if (prev and prev.get("status") == "done" and not force
            and prev.get("plan_sha256") == plan.sha256 and Path(prev["output_dir"]).exists()):
        print(f"[posttrain] stage {name!r} of run {run!r} is done with this plan; skipping "
              f"(--force reruns it)", file=sys.stderr)
        return prev
    # Under `accelerate launch` every rank has validated and read the manifest above; only the
    # main process writes run state, after all ranks read it (so all agree on ctx.resume), and
    # the others wait until the stage dir is ready before they start training.
    main_process = dist.is_main_process()
    before = {"entry": prev, "manifest": manifest.path.exists(), "run": manifest.run_dir.exists(),
              "stage": ctx.stage_dir.exists()}
    dist.barrier()
    if main_process:
        ctx.stage_dir.mkdir(parents=True, exist_ok=True)
        if not ctx.resume:
            for stale in ("checkpoints", "logs.jsonl"):
                p = ctx.stage_dir / stale
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
        manifest.begin(plan)
        print(f"[posttrain] {kind} stage {name!r} of run {run!r} → {ctx.output_dir}"
              + (f" ({dist.world_size()} processes)" if dist.world_size() > 1 else ""),
              file=sys.stderr)
    dist.barrier()
    try:
        metrics = module.main(recipe, ctx) or {}
    except BaseException as e:
        if main_process and isinstance(e, UserError) and not _trained(ctx):
            _undo_start(ctx, before)  # a user mistake the preflight missed: leave no trace
        elif main_process:
            manifest.fail(name, f"{type(e).__name__}: {e}")
        if isinstance(e, (UserError, KeyboardInterrupt)):
            raise
        traceback.print_exc()
        raise UserError(f"stage {name!r} failed ({type(e).__name__}: {e}); see the traceback "
                        f"above; rerun the same command to resume") from None
    dist.shutdown()  # every rank has trained; rank 0 alone writes and evaluates from here
    if not main_process:
        return {}
    manifest.finish(name, {**ctx.metrics, **metrics})
    if eval_after and recipe.eval_suite:
        from posttrain.evaluate import load_suite, run_eval
        from posttrain.rollout import release_engines
        from posttrain.tables import eval_table
        try:
            results = run_eval(manifest, name, recipe.eval_suite)
        finally:
            release_engines()  # the next stage of a chain trains on this memory (or GPU)
        print(eval_table({name: {"eval": {load_suite(recipe.eval_suite).name: results}}}))
    return manifest.stage(name)
