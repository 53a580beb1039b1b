"""Answer verification on the forms real models write, unscorable golds, reward hacking, majority
by equivalence, the R1 eval protocol, and cases ported from open-r1's and TRL's reward tests.

Every verification bug becomes a row here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain.evaluate import majority_correct, metrics
from posttrain.extraction import extract_answer
from posttrain.rewards import REWARDS
from posttrain.scoring import gold_value, score

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def acc(text: str, gold: str, column: str = "answer") -> float | None:
    (out,) = REWARDS["accuracy"]([[{"role": "assistant", "content": text}]], **{column: [gold]})
    return out


# A correct answer (gold 18, as in MATH's money answers) written the ways models write it.
FORMS_18 = [
    "\\boxed{\\$18}",
    "<answer>\\$18</answer>",
    "The answer is \\$18.",
    "The answer is: $18$",
    "The final answer is:\n18",
    "Final Answer: The final answer is $18$. I hope it is correct.",
    "The answer is **18**.",
    "**Final answer:** 18",
    "The answer is $\\boxed{18}$.",
    "So she makes \\boxed{18} dollars.",
    "<think>2 * 9 = 18</think>\n\nThe answer is $\\boxed{18}$.",
    "Therefore, the final answer is $\\$18$.",
    "\\boxed{18 \\text{ dollars}}",
    "\\boxed{18.00}",
    "Answer: 18",
    "the answer is 18, which she earns daily.",
    "\\[\\boxed{18}\\]",
    "\\boxed{\\textbf{18}}",
    "She sells 16 - 3 - 4 = 9 eggs at $2 each: 9 * 2 = 18.\n#### 18",  # GSM8K's own marker
    "<think>9 eggs, $2 each</think>\n#### 18",
    "#### $18$",
]


@pytest.mark.parametrize("text", FORMS_18)
def test_correct_forms_score_right(text):
    assert acc(text, "18") == 1.0
    assert acc(text, "\\$18") == 1.0  # MATH writes money golds with the dollar sign
    assert acc(text, "She sells 9 eggs at $2.\n#### 18") == 1.0  # GSM8K gold


# (answer as written, gold) pairs that are the same value.
EQUIVALENT = [
    ("\\boxed{10{,}000}", "10000"),
    ("\\boxed{10,000}", "10000"),
    ("\\boxed{25\\%}", "25"),
    ("The answer is 25%.", "25"),
    ("\\boxed{90^\\circ}", "90"),
    ("\\boxed{90^{\\circ}}", "90"),
    ("\\boxed{x = 5}", "5"),
    ("\\boxed{12\\frac{3}{5}}", "\\frac{63}{5}"),
    ("\\boxed{12 \\frac{3}{5}}", "12\\frac{3}{5}"),
    ("\\boxed{\\dfrac{1}{2}}", "0.5"),
    ("\\boxed{[2, 5)}", "[2,5)"),
    ("\\boxed{(1, 2)}", "(1,2)"),
    ("\\boxed{(-\\infty, 3]}", "(-\\infty,3]"),
    ("\\boxed{3} first... then \\boxed{4}", "4"),  # several boxes: the last counts
    ("\\boxed{\\text{(C)}}", "C"),
    ("\\boxed{(C)}", "\\text{(C)}"),
    ("\\boxed{Monday}", "\\text{Monday}"),
    ("\\boxed{5 \\text{ cm}}", "5"),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}{2}"),
    ("<answer>1,000</answer>", "1000"),
]


@pytest.mark.parametrize("text, gold", EQUIVALENT)
def test_equivalent_forms(text, gold):
    assert acc(text, gold) == 1.0


# (answer as written, gold) pairs that differ: the forms above must not make wrong answers right.
DIFFERENT = [
    ("\\boxed{(1, 2)}", "(1,3)"),
    ("\\boxed{3,4}", "34"),  # a pair is not a number with a thousands separator
    ("\\boxed{4} first... then \\boxed{3}", "4"),  # the last box counts
    ("\\boxed{19}", "\\$18"),
    ("\\boxed{(B)}", "C"),
    ("\\boxed{Tuesday}", "Monday"),
]


@pytest.mark.parametrize("text, gold", DIFFERENT)
def test_different_values_score_wrong(text, gold):
    assert acc(text, gold) == 0.0


# Golds that are neither a math object nor a clean literal: every reward skips them (None),
# never a 1 (math-verify reads prose as a product of symbols) nor a 0.
UNSCORABLE = ["forty two", "two forty", "Answer is forty two.", "\\boxed{}", "#### ",
              "the answer is not known", ""]


@pytest.mark.parametrize("gold", UNSCORABLE)
def test_unscorable_gold_is_none_everywhere(gold):
    text = "<think>x</think><answer>two forty</answer>"
    assert gold_value(gold) is None
    assert acc(text, gold) is None and acc("\\boxed{42}", gold, "solution") is None
    cols = {"answer": [gold]}
    assert REWARDS["cosine"]([text], max_len=100, completion_ids=[[1] * 50], **cols) == [None]
    assert REWARDS["length"]([text, text + " more"], **cols) == [None, None]
    assert score(text, gold) is None


# Reward hacking: (completion, gold, the reward it must get).
HACKS = [
    ("<answer></answer>", "18", 0.0),                                  # empty answer
    ("\\boxed{}", "18", 0.0),
    ("<think>\\boxed{18}</think> I am not sure.", "18", 0.0),           # box only in reasoning
    ("<think>The answer is 18.</think>\n\nThe answer is 17.", "18", 0.0),
    ("\\boxed{17 or 18}", "18", 0.0),                                   # a hedge
    ("\\boxed{17, 18}", "18", 0.0),                                     # two different answers
    ("\\boxed{" + ", ".join(map(str, range(1, 60))) + "}", "18", 0.0),  # far longer than the gold
    ("18 is not it; I think it is 21", "18", 0.0),                      # no marked answer
    ("Let me compute: 3 * 6 = 18", "18", 0.0),                          # last number, unmarked
    ("The answer is forty two", "42", 0.0),                             # prose for a number
    ("#### Step 1: count 18 eggs\nthen sell them", "18", 0.0),           # a heading, no marker
    ("<think>#### 18</think>\n#### 17", "18", 0.0),                      # the last line counts
]


@pytest.mark.parametrize("text, gold, expected", HACKS)
def test_reward_hacking_cases(text, gold, expected):
    assert acc(text, gold) == expected


def test_last_number_fallback_is_for_evaluating_base_models():
    """Off for RL rewards by default; the eval's `score` keeps it to read a base model's plain
    answer."""
    text = "Let me compute: 3 * 6 = 18"
    assert extract_answer(text, last_number=False) is None
    assert extract_answer(text) == "18" and score(text, "18") is True
    assert acc(text, "18") == 0.0


def test_majority_groups_by_equivalence():
    answers = ["0.5", "\\frac{1}{2}", "1/2", "3", "3", None]
    # 0.5 and 1/2 are one value (3 votes) against 3 (2 votes).
    assert majority_correct(answers, [True, True, True, False, False, False]) is True
    assert majority_correct(["3", "3", "0.5"], [False, False, True]) is False


def test_eval_counts_unscorable_apart_and_reports_r1_figures():
    right = {"correct": True, "answer": "1", "well_formed": True, "tokens": 5}
    wrong = {"correct": False, "answer": "2", "well_formed": True, "tokens": 5}
    skipped = {"correct": None, "answer": "1", "well_formed": True, "tokens": 5}
    m = metrics([[right, right, wrong, wrong], [right, wrong, wrong, wrong],
                 [skipped] * 4], k=2)
    assert m["unscorable"] == 1 and m["n_prompts"] == 3
    assert m["pass@1"] == pytest.approx((0.5 + 0.25) / 2)  # over the scorable prompts
    assert m["pass@1_se"] == pytest.approx(0.125)  # sd 0.1768 over 2 prompts
    assert m["cons@4"] == pytest.approx(0.5) and "maj@2" in m


def test_r1_protocol_suite(tmp_path):
    from posttrain.evaluate import load_suite
    path = tmp_path / "s.yaml"
    path.write_text("protocol: r1\nn: 8\nk: 8\ntasks:\n  - {name: x, path: x.jsonl}\n")
    suite = load_suite(path)
    assert (suite.temperature, suite.top_p, suite.n) == (0.6, 0.95, 8)
    for name in ("aime24", "amc23", "gsm8k", "math500", "minerva_math"):
        real = load_suite(ROOT / "eval" / f"{name}.yaml")
        assert real.protocol == "r1" and real.answer_format == "boxed", name


@pytest.mark.parametrize("name, answer_field", [
    ("gsm8k/test.jsonl", "answer"), ("math_eval/aime24/test.jsonl", "answer"),
    ("math_eval/amc23/test.jsonl", "answer"), ("math_eval/minerva_math/test.jsonl", "solution")])
def test_real_benchmark_golds_are_scorable_and_score_themselves(name, answer_field):
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} not present (the shared benchmark data sits beside the checkout)")
    from posttrain.scoring import gold_answer
    golds = [str(json.loads(line)[answer_field]) for line in path.read_text().splitlines()]
    unscorable = [g[-80:] for g in golds if gold_value(g) is None]
    assert not unscorable, unscorable[:5]
    wrong = [g[-80:] for g in golds
             if score(f"<think>w</think>\n\nThe answer is $\\boxed{{{gold_answer(g)}}}$.", g)
             is not True]
    assert not wrong, wrong[:5]


# Ported from open-r1's tests/test_rewards.py and TRL's tests/test_rewards.py (accuracy, format,
# cosine, unparseable gold), as rows of our rewards. Where we differ by design, the row says so.
PORTED_ACCURACY = [
    ("\\boxed{\\frac{63}{400}}", "\\frac{63}{400}", 1.0),
    ("\\boxed{\\frac{64}{400}}", "\\frac{63}{400}", 0.0),
    ("\\boxed{\\frac{63}{400}}", "63/400", 1.0),
    ("\\boxed{3}", "6", 0.0),
    ("Answer is forty two.", "Answer is forty two.", None),
    ("Some other content. \\boxed{43}.", "Answer is forty three.", None),
    ("<think> Reasoning content </think> \\boxed{\\frac{63}{400}}", "\\frac{63}{400}", 1.0),
    ("Reasoning content </think> \\boxed{\\frac{63}{400}}", "\\frac{63}{400}", 1.0),
    ("<think> Reasoning content </think> \\boxed{\\frac{64}{400}}", "\\frac{63}{400}", 0.0),
    ("<think> My answer is \\boxed{42} </think> Some other text.", "\\boxed{42}", 0.0),
    ("<think> The answer is \\boxed{42} </think> Here's a wrong answer: \\boxed{43}.",
     "\\boxed{42}", 0.0),
    ("<think> Reasoning content </think> \\boxed{42}", "forty two", None),
    # TRL's reasoning_accuracy_reward gives 0 to an unclosed think block even with a right box;
    # we read the whole text when no </think> closes it (the tags format needs no think block),
    # and leave the missing close to the format reward.
    ("<think> Incomplete reasoning without closing tag \\boxed{\\frac{63}{400}}",
     "\\frac{63}{400}", 1.0),
    # Not boxed and no answer phrase: TRL and we both give 0 (we never take a bare number in RL).
    ("Correct answer \\frac{63}{400} but completely missing reasoning content",
     "\\frac{63}{400}", 0.0),
]


@pytest.mark.parametrize("text, gold, expected", PORTED_ACCURACY)
def test_ported_accuracy(text, gold, expected):
    assert acc(text, gold, "solution") == expected


PORTED_FORMAT = [
    ("<think>Some reasoning</think><answer>The answer</answer>", 1.0),
    ("<think>Only thinking</think>", 0.0),
    ("<answer>Only answer</answer>", 0.0),
    ("No tags at all", 0.0),
    ("<think>Missing closing</think><answer>Missing closing", 0.0),
    ("<think>Wrong order</answer><answer>Wrong order</think>", 0.0),
    ("<think>\nI will count each distinct object in the image:\n1. Purple scooter\n2. Red bicycle\n"
     "\nThere are 9 distinct objects in total.\n</think>\n<answer>9</answer>", 1.0),
]


@pytest.mark.parametrize("text, expected", PORTED_FORMAT)
def test_ported_format(text, expected):
    assert REWARDS["format"]([[{"content": text}]]) == [expected]


# TRL's think_format_reward checks `<think>…</think>` then anything; our `boxed` format also asks
# for a final \boxed{} after it, so its rows carry one. Two differences by design: empty reasoning
# (`<think></think>`) is not the format here, and a missing opening `<think>` is allowed (the
# chat template may have opened it).
PORTED_THINK = [
    ("<think>This is my reasoning.</think>This is my answer \\boxed{1}.", 1.0),
    ("<think>\nThis is\nmy reasoning.\n</think>\nThis is my answer \\boxed{1}.", 1.0),
    ("<think>\nThis is <some tag> my reasoning.</think>\nThis is my answer \\boxed{1}.", 1.0),
    ("<think></think>\nThis is my answer \\boxed{1}.", 0.0),  # differs: empty reasoning
    ("<think>\nThis is my reasoning.\nThis is my answer \\boxed{1}.", 0.0),
    ("This is my reasoning. This is my answer \\boxed{1}.", 0.0),
    ("This is my reasoning.</think>\nThis is my answer \\boxed{1}.", 1.0),  # differs: template
    ("<think>This is<think>my reasoning.</think></think>This is my answer \\boxed{1}.", 0.0),
    ("<think>This is</think>\nmy\n<think>reasoning.</think>\nThis is my answer \\boxed{1}.", 0.0),
]


@pytest.mark.parametrize("text, expected", PORTED_THINK)
def test_ported_think_format(text, expected):
    assert REWARDS["format"]([[{"content": text}]], answer_format=["boxed"]) == [expected]


@pytest.mark.parametrize("gold, answer, n_tokens, expected", [
    ("\\frac{1}{3}", "\\frac{1}{3}", 25, 0.92678), ("\\frac{1}{3}", "\\frac{1}{3}", 75, 0.57322),
    ("\\frac{1}{3}", "\\frac{1}{2}", 25, -0.92678), ("\\frac{1}{3}", "\\frac{1}{2}", 75, -0.57322),
    ("\\frac{1}{3}", "\\frac{1}{3}", 50, 0.75), ("\\frac{1}{3}", "\\frac{1}{2}", 50, -0.75),
    ("\\frac{1}{3}", "\\frac{1}{3}", 0, 1.0), ("\\frac{1}{3}", "\\frac{1}{3}", 100, 0.5),
    ("\\frac{1}{3}", "\\frac{1}{2}", 100, -0.5), ("\\frac{1}{3}", "\\frac{1}{3}", 200, 0.5),
])
def test_ported_cosine(gold, answer, n_tokens, expected):
    out = REWARDS["cosine"]([f"\\boxed{{{answer}}}"], max_len=100, completion_ids=[[1] * n_tokens],
                            solution=[gold])
    assert out == [pytest.approx(expected, abs=1e-4)]


def test_accuracy_in_a_worker_thread():
    """math-verify's timeout uses SIGALRM, main thread only: off the main thread it still works."""
    import threading
    out: list = []
    t = threading.Thread(target=lambda: out.extend(REWARDS["accuracy"](
        ["\\boxed{\\frac{1}{3}}"], solution=["\\frac{1}{3}"])))
    t.start()
    t.join()
    assert out == [1.0]


