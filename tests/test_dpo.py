"""DPO: pair rules (table), a real TRL DPOTrainer run from the tiny SFT model, one-line errors."""

from __future__ import annotations

import json
import re

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
    # sums right often enough that 10-12 of 32 prompts have both a right and a wrong sample
    # (20-24 pairs over seeds 1, 2 and the recipe's). No warmup: all 3 steps train.
    return {"init_from": "sft", "samples_per_prompt": "8", "max_new_tokens": "40",
            "temperature": "0.3", "prompt_data": "[{task: arithmetic, n: 32, digits: 1}]",
            "max_steps": "3", "warmup_steps": "0",
            "per_device_train_batch_size": "4", "logging_steps": "1", "save_steps": "1000",
            "learning_rate": "0.001", "eval_suite": "null", **extra}


def _completion_logp(model, tok, prompt: list[dict], completion: list[dict]) -> float:
    """log p(completion | prompt) under `model`, as the chat template renders the pair."""
    import torch
    head = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                   return_dict=False)
    ids = tok.apply_chat_template(prompt + completion, tokenize=True, return_dict=False)
    assert ids[:len(head)] == head
    with torch.no_grad():
        logps = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)
    return float(logps[range(len(head) - 1, len(ids) - 1), ids[len(head):]].sum())


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
    from posttrain.scoring import score
    for p in pairs:  # chosen: right and well formed; rejected: wrong, or malformed
        assert p["prompt"][-1]["role"] == "user"
        a, b = re.fullmatch(r"What is (\d+)\+(\d+)\?", p["prompt"][-1]["content"]).groups()
        chosen, rejected = p["chosen"][0]["content"], p["rejected"][0]["content"]
        assert score(chosen, str(int(a) + int(b))) and is_well_formed(chosen)
        assert not (score(rejected, str(int(a) + int(b))) and p["rejected_well_formed"])
    # TRL's margins and preference accuracy reached logs.jsonl; the plot was drawn.
    logs = read_log(stage_dir / "logs.jsonl")
    assert any("rewards/margins" in r and "rewards/accuracies" in r for r in logs)
    margins = [r["rewards/margins"] for r in logs if "rewards/margins" in r]
    assert abs(margins[0]) < 0.05  # policy = reference at the first step
    assert (stage_dir / "dpo_margins.png").stat().st_size > 1000
    # A loadable HF model with its recipe, that later stages resolve through the manifest.
    model_dir = manifest.resolve("dpo")
    assert (model_dir / "model.safetensors").exists() and (model_dir / "posttrain_plan.json").exists()
    from posttrain.models import load_model, load_tokenizer
    policy, init = load_model(model_dir).eval(), load_model(manifest.resolve("sft")).eval()
    assert policy.config.model_type == "deepseek_v3"
    # It learned the preference: over all its pairs (TRL logs each step's batch of 4, whose
    # margin swings with which pairs it drew: -0.07 at the last step for one seed), the trained
    # model raised chosen's log-likelihood ratio to the init model above rejected's. Measured
    # over seeds 1, 2 and the recipe's: 6.2-10.1 nats a pair on average, 18-21 of 20-24 pairs.
    tok = load_tokenizer(model_dir)
    gaps = [(_completion_logp(policy, tok, p["prompt"], p["chosen"])
             - _completion_logp(init, tok, p["prompt"], p["chosen"]))
            - (_completion_logp(policy, tok, p["prompt"], p["rejected"])
               - _completion_logp(init, tok, p["prompt"], p["rejected"])) for p in pairs]
    assert sum(gaps) / len(gaps) > 1.0 and sum(g > 0 for g in gaps) > len(gaps) / 2, gaps


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
