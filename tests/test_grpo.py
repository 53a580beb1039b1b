"""GRPO stage: a real TRL GRPOTrainer run on the tiny SFT model, recipe validation, DAPO dynamic
sampling."""

from __future__ import annotations

import json

import pytest
import torch

from posttrain.errors import UserError
from posttrain.runner import prepare, run_stage
from posttrain.stages.dynamic_sampling import informative_groups

# One generation per step (the demo's GSPO preset generates every 4), so every step logs rewards.
FAST = {"max_steps": "3", "per_device_train_batch_size": "8", "num_generations": "4",
        "max_completion_length": "24", "save_steps": "1000", "eval_suite": "null",
        "logging_steps": "1", "steps_per_generation": "1"}


@pytest.mark.slow
def test_grpo_trains_logs_and_saves(manifest, tiny_run):
    entry = run_stage("grpo", "recipes/tiny/grpo.yaml", tiny_run,
                      {**FAST, "dynamic_sampling": "true", "beta": "0.05"}, eval_after=False)
    assert entry["status"] == "done"
    stage_dir = manifest.run_dir / "grpo"
    assert (stage_dir / "model" / "config.json").exists()
    assert (stage_dir / "model" / "posttrain_plan.json").exists()
    records = [json.loads(line) for line in (stage_dir / "logs.jsonl").read_text().splitlines()]
    steps = [r for r in records if "reward" in r]
    assert len(steps) == 3
    for key in ("rewards/accuracy/mean", "rewards/format/mean", "reward", "reward_std",
                "frac_reward_zero_std", "completions/mean_length", "kl",
                "clip_ratio/region_mean", "dynamic_sampling/kept_frac",
                "rewards/accuracy/unscorable_frac"):  # through TRL's log_metric hook
        assert key in steps[0], key
    assert steps[0]["rewards/accuracy/unscorable_frac"] == 0.0  # synthetic golds all score
    png = stage_dir / "reward_curve.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert entry["metrics"]["reward_last"] is not None
    # It learned from its rewards: groups with differing rewards gave a policy gradient, and the
    # saved weights moved away from the SFT init they started from.
    assert any(r["frac_reward_zero_std"] < 1.0 for r in steps)
    from posttrain.models import load_model
    before = load_model(manifest.resolve("sft")).state_dict()
    after = load_model(stage_dir / "model").state_dict()
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(moved) > len(before) // 2, f"only {len(moved)} of {len(before)} tensors changed"


@pytest.mark.parametrize("overrides, message", [
    ({"per_device_train_batch_size": "6", "num_generations": "4", "steps_per_generation": "1"},
     "divisible by num_generations"),
    ({"num_generations": "1"}, "at least 2 generations per prompt"),
    ({"rewards": "{accuracy: 1.0, speling: 0.1}"}, "unknown reward 'speling'"),
    ({"reward_weights": "[1.0]"}, "by name"),
    ({"beta": "-0.1"}, "beta must be >= 0"),
    ({"prompt_data": "[{task: nope, n: 3}]"}, "unknown task 'nope'"),
    ({"loss_type": "grpo", "epsilon_hgh": "0.3"}, "did you mean 'epsilon_high'"),
])
def test_bad_recipes_fail_before_anything_is_written(manifest, tiny_run, overrides, message):
    with pytest.raises(UserError, match=message):
        prepare("grpo", "recipes/tiny/grpo.yaml", tiny_run, overrides)
    assert manifest.stage("grpo") is None or manifest.stage("grpo")["status"] == "done"


def test_trl_config_errors_are_one_line(manifest, tiny_run):
    with pytest.raises(UserError, match="invalid trainer settings") as err:
        prepare("grpo", "recipes/tiny/grpo.yaml", tiny_run,
                {"generation_batch_size": "64", "steps_per_generation": "2"})
    assert "\n" not in str(err.value)


def test_informative_groups_keeps_only_mixed_outcomes():
    # 3 groups of 4: all right (advantage 0), mixed, all wrong (advantage 0).
    adv = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.87, -0.87, 0.87, -0.87, 0.0, 0.0, 0.0, 0.0])
    keep = informative_groups(adv, 4)
    assert keep.tolist() == [False] * 4 + [True] * 4 + [False] * 4
    # A mixed group may hold a sample exactly at the group mean: the group is still kept whole.
    keep = informative_groups(torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]), 3)
    assert keep.tolist() == [True, True, True, False, False, False]
    # Equal rewards of 0.1 leave float noise that std scaling blows up to ~1e-4: still dropped.
    noise = torch.full((4,), 7.4e-5)
    assert informative_groups(noise, 4).tolist() == [False] * 4
