"""DPO: pair rules (table), a real TRL DPOTrainer run from the tiny SFT model, one-line errors."""

from __future__ import annotations

import json

import pytest

from posttrain.errors import UserError
from posttrain.preference import Scored, build_pairs, pairs_for_prompt

OK = dict(correct=True, well_formed=True)
WRONG = dict(correct=False, well_formed=True)
BROKEN = dict(correct=True, well_formed=False)  # right number, broken tags: still rejected


def s(text: str, tokens: int, **verdict) -> Scored:
    return Scored(text, tokens, **verdict)


@pytest.mark.parametrize("samples, max_pairs, expected", [
    # chosen = shortest good; rejected = malformed first, then longest wrong
    ([s("a", 9, **OK), s("b", 5, **OK), s("w", 7, **WRONG)], 1, [("b", "w")]),
    ([s("a", 5, **OK), s("w", 9, **WRONG), s("m", 3, **BROKEN)], 1, [("a", "m")]),
    ([s("a", 5, **OK), s("w", 3, **WRONG), s("v", 8, **WRONG)], 2, [("a", "v"), ("a", "w")]),
    # more rejected than chosen: chosen reused round-robin, each rejected once
    ([s("a", 5, **OK), s("b", 6, **OK), s("w", 1, **WRONG), s("v", 2, **WRONG),
      s("u", 3, **WRONG)], 3, [("a", "u"), ("b", "v"), ("a", "w")]),
    # duplicates of a text count once
    ([s("a", 5, **OK), s("w", 3, **WRONG), s("w", 3, **WRONG)], 2, [("a", "w")]),
    # all samples agree: no pair
    ([s("a", 5, **OK), s("b", 4, **OK)], 1, []),
    ([s("w", 5, **WRONG), s("m", 4, **BROKEN)], 1, []),
    ([], 1, []),
])
def test_pair_rules(samples, max_pairs, expected):
    got = [(c.text, r.text) for c, r in pairs_for_prompt(samples, max_pairs)]
    assert got == expected


def test_build_pairs_rows_and_stats():
    prompts = [[{"role": "user", "content": f"q{i}"}] for i in range(3)]
    samples = [[s("a", 4, **OK), s("w", 9, **WRONG)],
               [s("b", 4, **OK), s("c", 5, **OK)],
               [s("x", 4, **WRONG), s("y", 5, **BROKEN)]]
    rows, stats = build_pairs(prompts, samples)
    assert rows == [{"prompt": prompts[0], "chosen": [{"role": "assistant", "content": "a"}],
                     "rejected": [{"role": "assistant", "content": "w"}], "chosen_tokens": 4,
                     "rejected_tokens": 9, "rejected_well_formed": True}]
    assert stats["pairs"] == 1 and stats["prompts_no_pair"] == 2
    assert stats["prompts_all_good"] == 1 and stats["prompts_all_bad"] == 1
    assert stats["sample_pass_rate"] == pytest.approx(4 / 6)


def _overrides(**extra: str) -> dict[str, str]:
    # Low temperature: the fixture's 40-step SFT model is weak, and at T=0.3 it gets 1-digit
    # sums right often enough that ~10 of 32 prompts have both a right and a wrong sample.
    return {"init_from": "sft", "samples_per_prompt": "8", "max_new_tokens": "40",
            "temperature": "0.3", "prompt_data": "[{task: arithmetic, n: 32, digits: 1}]",
            "max_steps": "3",
            "per_device_train_batch_size": "4", "logging_steps": "1", "save_steps": "1000",
            "learning_rate": "0.001", "eval_suite": "null", **extra}


