"""Shared fixtures: a tiny run (base + cold-start SFT) built once per test session, on CPU."""

from __future__ import annotations

import os
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


def _default_threads() -> int:
    """Two torch threads, or the cores shared out among pytest-xdist workers (one each on two
    cores): oversubscribed threads slow torch many times over."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", 1))
    return max(1, min(2, (os.cpu_count() or 1) // workers))


@pytest.fixture(autouse=True, scope="session")
def _threads():
    from posttrain import runtime
    threads = int(os.environ.get("POSTTRAIN_THREADS", 0)) or _default_threads()
    os.environ["POSTTRAIN_THREADS"] = str(threads)  # subprocesses (CLI, accelerate) too
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
    return root


@pytest.fixture(scope="session")
def tiny_run(runs_root) -> str:
    """Run `tiny` with `base` and `sft` done (few steps, no eval): a real model to work on."""
    from posttrain.runner import run_stage
    os.chdir(ROOT)
    run_stage("base", "recipes/tiny/base.yaml", "tiny",
              {"max_steps": "40", "save_steps": "1000", "eval_suite": "null"}, eval_after=False)
    run_stage("sft", "recipes/tiny/sft.yaml", "tiny",
              {"max_steps": "40", "save_steps": "1000", "eval_suite": "null"}, eval_after=False)
    return "tiny"


@pytest.fixture(scope="session")
def teacher_run(tiny_run) -> str:
    """`tiny` plus stage `teacher`: a fresh tiny Llama SFT'd on 1-digit sums until most of its
    samples are right — a model worth rejection sampling and distilling from (tests only)."""
    from posttrain.manifest import Manifest
    from posttrain.models import build_tiny_model, load_tokenizer
    from posttrain.runner import run_stage
    m = Manifest(tiny_run)
    init = m.run_dir / "fresh_llama"
    if not init.exists():
        tok = load_tokenizer(m.resolve("base"))
        build_tiny_model("llama", tok, num_attention_heads=2, num_key_value_heads=1
                         ).save_pretrained(init)
        tok.save_pretrained(init)
    run_stage("sft", "recipes/tiny/sft.yaml", tiny_run,
              {"name": "teacher", "init_from": str(init), "max_steps": "150",
               "train_data": "[{task: arithmetic, n: 60, digits: 1}]", "learning_rate": "0.003",
               "save_steps": "1000", "eval_suite": "null"}, eval_after=False)
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