# Each real AIME/AMC gold written in the usual forms: right when it is the gold, wrong when it is
# off by one. The agreement with those labels must be total.
FORMS = ["\\boxed{{{a}}}", "<answer>{a}</answer>", "The answer is {a}.", "The answer is: ${a}$",
         "The final answer is:\n{a}", "Final Answer: The final answer is ${a}$. I hope it is correct.",
         "The answer is **{a}**.", "<think>so it is {a}</think>\n\nThe answer is $\\boxed{{{a}}}$.",
         "Therefore, the answer is \\({a}\\).", "**Answer:** {a}"]


def test_rewritten_real_golds_agree_with_their_labels():
    rows = []
    for name in ("math_eval/aime24/test.jsonl", "math_eval/amc23/test.jsonl"):
        path = SHARED_DATA / name
        if not path.exists():
            pytest.skip(f"{path} not present (the shared benchmark data sits beside the checkout)")
        rows += [json.loads(line) for line in path.read_text().splitlines()]
    golds = [str(r["answer"]) for r in rows]
    disagree = []
    for gold in golds:
        value = float(gold)
        for form in FORMS:
            for answer, label in ((gold, True), (f"{value + 1:g}", False)):
                if score(form.format(a=answer), gold, last_number=False) is not label:
                    disagree.append((form, gold, answer))
    print(f"\n{len(golds) * len(FORMS) * 2} labelled rewrites of {len(golds)} golds: "
          f"{len(disagree)} disagree")
    assert not disagree, disagree[:5]
