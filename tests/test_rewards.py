"""Table tests for posttrain.rewards: each reward on real edge cases; every bug becomes a row."""

from __future__ import annotations

import json
import pickle

import pytest

from posttrain.errors import UserError
from posttrain.rewards import REWARDS, build_reward_funcs

ADD_META = json.dumps({"key": "056+504", "a": "056", "b": "504", "answer": "560"})
GOOD = "<think>6+4+0=10 c1|5+0+1=6 c0|0+5+0=5 c0</think><answer>560</answer>"


def msg(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


ACCURACY = [
    # (completion, columns, expected)
    (GOOD, {"task": "arithmetic", "meta": ADD_META}, 1.0),
    ("<think>x</think><answer>561</answer>", {"task": "arithmetic", "meta": ADD_META}, 0.0),
    ("<answer>5,60</answer>", {"task": "arithmetic", "meta": ADD_META}, 1.0),  # checker strips ,
    (msg(GOOD), {"task": "arithmetic", "meta": ADD_META}, 1.0),  # chat-message completion
    ("no answer at all", {"task": "arithmetic", "meta": ADD_META}, 0.0),
    ("The answer is \\boxed{\\frac{1}{2}}", {"answer": "0.5"}, 1.0),
    ("<answer>0.5</answer>", {"solution": "We get $\\boxed{\\frac12}$."}, 1.0),
    ("<answer>1,000</answer>", {"answer": "1000"}, 1.0),
    # No marked answer: the bare last number is off for RL rewards (it pays for a number that
    # merely appears last); `reward_kwargs: {accuracy: {last_number: true}}` turns it on.
    ("so 18 eggs, 9 sold... she makes 18 dollars", {"solution": "16-3-4=9\n9*2=18\n#### 18"}, 0.0),
    ("<answer>17</answer>", {"solution": "9*2=18\n#### 18"}, 0.0),
    ("<answer>42</answer>", {}, None),  # no gold column: skip, never a silent 0
    ("<answer>42</answer>", {"answer": "\\boxed{}"}, None),  # unparseable gold: skip
    ("<answer>42</answer>", {"solution": "no final line\n#### "}, None),
    ("<answer>42</answer>", {"task": "arithmetic", "meta": "{not json"}, None),  # bad meta row
    ("", {"answer": "3"}, 0.0),
]


@pytest.mark.parametrize("completion, columns, expected", ACCURACY)
def test_accuracy(completion, columns, expected):
    cols = {k: [v] for k, v in columns.items()}
    assert REWARDS["accuracy"]([completion], **cols) == [expected]


SUM_META = json.dumps({"a": "80", "b": "54", "style": "words", "answer": "134"})
STEP_ACCURACY = [
    # Both answer 134; one works the wrong ones column, the other every column right.
    ("<think>5 + 4 = 9, carry 0. 8 + 5 = 13, carry 1. So 80 + 54 = 134.</think> $\\boxed{134}$",
     {"task": "arithmetic", "meta": SUM_META}, 0.5),
    ("<think>0 + 4 = 4, carry 0. 8 + 5 = 13, carry 1. So 80 + 54 = 135.</think> $\\boxed{135}$",
     {"task": "arithmetic", "meta": SUM_META}, 1.0),  # steps right, answer wrong: accuracy's job
    ("$\\boxed{134}$", {"task": "arithmetic", "meta": SUM_META}, 0.0),  # no reasoning
    ("<think>2 + 2 = 4</think> 4", {"answer": "4"}, None),  # no task to check steps by
    ("<think>x</think>", {"task": "arithmetic", "meta": "{not json"}, None),  # bad meta row
]


@pytest.mark.parametrize("completion, columns, expected", STEP_ACCURACY)
def test_step_accuracy(completion, columns, expected):
    cols = {k: [v] for k, v in columns.items()}
    assert REWARDS["step_accuracy"]([completion], **cols) == [expected]


def test_accuracy_last_number_fallback_is_opt_in():
    text, gold = "so 18 eggs, 9 sold... she makes 18 dollars", ["16-3-4=9\n9*2=18\n#### 18"]
    (fn,), _ = build_reward_funcs({"accuracy": 1.0}, {"accuracy": {"last_number": True}})
    assert fn([text], solution=gold) == [1.0]
    assert REWARDS["accuracy"]([text], solution=gold) == [0.0]


FORMAT = [
    (GOOD, 1.0, 1.0),
    ("6+4+0=10 c1</think><answer>560</answer>", 1.0, 1.0),  # <think> was in the prompt
    ("<think>line one\nline two\n</think>\n<answer>\n560\n</answer>\n", 1.0, 1.0),  # DOTALL
    ("<answer>560</answer>", 0.0, 0.5),
    ("<think>a</think>", 0.0, 0.5),
    ("<think>a</think><answer>1</answer> trailing text", 0.0, 1.0),
    ("<think>a</think><answer>1</answer><answer>2</answer>", 0.0, 0.5),
    ("<think>a<think>b</think><answer>1</answer>", 0.0, 0.75),
    ("", 0.0, 0.0),
]


@pytest.mark.parametrize("completion, fmt, tags", FORMAT)
def test_format_and_tag_count(completion, fmt, tags):
    assert REWARDS["format"]([completion]) == [fmt]
    assert REWARDS["format"]([msg(completion)]) == [fmt]
    assert REWARDS["tag_count"]([completion]) == [tags]


# `answer_format: boxed` (R1): the stage adds an `answer_format` column the rewards read.
BOXED_FORMAT = [
    ("<think>3+2=5</think>\n\nThe answer is $\\boxed{5}$.", 1.0, 1.0),
    ("3+2=5</think>\n\nThe answer is $\\boxed{5}$.", 1.0, 1.0),  # template opened <think>
    ("<think>3+2=5</think>\n\nThe answer is 5.", 0.0, 0.5),  # no box
    ("<think>3+2=5 \\boxed{5}</think> so 5.", 0.0, 0.5),  # a box only inside the reasoning
    ("<think>a</think>\\boxed{4} or \\boxed{5}", 1.0, 0.75),  # two boxes: no full tag credit
    ("<think>a</think><answer>5</answer>", 0.0, 0.5),  # the tags format does not count here
    ("The answer is $\\boxed{5}$.", 0.0, 0.0),
]


@pytest.mark.parametrize("completion, fmt, tags", BOXED_FORMAT)
def test_format_and_tag_count_boxed(completion, fmt, tags):
    cols = {"answer_format": ["boxed"]}
    assert REWARDS["format"]([completion], **cols) == [fmt]
    assert REWARDS["tag_count"]([msg(completion)], **cols) == [tags]


def test_build_reward_funcs_names_weights_and_pickles():
    funcs, weights = build_reward_funcs({"accuracy": 1, "format": 0.1, "reasoning_steps": 0.2},
                                        {"reasoning_steps": {"separator": "|"}})
    # The name TRL logs them under (rewards/<name>/mean) must be the recipe's.
    from trl.trainer.utils import get_callable_name
    assert [get_callable_name(f) for f in funcs] == ["accuracy", "format", "reasoning_steps"]
    assert weights == [1.0, 0.1, 0.2]
    assert funcs[2]([GOOD]) == [1.0]
    assert pickle.loads(pickle.dumps(funcs[2]))([GOOD]) == [1.0]


def test_rewards_log_their_unscorable_share():
    """GRPO logs rewards/<name>/unscorable_frac per step through TRL's log_metric hook."""
    (acc,), _ = build_reward_funcs({"accuracy": 1.0})
    logged = {}
    out = acc(["<answer>42</answer>"] * 4, answer=["42", "forty two", "\\boxed{}", "41"],
              log_metric=lambda name, value: logged.__setitem__(name, value))
    assert out == [1.0, None, None, 0.0]
    assert logged == {"rewards/accuracy/unscorable_frac": 0.5}


@pytest.mark.parametrize("weights, kwargs, message", [
    ({"acuracy": 1.0}, None, "unknown reward 'acuracy'; known rewards: accuracy, format"),
    ({}, None, "Known rewards: accuracy"),
    ({"format": "high"}, None, "weight of 'format' must be a number"),
    ({"format": True}, None, "weight of 'format' must be a number"),
    ({"format": 1.0}, {"format": {"x": 1}}, "reward 'format' has no parameter 'x'"),
    ({"format": 1.0}, {"accuracy": {}}, "not in rewards"),
    ({"format": 1.0}, {"nope": {}}, "unknown reward 'nope'"),
    ({"reasoning_steps": 1.0}, {"reasoning_steps": {"min_steps": 0}}, "min_steps must be"),
])
def test_build_reward_funcs_user_errors(weights, kwargs, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        build_reward_funcs(weights, kwargs)


def ids(n: int) -> list[int]:
    return [7] * n


RIGHT, WRONG = "<answer>4</answer>", "<answer>5</answer>"


@pytest.mark.parametrize("texts, lens, prompts, expected", [
    # Kimi-1.5: λ = 0.5 - (len - min)/(max - min) within the group; wrong gets min(0, λ).
    ([RIGHT, RIGHT, WRONG], [10, 20, 30], ["p"] * 3, [0.5, 0.0, -0.5]),
    ([WRONG, RIGHT, RIGHT], [10, 20, 30], ["p"] * 3, [0.0, 0.0, -0.5]),  # short wrong: no pay
    ([RIGHT, WRONG], [5, 5], ["p"] * 2, [0.0, 0.0]),  # equal lengths: no signal
    # Two groups are normalised apart: the 100-long one is the shortest of its group.
    ([RIGHT, RIGHT, RIGHT, RIGHT], [10, 30, 100, 300], ["p", "p", "q", "q"],
     [0.5, -0.5, 0.5, -0.5]),
    ([RIGHT, RIGHT, RIGHT, RIGHT], [10, 30, 100, 300], None, [0.5, 0.5 - 20 / 290,
                                                             0.5 - 90 / 290, -0.5]),
    # Chat-message prompts group by their content too.
    ([RIGHT, RIGHT], [1, 3], [[{"role": "user", "content": "a"}]] * 2, [0.5, -0.5]),
])
def test_length_kimi(texts, lens, prompts, expected):
    got = REWARDS["length"](texts, prompts=prompts, completion_ids=[ids(n) for n in lens],
                            answer=["4"] * len(texts))
    assert got == pytest.approx(expected)


def test_length_skips_unparseable_gold_and_counts_chars_without_ids():
    assert REWARDS["length"]([RIGHT, RIGHT], answer=["\\boxed{}", "4"]) == [None, 0.0]
    assert REWARDS["length"]([RIGHT, RIGHT + "  "], answer=["4", "4"]) == [0.5, -0.5]


@pytest.mark.parametrize("text, n, expected", [
    (RIGHT, 0, 1.0), (RIGHT, 50, 0.75), (RIGHT, 100, 0.5), (RIGHT, 500, 0.5),
    (WRONG, 0, -1.0), (WRONG, 50, -0.75), (WRONG, 100, -0.5), (WRONG, 500, -0.5),
])
def test_cosine(text, n, expected):
    got = REWARDS["cosine"]([text], completion_ids=[ids(n)], answer=["4"], max_len=100)
    assert got == pytest.approx([expected])


def test_cosine_skips_unparseable_gold():
    assert REWARDS["cosine"]([RIGHT], answer=["\\boxed{}"]) == [None]


@pytest.mark.parametrize("n, expected", [(0, 0.0), (80, 0.0), (90, -0.5), (99, -0.95),
                                         (100, -1.0), (150, -1.0)])
def test_soft_overlong(n, expected):
    got = REWARDS["soft_overlong"](["x"], completion_ids=[ids(n)], max_len=100, cache=20)
    assert got == pytest.approx([expected])


@pytest.mark.parametrize("text, kwargs, expected", [
    ("a b c a b c a b c", {}, -(1 - 3 / 7)),
    ("The cat sat on the mat", {}, 0.0),
    ("THE the The the", {"ngram_size": 1}, -0.75),  # lower-cased words
    ("a b", {}, 0.0),  # shorter than one n-gram
    ("", {}, 0.0),
    ("a b c a b c a b c", {"max_penalty": -0.5}, -0.5 * (1 - 3 / 7)),
    ("aaaa", {"unit": "char", "ngram_size": 2}, -2 / 3),
    ("6+4+0=10 c1|6+4+0=10 c1", {"unit": "char", "ngram_size": 11}, -1 / 13),
])
def test_repetition(text, kwargs, expected):
    assert REWARDS["repetition"]([text], **kwargs) == pytest.approx([expected])


def test_repetition_on_token_ids():
    got = REWARDS["repetition"](["w x y z", "w x"], completion_ids=[[1, 1, 1, 1], [1, 2]],
                                unit="token", ngram_size=2)
    assert got == pytest.approx([-2 / 3, 0.0])


@pytest.mark.parametrize("text, language, expected", [
    ("<think>we add the digits</think><answer>5</answer>", "en", 1.0),
    ("<think>我们计算 the sum</think><answer>1</answer>", "en", 2 / 6),  # CJK: one word per char
    ("<think>我们计算 the sum</think><answer>1</answer>", "zh", 4 / 6),
    ("<think>the sum</think><answer>答案是五</answer>", "en", 1.0),  # only the reasoning counts
    ("we add</think><answer>1</answer>", "en", 1.0),  # <think> opened by the template
    ("first add, puis on ajoute café", "en", 5 / 6),  # no think: the whole text; é is not ASCII
    ("first add, puis on ajoute café", "latin", 1.0),
    ("6+4+0=10 c1|5+0+1=6 c0", "en", 1.0),
    ("<think>$\\frac{a}{b}$ 我们 \\sqrt 2</think>", "zh", 1.0),  # math is language-neutral
    ("<think>1+1=2</think><answer>2</answer>", "ru", 1.0),  # no words: nothing to mix
    ("", "en", 1.0),
    ("считаем the sum", "ru", 1 / 3),
])
def test_language_consistency(text, language, expected):
    got = REWARDS["language_consistency"]([text], language=language)
    assert got == pytest.approx([expected])


@pytest.mark.parametrize("text, kwargs, expected", [
    ("Step 1: add\nStep 2: carry\nStep 3: done", {}, 1.0),
    ("First, add. Next, carry. Finally, write.", {}, 1.0),
    ("1. add\n2. carry", {}, 2 / 3),
    ("- add\n* carry\n• write\n- check", {}, 1.0),  # capped at 1
    ("just the answer 5", {}, 0.0),
    ("<think>Step 1: a</think><answer>Step 2: b Step 3: c</answer>", {}, 1 / 3),  # only the CoT
    (GOOD, {"separator": "|"}, 1.0),
    ("<think>a||b</think><answer>1</answer>", {"separator": "|"}, 2 / 3),  # empty segment
    ("<think>a\nb</think><answer>1</answer>", {"separator": "\n", "min_steps": 2}, 1.0),
])
def test_reasoning_steps(text, kwargs, expected):
    assert REWARDS["reasoning_steps"]([text], **kwargs) == pytest.approx([expected])


@pytest.mark.parametrize("name, params, message", [
    ("cosine", {"max_len": 0}, "max_len must be a positive integer"),
    ("cosine", {"min_value_wrong": "low"}, "min_value_wrong must be a number"),
    ("soft_overlong", {"max_len": 10, "cache": 20}, "cache must be at most max_len"),
    ("soft_overlong", {"max_len": 128.5}, "max_len must be a positive integer"),
    ("repetition", {"max_penalty": 1.0}, "max_penalty must be a number <= 0"),
    ("repetition", {"unit": "sentence"}, "unit must be one of word, char, token"),
    ("repetition", {"ngram_size": True}, "ngram_size must be a positive integer"),
    ("language_consistency", {"language": "klingon"}, "language must be one of en, latin"),
    ("reasoning_steps", {"separator": ""}, "separator must be a non-empty string"),
])
def test_bad_parameters_are_user_errors(name, params, message):
    with pytest.raises(UserError, match=message):
        build_reward_funcs({name: 1.0}, {name: params})


@pytest.mark.parametrize("name", list(REWARDS))
def test_every_reward_takes_trl_call_and_empty_batch(name):
    """TRL calls with prompts/completion_ids/trainer_state/... plus every dataset column."""
    fn = REWARDS[name]
    assert fn([]) == []
    got = fn(completions=[msg(GOOD), msg("")], prompts=[[{"role": "user", "content": "q"}]] * 2,
             completion_ids=[[1, 2, 3], []], trainer_state=None, log_extra=None,
             log_metric=None, answer=["560", "560"], task=["arithmetic"] * 2,
             meta=[ADD_META] * 2, trace=["t", "t"], prompt_text=["q", "q"])
    assert len(got) == 2
    assert all(r is None or isinstance(r, float) for r in got)
    # TRL logs rewards/<__name__>/mean, and may pickle reward functions.
    assert fn.__name__ == name
    assert pickle.loads(pickle.dumps(fn)) is fn
