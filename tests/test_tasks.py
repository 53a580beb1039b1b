"""Synthetic tasks: deterministic, disjoint splits, checkers that accept gold and reject the rest."""

from __future__ import annotations

import builtins
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrain.data import load_source
from posttrain.errors import UserError
from posttrain.tasks import TASKS, get_task
from posttrain.tasks.base import load_meta
from posttrain.tasks.expression import ExpressionError, evaluate

arith, countdown = TASKS["arithmetic"], TASKS["countdown"]


def _meta(ex) -> dict:
    return load_meta(ex.to_row()["meta"])  # the checkers' contract: meta as it travels in rows


@pytest.mark.parametrize("name", sorted(TASKS))
def test_deterministic_by_seed(name):
    task = TASKS[name]
    assert task.generate("train", 50, seed=3) == task.generate("train", 50, seed=3)
    assert task.generate("train", 50, seed=3) != task.generate("train", 50, seed=4)


@pytest.mark.parametrize("name, knobs", [("arithmetic", {"digits": 2}),
                                         ("countdown", {"count": 3})])
def test_train_and_test_splits_are_disjoint(name, knobs):
    task = TASKS[name]
    train = task.generate("train", 1000, seed=0, **knobs)
    test = task.generate("test", 200, seed=1, **knobs)
    assert len(train) == 1000 and len(test) == 200
    assert not {e.meta["key"] for e in train} & {e.meta["key"] for e in test}
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    assert len({e.meta["key"] for e in test}) == len(test)  # distinct within a split too


def test_small_problem_space_returns_what_exists():
    # 1-digit addition has 100 problems; about a fifth are test problems. Asking for more
    # returns all of them (the same set for any seed), not duplicates and not an endless loop.
    test = arith.generate("test", 1000, seed=0, digits=1)
    assert 5 < len(test) < 40
    assert {e.meta["key"] for e in arith.generate("test", 1000, seed=9, digits=1)} == \
        {e.meta["key"] for e in test}


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6), lo=st.integers(1, 4), span=st.integers(0, 2),
       carries=st.booleans(), split=st.sampled_from(["train", "test"]))
def test_arithmetic_gold_answer_and_trace_check(seed, lo, span, carries, split):
    for ex in arith.generate(split, 20, seed=seed, digits=[lo, lo + span], carries=carries):
        meta = _meta(ex)
        assert arith.check_answer(ex.answer, meta) and arith.check_trace(ex.trace, meta)
        assert int(ex.answer) == int(meta["a"]) + int(meta["b"])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6), count=st.integers(2, 5), max_number=st.integers(3, 20),
       split=st.sampled_from(["train", "test"]))
def test_countdown_gold_answer_and_trace_check(seed, count, max_number, split):
    for ex in countdown.generate(split, 10, seed=seed, count=count, max_number=max_number):
        meta = _meta(ex)
        assert countdown.check_answer(ex.answer, meta), (ex.answer, meta)
        assert countdown.check_trace(ex.trace, meta), (ex.trace, meta)


def test_arithmetic_difficulty_knobs():
    two = arith.generate("train", 200, seed=0, digits=2)
    assert all(len(e.meta["a"]) == len(e.meta["b"]) == 2 for e in two)
    assert all(e.prompt.startswith("What is ") for e in two)
    mixed = arith.generate("train", 300, seed=0, digits=[1, 3])
    assert {e.meta["digits"] for e in mixed} == {1, 2, 3}
    easy = arith.generate("train", 300, seed=0, digits=3, carries=False)
    assert not any(e.meta["carry"] for e in easy)
    assert any(e.meta["carry"] for e in arith.generate("train", 300, seed=0, digits=3))


def test_arithmetic_pads_operands_and_traces_digitwise():
    ex = next(e for e in arith.generate("train", 500, seed=0, digits=3) if e.meta["a"][0] == "0")
    a, b = ex.meta["a"], ex.meta["b"]
    assert f"{a}+{b}" in ex.prompt and len(ex.trace.split("|")) == 3
    assert arith.check_trace("6+4+0=10 c1|5+0+1=6 c0|0+5+0=5 c0", {"a": "056", "b": "504"})


def test_countdown_difficulty_knobs():
    four = countdown.generate("train", 100, seed=0, count=4, max_number=5)
    assert all(len(e.meta["numbers"]) == 4 and max(e.meta["numbers"]) <= 5 for e in four)
    mixed = countdown.generate("train", 200, seed=0, count=[2, 4])
    assert {len(e.meta["numbers"]) for e in mixed} == {2, 3, 4}


ARITH_META = {"a": "056", "b": "504", "answer": "560"}


@pytest.mark.parametrize("answer, ok", [
    ("560", True), (" 560 ", True), ("+560", True), ("0560", True),
    ("561", False), ("56", False), ("", False), ("5 60", False), ("560.0", False),
    ("five hundred sixty", False), ("560 apples", False), ("-560", False),
])
def test_arithmetic_answer_checker(answer, ok):
    assert arith.check_answer(answer, ARITH_META) is ok


