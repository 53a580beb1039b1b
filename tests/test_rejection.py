"""Rejection sampling: the filter's checks table-style, then the stage and the SFT round on its data."""

from __future__ import annotations

import json

import pytest

from posttrain.errors import UserError
from posttrain.rollout.filter import FilterConfig, filter_samples, is_repetitive, rejection_reason
from posttrain.rollout.types import Completion
from posttrain.tasks import TASKS
from posttrain.tasks.arithmetic import addition_trace

ADD = {"answer": "564", "task": "arithmetic",
       "meta": json.dumps({"key": "059+505", "a": "059", "b": "505", "answer": "564"})}
CDN = {"answer": "8*3+5", "task": "countdown",
       "meta": json.dumps({"key": "x", "numbers": [3, 5, 8], "target": 29})}
BENCH = {"answer": "42", "task": None, "meta": None}
GOOD = f"<think>{addition_trace('059', '505')}</think><answer>564</answer>"


def c(text: str, tokens: int = 40, reason: str = "stop") -> Completion:
    return Completion(text, tokens, reason)


@pytest.mark.parametrize("sample, row, cfg, expected", [
    (c(GOOD), ADD, FilterConfig(), None),
    # Right answer through a wrong step (9+5+0=15): the step check catches it.
    (c("<think>9+5+0=15 c1|5+0+1=6 c0|0+5+0=5 c0</think><answer>564</answer>"), ADD,
     FilterConfig(), "wrong_steps"),
    (c("<think>9+5+0=15 c1|5+0+1=6 c0|0+5+0=5 c0</think><answer>564</answer>"), ADD,
     FilterConfig(check_steps=False), None),
    (c("<think>9+5+0=14 c1|5+0+1=6 c0|0+5+0=5 c0</think><answer>574</answer>"), ADD,
     FilterConfig(), "wrong_answer"),
    (c("9+5+0=14 c1 so <answer>564</answer>"), ADD, FilterConfig(), "format"),
    (c("<think>9+5+0=14 c1|5+0+1=6 c0</think><answer>564</answer><answer>564</answer>"), ADD,
     FilterConfig(), "format"),
    (c(GOOD, reason="length"), ADD, FilterConfig(), "truncated"),
    (c(GOOD, tokens=41), ADD, FilterConfig(max_tokens=40), "too_long"),
    (c("<think>8*3=24|24+5=29</think><answer>8*3+5</answer>"), CDN, FilterConfig(), None),
    (c("<think>8*3=24|24+5=30</think><answer>8*3+5</answer>"), CDN, FilterConfig(), "wrong_steps"),
    (c("<think>8*4=32|32-3=29</think><answer>8*3+5</answer>"), CDN, FilterConfig(), "wrong_steps"),
    (c("<think>8*3=24|24+5=29</think><answer>8*3+6</answer>"), CDN, FilterConfig(), "wrong_answer"),
    (c("<think>6 times 7</think><answer>42</answer>"), BENCH, FilterConfig(), None),
    # R1-style output (no answer tags): malformed for the tiny world, fine when tags are not asked.
    (c("6 times 7 is 42.</think>The answer is $\\boxed{42}$."), BENCH, FilterConfig(), "format"),
    (c("6 times 7 is 42.</think>The answer is $\\boxed{42}$."), BENCH,
     FilterConfig(answer_format="boxed"), None),
    (c("6 times 7 is 42. The answer is $\\boxed{42}$."), BENCH, FilterConfig(answer_format="boxed"),
     "format"),
    (c("<think>" + "let me check that again. " * 20 + "</think><answer>42</answer>"), BENCH,
     FilterConfig(), "repetitive"),
])
def test_rejection_reason(sample, row, cfg, expected):
    assert rejection_reason(sample, row, cfg) == expected


def test_repetition_check_spares_real_traces():
    for ex in TASKS["arithmetic"].generate("train", 200, digits=[1, 8]):
        assert not is_repetitive(f"<think>{ex.trace}</think><answer>{ex.answer}</answer>")
    assert is_repetitive("0+0+0=0 c0|" * 40)


