"""Shared fixtures: a tiny run (base + cold-start SFT) built once per test session, on CPU."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

# The benchmark suites read their local copies from $POSTTRAIN_DATA_DIR (they name no path).
if SHARED_DATA.is_dir():
    os.environ.setdefault("POSTTRAIN_DATA_DIR", str(SHARED_DATA))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _work_unit(nodeid: str) -> str:
    """A test module is one unit of work for pytest-xdist (its fixtures are built once), except
    the end-to-end runs of the real-tokenizer families: one unit each, so they run side by side."""
    return nodeid if "end_to_end[" in nodeid else nodeid.split("::")[0]


def pytest_collection_modifyitems(config, items):
    """Slow work first: the end-to-end runs, then modules with slow tests, so that under xdist
    the long units start at once instead of running alone at the end."""
    slow = {i.module.__name__ for i in items if i.get_closest_marker("slow")}
    items.sort(key=lambda i: ("end_to_end[" not in i.nodeid, i.module.__name__ not in slow))


if importlib.util.find_spec("xdist") is not None:
    def pytest_xdist_make_scheduler(config, log):
        """`--dist loadfile` (as `make test` runs it) with the units of `_work_unit`."""
        if config.getvalue("dist") != "loadfile":
            return None
        from xdist.scheduler import LoadScopeScheduling

        class UnitScheduling(LoadScopeScheduling):
            def _split_scope(self, nodeid: str) -> str:
                return _work_unit(nodeid)

        return UnitScheduling(config, log)


def _threads_per_process() -> int:
    """$POSTTRAIN_THREADS (2 when unset), capped at the cores shared out among pytest-xdist
    workers (one each where there are as many workers as cores, or more): oversubscribed
    threads slow torch many times over."""
    wanted = int(os.environ.get("POSTTRAIN_THREADS", 0)) or 2
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", 1))
    return max(1, min(wanted, (os.cpu_count() or 1) // workers))


@pytest.fixture(autouse=True, scope="session")
def _threads():
    from posttrain import runtime
    threads = _threads_per_process()
    # Subprocesses (the CLI, accelerate launches, vLLM's workers) get the same count.
    os.environ["POSTTRAIN_THREADS"] = os.environ["OMP_NUM_THREADS"] = str(threads)
    runtime.configure(threads)
    runtime.quiet()


@pytest.fixture(autouse=True)
def _in_root(monkeypatch):
    """Recipes use repo-relative paths (eval/tiny.yaml): run each test from the repo root."""
    monkeypatch.chdir(ROOT)


@pytest.fixture(scope="session")
def runs_root(tmp_path_factory) -> Path:
    """A runs dir for the session; POSTTRAIN_RUNS_DIR points at it."""
    root = tmp_path_factory.mktemp("runs")
    os.environ["POSTTRAIN_RUNS_DIR"] = str(root)
    # Converted checkpoints (the bundled GGUF) in a folder every xdist worker sees: the first to
    # need one converts it, under imported_dir's lock, and the others read it.
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    os.environ["POSTTRAIN_MODEL_CACHE"] = str(shared / "models")
    return root


def _built_once(tmp_path_factory, key: str, build) -> Path:
    """The runs dir in which `build()` ran once for the whole test session: the first
    pytest-xdist worker to ask builds it (in a folder every worker sees, under a file lock) and the
    others wait for it, so a fixture run costs one build, not one per worker."""
    from filelock import FileLock
    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / f"built-{key}"
    with FileLock(f"{shared}.lock"):
        if not (shared / ".built").exists():
            shutil.rmtree(shared, ignore_errors=True)
            shared.mkdir(parents=True)
            own = os.environ["POSTTRAIN_RUNS_DIR"]
            os.environ["POSTTRAIN_RUNS_DIR"] = str(shared)
            try:
                build()
            finally:
                os.environ["POSTTRAIN_RUNS_DIR"] = own
            (shared / ".built").touch()
    return shared


def _adopt(built: Path, run: str, stages: list[str], folders: tuple[str, ...] = ()) -> None:
    """Copy `stages` of `run` from the shared runs dir `built` into this process's runs dir: their
    folders (and the run's other `folders`), and their manifest entries, with the absolute paths
    the manifest and the plans hold rewritten to the copy."""
    from posttrain.manifest import Manifest
    own = Path(os.environ["POSTTRAIN_RUNS_DIR"])

    def moved(text: str) -> str:
        return text.replace(str(built), str(own))

    src = built / run
    entries = json.loads(moved((src / "manifest.json").read_text()))["stages"]
    manifest = Manifest(run)  # this process's copy of the run (a new one if it has none yet)
    for name in (*stages, *folders):
        shutil.copytree(src / name, manifest.run_dir / name)
        for plan in (manifest.run_dir / name).rglob("posttrain_plan.json"):
            plan.write_text(moved(plan.read_text()))
    manifest.stages.update({name: entries[name] for name in stages})
    manifest.save()


def _build_tiny() -> None:
    from posttrain.runner import run_stage
    os.chdir(ROOT)
    for kind in ("base", "sft"):
        run_stage(kind, f"recipes/tiny/{kind}.yaml", "tiny",
                  {"max_steps": "40", "save_steps": "1000", "eval_suite": "null"}, eval_after=False)


def _build_teacher(tmp_path_factory) -> None:
    """On a copy of the tiny run (its tokenizer is the one every worker's copy has)."""
    from posttrain.manifest import Manifest
    from posttrain.models import build_tiny_model, load_tokenizer
    from posttrain.runner import run_stage
    _adopt(_built_once(tmp_path_factory, "tiny", _build_tiny), "tiny", ["base", "sft"])
    os.chdir(ROOT)
    m = Manifest("tiny")
    init = m.run_dir / "fresh_llama"
    tok = load_tokenizer(m.resolve("base"))
    build_tiny_model("llama", tok, num_attention_heads=2, num_key_value_heads=1
                     ).save_pretrained(init)
    tok.save_pretrained(init)
    run_stage("sft", "recipes/tiny/sft.yaml", "tiny",
              {"name": "teacher", "init_from": str(init), "max_steps": "150",
               "train_data": "[{task: arithmetic, n: 60, digits: 1}]", "learning_rate": "0.003",
               "save_steps": "1000", "eval_suite": "null"}, eval_after=False)


@pytest.fixture(scope="session")
def tiny_run(runs_root, tmp_path_factory) -> str:
    """Run `tiny` with `base` and `sft` done (few steps, no eval): a real model to work on. Built
    once per session, copied into each worker's runs dir."""
    _adopt(_built_once(tmp_path_factory, "tiny", _build_tiny), "tiny", ["base", "sft"])
    return "tiny"


@pytest.fixture(scope="session")
def teacher_run(tiny_run, tmp_path_factory) -> str:
    """`tiny` plus stage `teacher`: a fresh tiny Llama SFT'd on 1-digit sums (tests only). It
    writes the format and has not learned to read the operands: at T=0.7 about a tenth of its
    answers are right (16-28 of 192 over three init seeds), mostly through wrong steps. A test
    that needs some of its samples right counts on that margin; one that needs more controls
    the sample. Built once per session on a copy of the tiny run; its stage is copied in."""
    built = _built_once(tmp_path_factory, "teacher", lambda: _build_teacher(tmp_path_factory))
    _adopt(built, tiny_run, ["teacher"], folders=("fresh_llama",))
    return tiny_run


@pytest.fixture
def manifest(tiny_run):
    from posttrain.manifest import Manifest
    return Manifest(tiny_run)


@pytest.fixture
def engines_at_train_start(monkeypatch) -> list[list[str]]:
    """A spy on transformers' `Trainer.train` (every TRL trainer trains through it): it records
    which generation engines (`posttrain.rollout.live_engines`) are alive when a trainer starts,
    then trains as usual. One list per `train` call."""
    from transformers import Trainer

    from posttrain.rollout import live_engines

    seen: list[list[str]] = []
    real_train = Trainer.train

    def train(self, *args, **kwargs):
        seen.append(live_engines())
        return real_train(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train", train)
    return seen


@pytest.fixture(scope="session")
def tool_run(runs_root) -> str:
    """Run `tools`: the tool world's base (recipes/tiny/tools_base.yaml, shrunk) and a cold start
    whose every trace calls Python (100 steps): a model that makes tool calls, right or not."""
    from posttrain.runner import run_stage
    os.chdir(ROOT)
    run_stage("base", "recipes/tiny/tools_base.yaml", "tools",
              {"max_steps": "40", "save_steps": "1000"}, eval_after=False)
    run_stage("sft", "recipes/tiny/tools_sft.yaml", "tools",
              {"max_steps": "100", "save_steps": "1000", "eval_suite": "null",
               "train_data": "[{task: product, n: 400, tool_share: 1.0}]"}, eval_after=False)
    return "tools"