@pytest.mark.parametrize("trace, ok", [
    ("6+4+0=10 c1|5+0+1=6 c0|0+5+0=5 c0", True),
    ("6+4+0=10 c0|5+0+0=5 c0|0+5+0=5 c0", False),  # dropped carry
    ("6+4+0=10 c1|5+0+1=7 c0|0+5+0=5 c0", False),  # wrong sum
    ("6+4+0=10 c1|5+0+1=6 c0", False),  # missing digit
    ("4+6+0=10 c1|0+5+1=6 c0|5+0+0=5 c0", False),  # wrong operands
    ("6+4=10|5+1=6|5=5", False),  # not the step format
    ("", False),
])
def test_arithmetic_trace_checker(trace, ok):
    assert arith.check_trace(trace, ARITH_META) is ok


@pytest.mark.parametrize("trace, meta, share", [
    ("6+4+0=10 c1|5+0+1=6 c0|0+5+0=5 c0", ARITH_META, 1.0),
    ("6+4+0=10 c0|5+0+0=5 c0|0+5+0=5 c0", ARITH_META, 1 / 3),  # a dropped carry
    ("6+4+0=10 c1|5+0+1=6 c0", ARITH_META, 2 / 3),  # a column missing
    ("6+4+0=10 c1|5+0+1=6 c0|0+5+0=5 c0|0+0+0=0 c0", ARITH_META, 3 / 4),  # one extra
    ("garbage", ARITH_META, 0.0),
    ("5 + 4 = 9, carry 0. 8 + 5 = 13, carry 1. So 80 + 54 = 134.",
     {"a": "80", "b": "54", "style": "words"}, 0.5),  # the wrong ones digit
    ("0 + 4 = 4, carry 0. 8 + 5 = 13, carry 1. So 80 + 54 = 134.",
     {"a": "80", "b": "54", "style": "words"}, 1.0),
])
def test_arithmetic_step_score_is_the_share_of_columns_right(trace, meta, share):
    assert arith.step_score(trace, meta) == pytest.approx(share)
    assert arith.check_trace(trace, meta) is (share == 1.0)


def test_step_score_of_a_task_without_columns_is_its_trace_check():
    ex = countdown.generate("train", 1, seed=0)[0]
    assert countdown.step_score(ex.trace, ex.meta) == 1.0
    assert countdown.step_score("no steps here", ex.meta) == 0.0


CD_META = {"numbers": [2, 3, 5], "target": 10}


@pytest.mark.parametrize("answer, ok", [
    ("2*5", True), ("(5-3)*5", False), ("5*(3-2)+5", False), ("(3-2+1)*5", False),
    ("5+5", False),  # 5 given once, used twice
    ("2*5*1", False),  # 1 not given
    ("(2+3)*2", False),  # 2 reused
    ("2*5=10", True), ("5 × 2", True), ("5*2 + 3 - 3", False),
    ("(2+3)+5", True), ("2*3+5", False), ("10", False), ("2**5", False), ("", False),
    ("2*(5", False), ("2*5)", False), ("-2+12", False), ("5/0+10", False),
    ("__import__('os')", False), ("abs(-10)", False), ("2 5", False), ("2e1", False),
])
def test_countdown_answer_checker(answer, ok):
    assert countdown.check_answer(answer, CD_META) is ok


def test_countdown_allows_a_number_as_often_as_given():
    meta = {"numbers": [3, 3, 5], "target": 14}
    assert countdown.check_answer("3*3+5", meta)
    assert not countdown.check_answer("3*3+5+3-3", meta)


@pytest.mark.parametrize("trace, ok", [
    ("2*5=10", True), ("5*2=10", True), ("2+3=5|5+5=10", True),
    ("2+3=5|5*2=10", False),  # reuses 2
    ("2*5=11", False), ("2*5=10|10+0=10", False), ("3+3=6|6+4=10", False), ("", False),
])
def test_countdown_trace_checker(trace, ok):
    assert countdown.check_trace(trace, CD_META) is ok


@pytest.mark.parametrize("text, value, used", [
    ("1+2*3", 7, [1, 2, 3]), ("(1+2)*3", 9, [1, 2, 3]), ("6/4*2", 3, [6, 4, 2]),
    ("7/2", Fraction(7, 2), [7, 2]), ("10-3-2", 5, [10, 3, 2]), ("((4))", 4, [4]),
])
def test_expression_parser(text, value, used):
    assert evaluate(text) == (value, used)


@pytest.mark.parametrize("text", ["", "1+", "(1", "1)", "1 2", "1/0", "a", "1^2", "(" * 60 + "1" + ")" * 60,
                                  "1+" * 150 + "1"])
def test_expression_parser_rejects(text):
    with pytest.raises(ExpressionError):
        evaluate(text)


def test_checkers_never_call_eval_or_exec(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("eval/exec called")

    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    for ex in countdown.generate("test", 30, seed=0, count=4):
        assert countdown.check_answer(ex.answer, _meta(ex))
    assert not countdown.check_answer("__import__('os').system('true')", CD_META)


def test_unknown_task_and_bad_knob():
    with pytest.raises(ValueError, match="known tasks: arithmetic, countdown"):
        get_task("sudoku")
    # A typo'd difficulty knob is an error, not silently ignored.
    with pytest.raises(UserError, match="bad difficulty setting.*'digit'"):
        load_source({"task": "arithmetic", "n": 3, "digit": 2})


def test_rows_carry_meta_as_json():
    ds = load_source({"task": "countdown", "n": 4, "split": "test"}, seed=0)
    assert ds.column_names == ["task", "prompt", "answer", "trace", "meta"]
    row = ds[0]
    assert countdown.check_answer(row["answer"], load_meta(row["meta"]))
