"""One resolved plan per stage: trainer settings built once (TRL's own errors in the preflight),
the settings that ran recorded in the manifest, the model dir and every checkpoint, and an exact
lineage: a re-run upstream stage makes its consumers run again."""

from __future__ import annotations

import json

import pytest

from posttrain.errors import UserError
from posttrain.manifest import Manifest
from posttrain.plan import PLAN_FILE
from posttrain.runner import prepare, run_stage

GRPO16 = """stage: grpo
init_from: sft
eval_suite: null
prompt_data:
  - {task: arithmetic, n: 16, digits: 1}
rewards: {accuracy: 1.0}
num_generations: 16
max_completion_length: 8
max_steps: 1
"""
# No learning_rate, no per_device_train_batch_size: the stage's defaults apply, and are recorded.
SFT_NO_LR = """stage: sft
init_from: {init}
eval_suite: null
train_data:
  - {{task: arithmetic, n: 16, digits: 1}}
max_steps: 2
per_device_train_batch_size: 4
save_steps: 1
"""


def test_grpo_16_generations_with_default_batch_settings(tiny_run, tmp_path):
    """The common peer setting passes: our batch default (32) is the one TRL checks."""
    recipe = tmp_path / "grpo16.yaml"
    recipe.write_text(GRPO16)
    _, ctx, _ = prepare("grpo", str(recipe), tiny_run, {})
    trainer = ctx.plan.trainer
    assert trainer["num_generations"] == 16 and trainer["per_device_train_batch_size"] == 32
    assert trainer["generation_batch_size"] == 32  # TRL's derived value, recorded as it will run
    assert ctx.plan.args.num_generations == 16     # the config object the trainer will get


def test_trl_cross_field_error_is_the_preflight_line(tiny_run, tmp_path):
    """An indivisible batch fails before anything is written, with TRL's own message."""
    from trl import GRPOConfig
    with pytest.raises(ValueError) as trl_error:
        GRPOConfig(output_dir=str(tmp_path / "x"), use_cpu=True, per_device_train_batch_size=12,
                   num_generations=16)
    recipe = tmp_path / "grpo16.yaml"
    recipe.write_text(GRPO16 + "per_device_train_batch_size: 12\n")
    with pytest.raises(UserError) as ours:
        prepare("grpo", str(recipe), tiny_run, {})
    assert str(trl_error.value).splitlines()[0] in str(ours.value)


@pytest.fixture(scope="module")
def plan_run(tiny_run, tmp_path_factory):
    """Run `plans`: an SFT from the tiny base (no learning_rate in its recipe), checkpointed at
    every step, then one GRPO step on it."""
    base = Manifest(tiny_run).resolve("base")
    recipe = tmp_path_factory.mktemp("plan") / "sft.yaml"
    recipe.write_text(SFT_NO_LR.format(init=base))
    run_stage("sft", str(recipe), "plans", {}, eval_after=False)
    return "plans", recipe


def test_defaults_that_ran_are_recorded_everywhere(plan_run):
    run, _ = plan_run
    m = Manifest(run)
    plan = m.stage("sft")["plan"]
    from posttrain.stages.sft import Recipe
    assert plan["trainer"]["learning_rate"] == Recipe.TRAINER_DEFAULTS["learning_rate"]
    assert plan["trainer"]["lr_scheduler_type"] == "cosine"  # a default, as TRL spells it
    assert "output_dir" not in plan["trainer"]                # paths aside
    saved = json.loads((m.resolve("sft") / PLAN_FILE).read_text())
    assert saved == plan


def test_every_checkpoint_holds_the_manifest_plan(plan_run):
    run, _ = plan_run
    m = Manifest(run)
    plan = m.stage("sft")["plan"]
    ckpts = sorted((m.stage_dir("sft") / "checkpoints").glob("checkpoint-*"))
    assert [c.name for c in ckpts] == ["checkpoint-1", "checkpoint-2"]
    for ckpt in ckpts:
        assert json.loads((ckpt / PLAN_FILE).read_text()) == plan


@pytest.mark.slow
def test_rerun_upstream_makes_the_consumer_run_again(plan_run, tmp_path):
    run, sft_recipe = plan_run
    grpo = tmp_path / "grpo.yaml"
    grpo.write_text(GRPO16.replace("num_generations: 16", "num_generations: 2")
                    + "per_device_train_batch_size: 4\nsave_steps: 100\n")
    first = run_stage("grpo", str(grpo), run, {}, eval_after=False)
    assert first["plan"]["refs"]["init"]["stage_ended"] == Manifest(run).stage("sft")["ended"]
    skipped = run_stage("grpo", str(grpo), run, {}, eval_after=False)
    assert skipped["attempts"] == first["attempts"]  # same plan: skipped

    import time
    time.sleep(1.1)  # end times are recorded to the second
    run_stage("sft", str(sft_recipe), run, {}, force=True, eval_after=False)
    again = run_stage("grpo", str(grpo), run, {}, eval_after=False)
    assert again["attempts"] == first["attempts"] + 1
    assert again["plan_sha256"] != first["plan_sha256"]
    assert again["plan"]["refs"]["init"]["stage_ended"] == Manifest(run).stage("sft")["ended"]