def test_filter_dedups_caps_and_counts():
    row = {"messages": [{"role": "user", "content": "What is 059+505?"}], **ADD}
    samples = [c(GOOD), c(" " + GOOD), c(GOOD.replace("564", "565")), c(GOOD, reason="length"),
               c(GOOD.replace("<think>", "<think> ")), c(GOOD.replace("<think>", "<think>  x"))]
    kept, stats = filter_samples([row], [samples], FilterConfig(max_per_prompt=1))
    figures = stats.as_dict()
    assert len(kept) == 1 and kept[0]["messages"][-1] == {"role": "assistant", "content": GOOD}
    assert figures["drop_reasons"]["duplicate"] == 1  # whitespace-only difference
    assert figures["drop_reasons"]["wrong_answer"] == 1 and figures["drop_reasons"]["truncated"] == 1
    assert figures["n_kept"] + sum(figures["drop_reasons"].values()) == figures["n_samples"] == 6
    assert figures["kept_per_prompt"] == {"1": 1}


PROMPTS = "[{task: arithmetic, n: 24, digits: 1}]"


def test_rejection_stage_writes_a_dataset_sft_trains_on(teacher_run):
    import datasets

    from posttrain.manifest import Manifest
    from posttrain.runner import run_stage
    from posttrain.scoring import score, think_text

    # The fixture's teacher is weak (right answers, mostly through wrong steps): keep every right
    # answer here so the SFT round below has data, and check the step filter on the same samples.
    # What it keeps is a draw, so what is checked holds for any draw: the kept rows are exactly
    # the distinct verified samples, and the step filter keeps exactly those whose every step is
    # right. Kept at all, and some through a wrong step, are margins, not certainties: over
    # teachers of three init seeds 17-28 of the 192 samples were kept, 1-2 of them step by step.
    overrides = {"init_from": "teacher", "prompt_data": PROMPTS, "samples_per_prompt": "8",
                 "max_new_tokens": "32", "check_steps": "false", "max_per_prompt": "null"}
    entry = run_stage("rejection", "recipes/tiny/rejection.yaml", teacher_run, overrides)
    assert entry["status"] == "done" and entry["output_dir"].endswith("rejection/data")
    stats = entry["metrics"]
    assert stats["n_samples"] == 192 and stats["n_kept"] > 0
    assert stats["n_kept"] + sum(stats["drop_reasons"].values()) == stats["n_samples"]
    assert entry["eval"] == {}  # a data stage is not evaluated
    rows = [json.loads(line) for line in open(f"{entry['output_dir']}/train.jsonl")]
    assert len(rows) == stats["n_kept"] == len(datasets.load_from_disk(f"{entry['output_dir']}/hf"))
    assert all(score(r["messages"][-1]["content"], r["answer"], r["task"], r["meta"]) for r in rows)

    from posttrain.recipe import load_recipe
    from posttrain.stages.rejection import Recipe
    from posttrain.stages.sampling import sample_verified
    strict = load_recipe(Recipe, "recipes/tiny/rejection.yaml", {**overrides, "check_steps": "true"})
    kept, strict_stats = sample_verified(str(Manifest(teacher_run).resolve("teacher")), strict)
    # With the step check on, the kept rows are the loose ones whose every step is right.
    assert kept == [r for r in rows if TASKS["arithmetic"].check_trace(
        think_text(r["messages"][-1]["content"]), json.loads(r["meta"]))]
    assert strict_stats.drops["wrong_steps"] > 0 and len(kept) < stats["n_kept"]

    sft = run_stage("sft", "recipes/tiny/sft_rs.yaml", teacher_run,
                    {"init_from": "teacher", "max_steps": "2", "eval_suite": "null"},
                    eval_after=False)
    assert sft["status"] == "done"
    spec = sft["plan"]["recipe"]["train_data"][0]
    assert spec["from_stage"] == "rejection" and spec["path"].endswith("rejection/data/train.jsonl")
    assert sft["metrics"]["train_samples"] == stats["n_kept"]

    with pytest.raises(UserError, match="wrote no dataset"):
        run_stage("sft", "recipes/tiny/sft_rs.yaml", teacher_run,
                  {"name": "sft_bad", "train_data": "[{stage: teacher}]"})
    with pytest.raises(UserError, match="has not run"):
        run_stage("sft", "recipes/tiny/sft_rs.yaml", teacher_run,
                  {"name": "sft_bad", "train_data": "[{stage: nope}]"})
    assert Manifest(teacher_run).stage("sft_bad") is None
