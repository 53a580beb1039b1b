"""Table tests for posttrain.scoring: answer extraction, gold parsing, verification, format.

Shared by the eval suites and the RL rewards, so every parser bug found in either becomes a row.
"""

from __future__ import annotations

import json

import pytest

from posttrain.answer_format import is_well_formed
from posttrain.scoring import (
    boxed,
    completion_text,
    extract_answer,
    gold_answer,
    math_equal,
    score,
    think_text,
)

EXTRACT = [
    ("<think>2+2</think><answer>4</answer>", "4"),
    ("<answer> 4 </answer> then <answer>5</answer>", "5"),  # the last tagged answer
    ("so \\boxed{\\frac{1}{2}} done", "\\frac{1}{2}"),
    ("\\boxed{a} and later \\boxed{\\{1,2\\}}", "\\{1,2\\}"),  # last box, nested braces
    ("\\boxed 7 is it", "7"),  # brace-less \boxed
    ("\\boxed 7 and a set {1}", "7"),  # bug: took the braces of a later `{1}`
    ("\\boxed{unclosed", None),
    ("The final answer is 42.", "42"),
    ("The final answer is 18, which is the total", "18"),  # bug: kept ", which is the total"
    ("the answer is 3 apples.", "3"),
    ("Answer: $x^2$", "x^2"),
    ("the answer isn't obvious; we get 12 in the end", "12"),  # bug: "n't obvious; ..."
    ("we have 1,000 apples", "1,000"),
    ("pairs 3,4", "4"),  # bug: "3,4" read as one number 34
    ("total: 18, done", "18"),  # bug: trailing comma kept
    ("x = -2.5", "-2.5"),
    ("no digits here", None),
    ("", None),
]


@pytest.mark.parametrize("text, expected", EXTRACT)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("gold, expected", [
    ("Natalia sold 48/2 = 24 clips.\n#### 72", "72"),
    ("#### 1,000\n", "1,000"),
    ("The area is $\\boxed{12\\pi}$.", "12\\pi"),
    ("  17 ", "17"),
])
def test_gold_answer(gold, expected):
    assert gold_answer(gold) == expected


MATH = [
    ("1000", "1,000", True),
    ("1,000", "#### 1000", True),
    ("0.5", "\\frac12", True),  # bare LaTeX gold: math-verify reads only delimited LaTeX
    ("\\frac{1}{2}", "0.5", True),
    ("\\sqrt{2}", "\\boxed{\\sqrt2}", True),
    ("18,", "18", True),
    ("3.14", "\\pi", False),
    ("x", "42", False),
    ("41", "42", False),
    ("42", "\\boxed{}", None),  # unparseable gold: None, the sample is skipped
    ("42", "", None),
]


@pytest.mark.parametrize("answer, gold, expected", MATH)
def test_math_equal(answer, gold, expected):
    assert math_equal(answer, gold) is expected


ADD = json.dumps({"a": "056", "b": "504", "answer": "560"})


@pytest.mark.parametrize("text, gold, task, meta, expected", [
    ("<think>t</think><answer>560</answer>", None, "arithmetic", ADD, True),
    ("<answer>0560</answer>", None, "arithmetic", ADD, True),  # task checker: integer compare
    ("<answer>559</answer>", None, "arithmetic", ADD, False),
    ("nothing", None, "arithmetic", ADD, False),
    ("<answer>560</answer>", "560", "arithmetic", None, True),  # no meta: math-verify on gold
    ("<answer>560</answer>", None, None, None, None),  # no gold at all: skip
    ("no number", "5", None, None, False),
    ("no number", "\\boxed{}", None, None, None),
])
def test_score(text, gold, task, meta, expected):
    assert score(text, gold, task=task, meta=meta) is expected


FORMAT = [
    ("<think>a</think><answer>1</answer>", True),
    ("a</think><answer>1</answer>", True),  # <think> opened by the chat template
    ("\n<think>\nline\nline\n</think>\n\n<answer>\n1\n</answer>\n", True),  # DOTALL, whitespace
    ("<think>a</think><answer>1</answer> more", False),
    ("<think>a</think>", False),
    ("<answer>1</answer>", False),
    ("<think>a</think>b</think><answer>1</answer>", False),  # bug: a stray </think> passed
    ("<think>a <answer>2</answer></think><answer>1</answer>", False),  # bug: answer in think
    ("<think>a</think><answer>1</answer></answer>", False),  # bug: stray </answer> passed
    ("<think> </think><answer>1</answer>", False),  # bug: empty reasoning passed
    ("<think>a</think><answer> </answer>", False),  # bug: blank answer passed
    ("<think>a<think>b</think><answer>1</answer>", False),
    ("<think>x</think><answer>1</answer><answer>2</answer>", False),
    ("", False),
]


# R1's format: reasoning, </think>, then a conclusion with a \boxed{} answer.
BOXED_FORMAT = [
    ("<think>a</think>\n\nThe answer is $\\boxed{5}$.", True),
    ("a</think>\n\nThe answer is $\\boxed{5}$.", True),  # <think> opened by the template
    ("<think>\n5+0=5\n</think>\n\n\\boxed{5}", True),
    ("<think>a</think>The answer is 5.", False),  # no box
    ("<think>a</think>The answer is $\\boxed{}$.", False),  # empty box
    ("<think>a \\boxed{5}</think>The answer is 5.", False),  # boxed only inside the reasoning
    ("The answer is $\\boxed{5}$.", False),  # no reasoning block
    ("<think> </think>\\boxed{5}", False),  # empty reasoning
    ("<think>a</think>b</think>\\boxed{5}", False),  # stray </think>
    ("<think>a</think><answer>5</answer>", False),  # the tags format is not the boxed one
]


@pytest.mark.parametrize("text, expected", FORMAT)
def test_is_well_formed(text, expected):
    assert is_well_formed(text) is expected


@pytest.mark.parametrize("text, expected", BOXED_FORMAT)
def test_is_well_formed_boxed(text, expected):
    assert is_well_formed(text, "boxed") is expected


@pytest.mark.parametrize("text, expected", [
    ("<think>abc</think><answer>1</answer>", "abc"),
    ("abc</think><answer>1</answer>", "abc"),
    ("<answer>1</answer>", None),
])
def test_think_text(text, expected):
    assert think_text(text) == expected


@pytest.mark.parametrize("completion, expected", [
    ("plain", "plain"),
    ([{"role": "assistant", "content": "hi"}], "hi"),
    ({"role": "assistant", "content": None}, ""),
    # content as a list of parts: bug, its repr was scored
    ([{"role": "assistant", "content": [{"type": "text", "text": "<answer>1</answer>"}]}],
     "<answer>1</answer>"),
    (None, ""),
    (42, ""),
])
def test_completion_text(completion, expected):
    assert completion_text(completion) == expected


def test_boxed_balanced():
    assert boxed("\\boxed{\\frac{a}{b}}") == "\\frac{a}{b}"
    assert boxed("nothing") is None
