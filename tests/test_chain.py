"""The whole demo chain, shrunk to a few steps per stage: manifest, checkpoints, eval, report.

It runs every stage of `posttrain.demo.CHAIN` through the same `run_chain` that `make demo` uses.
The recipes are the demo's own, shrunk by overrides (2 training steps, a few prompts, short
generations, a 4-prompt eval suite). `base` and `sft` come from the session's tiny run (40 steps
each, so later stages sample something worth scoring): their manifest entries are copied, and
because the chain asks for them with the same recipe they are skipped, not retrained.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from posttrain.demo import ALONE, CHAIN, available, job_threads, run_chain, stage_name, upstream
from posttrain.errors import UserError
from posttrain.manifest import Manifest
from posttrain.recipe import TrainingFields, read_yaml
from posttrain.stages import stage_module

# What conftest's `tiny_run` ran base and sft with: the chain asks for the same, so both skip.
FIXTURE = {"max_steps": "40", "save_steps": "1000", "eval_suite": "null"}
SUITE = {"name": "chain", "n": 2, "k": 2, "temperature": 0.7, "max_new_tokens": 32,
         "tasks": [{"name": "arithmetic", "task": "arithmetic", "n_prompts": 4, "digits": 1},
                   {"name": "countdown", "task": "countdown", "n_prompts": 4, "count": 3}]}


def _flow(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()


def shrink(kind: str, recipe_path: str, suite: Path, prefs: Path) -> dict[str, str]:
    """Overrides that make a demo recipe run in seconds, whatever stage it is."""
    data = read_yaml(recipe_path)
    if kind in ("base", "sft") and data.get("name", kind) in ("base", "sft"):
        return dict(FIXTURE)
    recipe_cls = stage_module(kind).Recipe
    evaluates = data.get("eval_suite", recipe_cls.__dataclass_fields__["eval_suite"].default)
    out = {"eval_suite": str(suite)} if evaluates else {}  # a data stage has no model to eval
    if issubclass(recipe_cls, TrainingFields):
        out.update(max_steps="2", save_steps="1000", logging_steps="1")
    for key, value in data.items():
        if key == "prompt_data" and "temperature" in data:
            # Stages that sample from the model and keep what verifies: the fixture's 40-step
            # model gets 1-digit sums right at T=0.3 often enough to leave something to keep.
            out.update(prompt_data=_flow([{"task": "arithmetic", "n": 32, "digits": 1}]),
                       temperature="0.3")
        elif key == "samples_per_prompt":
            out[key] = str(max(value, 16))
        elif isinstance(value, list) and value and all(isinstance(v, dict) and "n" in v
                                                       for v in value):
            out[key] = _flow([{**v, "n": min(v["n"], 8)} for v in value])
        elif key in ("max_new_tokens", "max_completion_length") and isinstance(value, int):
            out[key] = str(min(value, 40))
    if "check_steps" in recipe_cls.__dataclass_fields__:
        # A 40-step model's right answers rarely have every step right (rejection and distill
        # filter on steps by default): keep right answers so the data stages have something.
        out["check_steps"] = "false"
    if kind == "dpo":  # the rollout route is tested in test_dpo; here a small pairs file
        out.update(prompt_data="[]", train_data=_flow([{"path": str(prefs)}]))
    return out


@pytest.mark.slow
def test_whole_chain(tiny_run, tmp_path, engines_at_train_start):
    suite = tmp_path / "chain.yaml"
    suite.write_text(yaml.safe_dump(SUITE))
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps(
        {"prompt": f"What is {a}+{b}?", "chosen": f"<think>{a}+{b}+0={a + b} c0</think>"
         f"<answer>{a + b}</answer>", "rejected": f"<answer>{a + b + 1}</answer>"}) + "\n"
        for a in range(4) for b in range(4)))
    chain, missing = available(CHAIN)
    assert [k for k, _ in chain[:2]] == ["base", "sft"] and ("dpo", "recipes/tiny/dpo.yaml") in chain

    m = Manifest("chain")
    fixture = Manifest(tiny_run)
    m.data["stages"] = {n: fixture.stage(n) for n in ("base", "sft")}
    m.save()
    overrides = {recipe: shrink(kind, recipe, suite, prefs) for kind, recipe in chain}
    names = run_chain("chain", chain, overrides, suite=str(suite))
    # Every stage evaluated itself (an HF model cached for the suite's tasks) and distill and
    # dpo sampled first: no engine was alive when any trainer started.
    assert engines_at_train_start and all(alive == [] for alive in engines_at_train_start)

    m = Manifest("chain")
    assert len(names) == len(chain) and len(set(names)) == len(names)
    assert m.stage("base")["output_dir"] == fixture.stage("base")["output_dir"]  # skipped
    makes_data = {"rejection"}  # stages whose output is a dataset, not a model
    for name in names:
        entry = m.stage(name)
        assert entry["status"] == "done", (name, entry.get("error"))
        out = Path(entry["output_dir"])
        assert out.is_dir() and any(out.iterdir()), name
        if entry["kind"] in makes_data:
            continue
        assert (out / "config.json").exists() and (out / "posttrain_plan.json").exists()
        figures = entry["eval"]["chain"]
        assert set(figures) == {"arithmetic", "countdown"}
        assert 0.0 <= figures["arithmetic"]["pass@1"] <= figures["arithmetic"]["pass@2"] <= 1.0
    # Lineage: each stage's init is a stage that finished before it.
    for i, name in enumerate(names):
        init = (m.stage(name)["plan"]["refs"].get("init") or {}).get("stage")
        assert init is None or init in names[:i], (name, init)

    report = (m.run_dir / "report.md").read_text()
    for name in names:
        if m.stage(name)["kind"] not in makes_data:
            assert re.search(rf"^\| {re.escape(name)} +\| chain/arithmetic", report, re.M), name
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report):
        assert (m.run_dir / link).exists(), link
    assert "## DPO" in report and (m.run_dir / "plots" / "loss.png").exists()

    # A second pass finds every stage done with the same recipe: nothing reruns.
    ended = {n: m.stage(n)["ended"] for n in names}
    assert run_chain("chain", chain, overrides, suite=str(suite)) == names
    assert {n: Manifest("chain").stage(n)["ended"] for n in names} == ended


@pytest.mark.slow
def test_parallel_chain_starts_each_stage_once_its_inputs_are_done(tiny_run, tmp_path, capfd):
    """`make demo`'s worker processes: par_b runs beside par_a; par_c, which runs alone, waits
    for par_a's model and for par_b to end, but not for par_a's eval, which waits behind it.
    Each job's thread count is the schedule's, whatever ended first."""
    import os

    suite = tmp_path / "chain.yaml"
    suite.write_text(yaml.safe_dump({**SUITE, "tasks": SUITE["tasks"][:1]}))
    recipes = {}
    for name, init in (("par_a", "base"), ("par_c", "par_a"), ("par_b", "base")):
        recipes[name] = tmp_path / f"{name}.yaml"
        recipes[name].write_text(yaml.safe_dump({
            "stage": "sft", "name": name, "init_from": init, "max_steps": 2, "save_steps": 1000,
            "train_data": [{"task": "arithmetic", "n": 16, "digits": 1}],
            "eval_suite": str(suite)}))
    chain = [("sft", str(recipes[n])) for n in ("par_a", "par_c", "par_b")]
    assert upstream(str(recipes["par_c"]), {"par_a", "par_b", "par_c"}) == {"par_a"}
    assert upstream(str(recipes["par_b"]), {"par_a", "par_b", "par_c"}) == set()
    m = Manifest("par")
    m.data["stages"] = {"base": Manifest(tiny_run).stage("base")}
    m.save()

    assert run_chain("par", chain, jobs=2, alone=frozenset({"par_c"})) == \
        ["par_a", "par_c", "par_b"]
    stages = Manifest("par").stages
    assert all(stages[n]["status"] == "done" for n in ("par_a", "par_b", "par_c"))
    assert stages["par_c"]["started"] >= stages["par_a"]["ended"]  # it read par_a's model
    assert stages["par_c"]["plan"]["refs"]["init"]["stage"] == "par_a"
    assert all("chain" in stages[n]["eval"] for n in ("par_a", "par_b", "par_c"))
    err = capfd.readouterr().err
    assert err.index("[demo] par_b started") < err.index("[demo] par_a took")  # beside par_a
    assert err.index("[demo] par_c started") > err.index("[demo] par_b took")  # alone
    assert err.index("[demo] par_c started") < err.index("[demo] par_a eval started")
    cores = int(os.environ.get("POSTTRAIN_THREADS", 0)) or os.cpu_count()
    assert f"[demo] par_c started on {cores} thread(s)" in err
    assert f"[demo] par_a started on {job_threads(cores, 2, False)} thread(s)" in err
    assert "| par_a " in (Manifest("par").run_dir / "logs" / "par_a.log").read_text()
    assert "train_runtime" in (Manifest("par").run_dir / "logs" / "par_b.log").read_text()
    for name in ("par_a", "par_b", "par_c"):  # each step logs the threads it ran on
        rows = [json.loads(line) for line in
                (Manifest("par").run_dir / name / "logs.jsonl").read_text().splitlines()]
        logged = [r for r in rows if "loss" in r or "train_runtime" in r]
        threads = job_threads(cores, 2, name == "par_c")
        assert logged and all(r["threads"] == threads for r in logged), name


@pytest.mark.parametrize("cores, jobs, alone, threads", [
    (2, 2, True, 2),    # alone: every core
    (2, 2, False, 1),   # beside another: its share
    (8, 2, False, 4),
    (1, 2, False, 1),   # never below one
])
def test_job_threads(cores, jobs, alone, threads):
    assert job_threads(cores, jobs, alone) == threads


def test_the_demo_runs_alone_only_stages_that_read_the_stage_before():
    """An ALONE stage waits for every other job to end: worth it only on the chain's critical
    path, where each stage reads the one before."""
    names = {stage_name(r): r for _, r in CHAIN}
    assert ALONE <= set(names)
    for name in ALONE:
        assert upstream(names[name], set(names)) & (ALONE | {"base"}), name


def test_parallel_chain_refuses_stages_that_wait_for_each_other(runs_root, tmp_path):
    chain = []
    for name, init in (("cyc_a", "cyc_b"), ("cyc_b", "cyc_a")):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"stage": "sft", "name": name, "init_from": init,
                                        "train_data": [{"task": "arithmetic", "n": 8}]}))
        chain.append(("sft", str(path)))
    with pytest.raises(UserError, match="cyc_a, cyc_b: each waits for a stage that waits for it"):
        run_chain("cycle", chain, jobs=2)
    assert not Manifest("cycle").run_dir.exists()  # nothing started, nothing written
