"""Eval suites: every suite parses, and the real benchmark suites score their own gold answers.

The benchmark files live in ../shared/data (beside the checkout, never copied into the repo). A
gold solution fed through the suite's own loading and extraction must score as correct on at
least 99% of each file; an answer that is off by one must never score.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from posttrain.errors import UserError
from posttrain.evaluate import load_suite, local_path, task_prompts
from posttrain.scoring import gold_answer, score

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"  # as in conftest.py: beside the checkout

SUITES = sorted((ROOT / "eval").glob("*.yaml"))
BENCHMARKS = ["gsm8k", "aime24", "amc23", "minerva_math", "math500"]
_INT = re.compile(r"-?\d+(?:\.0+)?")


@pytest.mark.parametrize("path", SUITES, ids=lambda p: p.stem)
def test_every_suite_parses(path: Path):
    suite = load_suite(path)
    assert suite.tasks and 1 <= suite.k <= suite.n


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_suite_has_local_path_and_hub_fallback(name: str):
    suite = load_suite(ROOT / "eval" / f"{name}.yaml")
    for st in suite.tasks:
        assert st.task is None and st.path and st.hub, f"{name}/{st.name} needs path: and hub:"
        assert suite.temperature > 0 and suite.max_new_tokens >= 2048


def _gold_rows(name: str) -> list[dict]:
    suite = load_suite(ROOT / "eval" / f"{name}.yaml")
    (st,) = suite.tasks
    local = local_path(st, suite)
    if not SHARED_DATA.is_dir() or local is None or not local.exists():
        pytest.skip(f"{local} not present (the shared benchmark data sits beside the checkout)")
    return task_prompts(st, suite)


@pytest.mark.parametrize("name", ["gsm8k", "aime24", "amc23", pytest.param(
    "minerva_math", marks=pytest.mark.slow)])  # sympy parses 272 symbolic golds: 10-25 s
def test_gold_answers_score_on_real_files(name: str):
    rows = _gold_rows(name)
    assert len(rows) >= 30 and all(r["prompt"][-1]["content"] for r in rows)
    tagged = [score(f"<think>worked</think><answer>{gold_answer(r['gold'])}</answer>", r["gold"])
              for r in rows]
    # None (gold unparseable, sample skipped) counts as a miss: skipping is how 16% of
    # minerva_math once went unscored.
    rate = sum(ok is True for ok in tagged) / len(rows)
    assert rate >= 0.99, f"{name}: gold scored right on {rate:.1%} of {len(rows)}"


@pytest.mark.parametrize("name", ["gsm8k", "aime24", "amc23"])
def test_other_answer_forms_score_on_real_files(name: str):
    """The whole GSM8K solution (`… #### 18`) and a `\\boxed{}` answer both count."""
    rows = _gold_rows(name)
    forms = [r["gold"] for r in rows] if name == "gsm8k" else \
        [f"So the answer is $\\boxed{{{gold_answer(r['gold'])}}}$." for r in rows]
    rate = sum(score(text, r["gold"]) is True for text, r in zip(forms, rows)) / len(rows)
    assert rate >= 0.99, f"{name}: {rate:.1%}"


@pytest.mark.parametrize("name", ["gsm8k", "aime24", "amc23", "minerva_math"])
def test_off_by_one_never_scores(name: str):
    rows = [r for r in _gold_rows(name) if _INT.fullmatch(gold_answer(r["gold"]).replace(",", ""))]
    assert rows, f"{name}: no integer golds to perturb"
    wrong = [score(f"<answer>{int(float(gold_answer(r['gold']).replace(',', ''))) + 1}</answer>",
                   r["gold"]) for r in rows]
    assert not any(wrong), f"{name}: {sum(map(bool, wrong))} wrong answers scored right"


@pytest.mark.parametrize("gold, said, right", [
    # MATH-500-style LaTeX golds, bare as the `answer` column holds them.
    ("\\frac{14}{3}", "\\frac{14}{3}", True),
    ("\\frac{14}{3}", "14/3", True),
    ("\\frac{\\pi}{2}", "\\pi/2", True),
    ("\\frac{\\pi}{2}", "\\pi", False),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\frac{\\pi}{2})", True),
    ("10\\sqrt{2}", "\\sqrt{200}", True),
    ("10\\sqrt{2}", "10", False),
    ("\\alpha", "\\alpha", True),
    ("27.0", "27", True),  # amc23 stores answers as floats
    ("#### 1,000", "1000", True),
])
def test_latex_golds(gold: str, said: str, right: bool):
    assert score(f"<think>w</think><answer>{said}</answer>", gold) is right


def test_data_dir_env_overrides_suite_data_dir(tmp_path, monkeypatch):
    (tmp_path / "gsm8k").mkdir()
    rows = [{"question": f"What is {i}+1?", "answer": f"{i}+1={i + 1}\n#### {i + 1}"}
            for i in range(3)]
    (tmp_path / "gsm8k" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setenv("POSTTRAIN_DATA_DIR", str(tmp_path))
    suite = load_suite(ROOT / "eval" / "gsm8k.yaml")
    out = task_prompts(suite.tasks[0], suite)
    # R1 prompting (answer_format: boxed): the question, then the \boxed{} instruction.
    assert [r["prompt"][-1]["content"] for r in out] == [
        r["question"] + "\nPlease reason step by step, and put your final answer within \\boxed{}."
        for r in rows]
    assert [m["role"] for m in out[0]["prompt"]] == ["user"]  # no system turn
    assert score("<answer>3</answer>", out[2]["gold"]) is True


def test_missing_local_file_without_hub_is_one_line_error(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("data_dir: /nonexistent\ntasks:\n  - {name: x, path: x.jsonl}\n")
    suite = load_suite(path)
    with pytest.raises(UserError, match="not found and no hub"):
        task_prompts(suite.tasks[0], suite)


def test_benchmark_task_typo_is_an_error(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("tasks:\n  - {name: x, hub: a/b, answer_feild: answer}\n")
    with pytest.raises(UserError, match="answer_feild"):
        load_suite(path)