def test_dpo_stage_from_scored_samples(tiny_run, engines_at_train_start):
    from posttrain.manifest import Manifest
    from posttrain.plots import read_log
    from posttrain.runner import run_stage

    entry = run_stage("dpo", "recipes/tiny/dpo.yaml", tiny_run, _overrides(), eval_after=False)
    # The pairs were sampled with the HF backend, whose model stays cached for reuse: it was
    # let go of before DPO trained.
    assert engines_at_train_start == [[]]
    manifest = Manifest(tiny_run)
    assert entry["status"] == "done" and entry["kind"] == "dpo"
    stage_dir = manifest.stage_dir("dpo")
    # Pairs: written with their stats; chosen right and well formed, rejected not.
    pairs = [json.loads(line) for line in (stage_dir / "pairs.jsonl").read_text().splitlines()]
    stats = json.loads((stage_dir / "pairs_stats.json").read_text())
    assert pairs and stats["pairs"] == len(pairs) == entry["metrics"]["pairs"]
    assert stats["prompts"] == 32 and stats["prompts_with_pair"] + stats["prompts_no_pair"] == 32
    from posttrain.answer_format import is_well_formed
    assert all(is_well_formed(p["chosen"][0]["content"]) for p in pairs)
    assert all(p["prompt"][-1]["role"] == "user" for p in pairs)
    # TRL's margins and preference accuracy reached logs.jsonl; the plot was drawn.
    logs = read_log(stage_dir / "logs.jsonl")
    assert any("rewards/margins" in r and "rewards/accuracies" in r for r in logs)
    # It learned the preference: the chosen-minus-rejected reward margin grew from ~0 (policy
    # = reference at the first step) and ends positive.
    margins = [r["rewards/margins"] for r in logs if "rewards/margins" in r]
    assert abs(margins[0]) < 0.05 and margins[-1] > margins[0] + 0.05 and margins[-1] > 0
    assert (stage_dir / "dpo_margins.png").stat().st_size > 1000
    # A loadable HF model with its recipe, that later stages resolve through the manifest.
    model_dir = manifest.resolve("dpo")
    assert (model_dir / "model.safetensors").exists() and (model_dir / "posttrain_plan.json").exists()
    from posttrain.models import load_model
    assert load_model(model_dir).config.model_type == "deepseek_v3"


def test_dpo_data_missing_columns_is_one_line(tiny_run, manifest, tmp_path):
    from posttrain.runner import prepare
    data = tmp_path / "prefs.jsonl"
    data.write_text(json.dumps({"prompt": "1+1?", "chosen": "2"}) + "\n")
    overrides = {"init_from": "sft", "name": "dpo_file", "prompt_data": "[]",
                 "train_data": f"[{{path: {data}}}]"}
    with pytest.raises(UserError, match=r"missing column\(s\) rejected") as e:
        prepare("dpo", "recipes/tiny/dpo.yaml", tiny_run, overrides)
    assert "\n" not in str(e.value)
    assert manifest.stage("dpo_file") is None and not manifest.stage_dir("dpo_file").exists()


@pytest.mark.parametrize("overrides, message", [
    ({"loss_type": "[sigmoidd]"}, "unknown DPO loss 'sigmoidd'"),
    ({"samples_per_prompt": "1"}, "samples_per_prompt must be >= 2"),
    ({"train_data": "[{task: arithmetic, n: 4}]"}, "exactly one of prompt_data"),
    ({"beta": "0"}, "beta must be > 0"),
])
def test_dpo_recipe_errors(overrides, message):
    from posttrain.recipe import load_recipe
    from posttrain.stages.dpo import Recipe
    with pytest.raises(UserError, match=message):
        load_recipe(Recipe, "recipes/tiny/dpo.yaml", overrides)


def test_preference_dataset_normalised():
    import datasets

    from posttrain.preference import to_preference
    ds = datasets.Dataset.from_list([
        {"prompt": "2+2?", "chosen": "<answer>4</answer>", "rejected": "5"},
    ])
    row = to_preference(ds, "sys")[0]
    assert row["prompt"] == [{"role": "system", "content": "sys"},
                             {"role": "user", "content": "2+2?"}]
    assert row["chosen"] == [{"role": "assistant", "content": "<answer>4</answer>"}]
    conv = datasets.Dataset.from_list([  # UltraFeedback style: chosen repeats the user turn
        {"prompt": "hi", "chosen": [{"role": "user", "content": "hi"},
                                    {"role": "assistant", "content": "hello"}],
         "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "no"}]},
    ])
    assert to_preference(conv, None)[0]["rejected"] == [{"role": "assistant", "content": "no"}]
