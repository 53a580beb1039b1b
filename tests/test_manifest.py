"""The run manifest: atomic writes, lineage, and one-line errors for missing/unfinished stages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from plans import plan

from posttrain import atomic
from posttrain.errors import UserError
from posttrain.manifest import Manifest
from posttrain.plan import plan_sha256, resolve_ref


def _run_stage(m: Manifest, name: str, init_from: str | None = None, done: bool = True) -> None:
    m.begin(plan(m, name, recipe={"stage": name, "init_from": init_from}, init=init_from))
    if done:
        m.finish(name, {"train_loss": 1.0})


def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "sub" / "m.json"
    atomic.write_json(path, {"a": 1})
    atomic.write_json(path, {"b": [1, 2]})
    assert json.loads(path.read_text()) == {"b": [1, 2]}
    assert [p.name for p in path.parent.iterdir()] == ["m.json"]  # no temp files left


def test_atomic_write_failure_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "m.json"
    atomic.write_text(path, "old\n")

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic.write_text(path, "new\n")
    monkeypatch.undo()
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_stage_entry_records_lineage_and_provenance(tmp_path):
    m = Manifest("r", root=tmp_path)
    _run_stage(m, "base")
    _run_stage(m, "sft", init_from="base")
    on_disk = json.loads((tmp_path / "r" / "manifest.json").read_text())
    sft = on_disk["stages"]["sft"]
    init = sft["plan"]["refs"]["init"]
    assert sft["status"] == "done" and init["stage"] == "base"
    assert init["path"] == on_disk["stages"]["base"]["output_dir"]
    assert init["stage_ended"] == on_disk["stages"]["base"]["ended"]
    assert sft["plan"]["recipe"] == {"stage": "sft", "init_from": "base"}
    assert sft["plan_sha256"] == plan_sha256(sft["plan"])
    assert sft["started"] <= sft["ended"] and sft["attempts"] == 1
    assert sft["metrics"] == {"train_loss": 1.0}
    assert "git_commit" in sft
    assert Manifest("r", root=tmp_path).resolve("sft") == m.stage_dir("sft") / "model"


def test_plan_hash_ignores_key_order():
    assert plan_sha256({"a": 1, "b": 2}) == plan_sha256({"b": 2, "a": 1})
    assert plan_sha256({"a": 1}) != plan_sha256({"a": 2})


def test_resolve_missing_stage(tmp_path):
    m = Manifest("r", root=tmp_path)
    _run_stage(m, "base")
    with pytest.raises(UserError) as e:
        m.resolve("sft")
    msg = str(e.value)
    assert "stage 'sft' has not run in run 'r' (done: base)" in msg and "\n" not in msg


@pytest.mark.parametrize("finish", ["running", "failed"])
def test_resolve_unfinished_stage(tmp_path, finish):
    m = Manifest("r", root=tmp_path)
    _run_stage(m, "base", done=False)
    if finish == "failed":
        m.fail("base", "RuntimeError: boom")
        assert m.stage("base")["error"] == "RuntimeError: boom"
    with pytest.raises(UserError, match=f"stage 'base' of run 'r' is '{finish}', not done"):
        Manifest("r", root=tmp_path).resolve("base")


def test_rerun_counts_attempts_and_resets_status(tmp_path):
    m = Manifest("r", root=tmp_path)
    _run_stage(m, "base", done=False)
    m.fail("base", "killed")
    _run_stage(m, "base", done=False)
    entry = Manifest("r", root=tmp_path).stage("base")
    assert entry["attempts"] == 2 and entry["status"] == "running" and "error" not in entry


def test_writers_do_not_clobber_each_other(tmp_path):
    """An eval of `sft` (another process) while `grpo` trains: both results survive."""
    trainer = Manifest("r", root=tmp_path)
    _run_stage(trainer, "sft")
    _run_stage(trainer, "grpo", init_from="sft", done=False)
    evaluator = Manifest("r", root=tmp_path)
    evaluator.set_eval("sft", "gsm8k", {"gsm8k": {"pass@1": 0.5}})
    trainer.finish("grpo")
    trainer.set_eval("grpo", "tiny", {"arithmetic": {"pass@1": 0.9}})
    stages = Manifest("r", root=tmp_path).stages
    assert stages["sft"]["eval"] == {"gsm8k": {"gsm8k": {"pass@1": 0.5}}}
    assert stages["grpo"]["status"] == "done"
    assert stages["grpo"]["eval"]["tiny"]["arithmetic"]["pass@1"] == 0.9


@pytest.mark.parametrize("name", ["", "a/b", ".hidden", "../up"])
def test_bad_run_names(tmp_path, name):
    with pytest.raises(UserError, match="bad run name"):
        Manifest(name, root=tmp_path)


def test_corrupt_manifest_is_one_line_error(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="is not valid JSON"):
        Manifest("r", root=tmp_path)


def test_resolve_ref(tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_RUNS_DIR", str(tmp_path / "runs"))
    m = Manifest("r")
    _run_stage(m, "base")
    model_dir = tmp_path / "local-model"
    model_dir.mkdir()
    base = resolve_ref("base", m)
    assert base == {"from": "base", "path": str(m.stage_dir("base") / "model"), "stage": "base",
                    "stage_ended": m.stage("base")["ended"]}
    assert resolve_ref(str(model_dir), m) == {"from": str(model_dir), "path": str(model_dir)}
    hub = "Qwen/Qwen2.5-1.5B-Instruct"
    assert resolve_ref(hub, m) == {"from": hub, "path": hub}
    with pytest.raises(UserError, match="stage 'sft' has not run"):
        resolve_ref("sft", m)  # never a guess at the latest checkpoint


def test_a_folder_named_like_a_stage_does_not_shadow_it(tmp_path, monkeypatch):
    """`init_from: base` is the run's `base` stage even with a `./base` folder in the cwd."""
    monkeypatch.setenv("POSTTRAIN_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base").mkdir()
    m = Manifest("r")
    _run_stage(m, "base")
    assert resolve_ref("base", m)["path"] == str(m.stage_dir("base") / "model")


def _begin_many(root: str, prefix: str, count: int) -> None:
    from posttrain.manifest import Manifest
    for i in range(count):
        m = Manifest("race", root=Path(root))
        m.begin(plan(m, f"{prefix}{i}", "sft", recipe={"i": i}))


def test_concurrent_writers_lose_no_stage(tmp_path):
    """Two processes recording stages of one run at once: the lock keeps every entry."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_begin_many, args=(str(tmp_path), p, 15)) for p in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    from posttrain.manifest import Manifest
    stages = Manifest("race", root=tmp_path).stages
    assert sorted(stages) == sorted([f"a{i}" for i in range(15)] + [f"b{i}" for i in range(15)])
