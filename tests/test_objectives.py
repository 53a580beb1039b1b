"""RL objective presets: each resolves to its paper's settings, the losses TRL computes for them
obey their equations, DAPO's refill fills the batch with informative groups, and every preset
trains through the stage on the tiny world."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from posttrain.errors import UserError
from posttrain.recipe import load_recipe
from posttrain.stages.dynamic_sampling import DynamicSamplingGRPOTrainer, informative_groups
from posttrain.stages.grpo import Recipe as GRPORecipe
from posttrain.stages.objectives import OBJECTIVES

ROOT = Path(__file__).resolve().parents[1]
PRESET_RECIPES = {p: ROOT / "recipes" / "tiny" / "objectives" / f"{p}.yaml" for p in OBJECTIVES}

# What each paper documents, as TRL fields (the presets must resolve to exactly these).
PAPERS = {
    "grpo": dict(loss_type="grpo", scale_rewards="group", epsilon=0.2, beta=0.04,
                 importance_sampling_level="token"),
    "dr_grpo": dict(loss_type="dr_grpo", scale_rewards="none", beta=0.0),
    "dapo": dict(loss_type="dapo", epsilon=0.2, epsilon_high=0.28, beta=0.0),
    "gspo": dict(importance_sampling_level="sequence", epsilon=3e-4, epsilon_high=4e-4, beta=0.0),
    "cispo": dict(loss_type="cispo", epsilon_high=5.0, beta=0.0),
    "rloo": dict(beta=0.05, normalize_advantages=False),
    "reinforce_pp": dict(scale_rewards="batch", loss_type="dapo", epsilon=0.2, beta=0.0),
}


@pytest.mark.parametrize("preset", list(OBJECTIVES))
def test_preset_resolves_to_its_paper(preset):
    recipe = load_recipe(GRPORecipe, PRESET_RECIPES[preset])
    settings = recipe.trainer_settings()
    assert {k: settings[k] for k in PAPERS[preset]} == PAPERS[preset]
    assert recipe.objective_settings() == OBJECTIVES[preset].trainer  # shown in the plan
    assert recipe.values()["objective_settings"] == OBJECTIVES[preset].trainer
    if preset == "dapo":  # dynamic sampling with refill and the overlong reward, DAPO's own
        assert recipe.dynamic_sampling == "refill"
        assert recipe.rewards["soft_overlong"] == 1.0
        assert recipe.reward_kwargs["soft_overlong"] == {"max_len": 40, "cache": 8}
    if preset == "rloo":
        assert recipe.trainer_config() == "trl.RLOOConfig" and "loss_type" not in settings


def test_a_recipe_key_wins_over_the_preset():
    recipe = load_recipe(GRPORecipe, PRESET_RECIPES["dapo"],
                         {"epsilon_high": "0.3", "dynamic_sampling": "mask"})
    assert recipe.trainer_settings()["epsilon_high"] == 0.3
    assert "epsilon_high" not in recipe.objective_settings() and recipe.dynamic_sampling == "mask"


@pytest.mark.parametrize("over,message", [
    ({"objective": "ppo"}, "objective must be one of"),
    ({"dynamic_sampling": "sometimes"}, "dynamic_sampling must be"),
    ({"max_sampling_rounds": "0"}, "max_sampling_rounds"),
    ({"objective": "rloo", "dynamic_sampling": "refill"}, "dynamic_sampling works with"),
    ({"objective": "rloo", "loss_type": "dapo"}, "loss_type: not a field of trl.RLOOConfig"),
])
def test_bad_objective_settings_are_one_line_errors(over, message):
    with pytest.raises(UserError, match=message):
        load_recipe(GRPORecipe, PRESET_RECIPES["grpo"], over).trainer_settings()


@pytest.fixture(scope="module")
def grpo_trainer(tiny_run, tmp_path_factory):
    """A real TRL GRPOTrainer on the tiny SFT model, to evaluate TRL's loss on chosen inputs."""
    from datasets import Dataset
    from trl import GRPOConfig

    from posttrain.manifest import Manifest
    from posttrain.models import load_model, load_tokenizer
    model_dir = Manifest(tiny_run).resolve("sft")
    tokenizer = load_tokenizer(model_dir)
    prompts = ([{"prompt": [{"role": "user", "content": f"flat {i}"}]} for i in range(8)]
               + [{"prompt": [{"role": "user", "content": f"mixed {i}"}]} for i in range(8)])

    def reward(prompts, completions, **_):
        # Groups of a "flat" prompt all earn 0 (no signal); a "mixed" group alternates 0, 1.
        return [0.0 if "flat" in p[-1]["content"] else float(i % 2) for i, p in enumerate(prompts)]

    args = GRPOConfig(output_dir=str(tmp_path_factory.mktemp("grpo")), use_cpu=True, bf16=False,
                      per_device_train_batch_size=16, num_generations=4, max_completion_length=8,
                      report_to=[], loss_type="grpo", beta=0.0, seed=0)
    trainer = DynamicSamplingGRPOTrainer(model=load_model(model_dir), reward_funcs=[reward],
                                         args=args, train_dataset=Dataset.from_list(prompts),
                                         processing_class=tokenizer, max_sampling_rounds=8)
    trainer.current_gradient_accumulation_steps = 1  # what `train()` sets before a step
    return trainer


def _loss_inputs(trainer, lengths: list[int], width: int, drift: torch.Tensor | None = None):
    """A batch for `_compute_loss`: completions of `lengths` (right-padded to `width`), advantage
    1, old log-probs = current ones minus `drift` (ratio exp(drift))."""
    torch.manual_seed(0)
    b = len(lengths)
    prompt_ids = torch.randint(5, 20, (b, 3))
    completion_ids = torch.randint(5, 20, (b, width))
    mask = torch.tensor([[1] * n + [0] * (width - n) for n in lengths])
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([prompt_ids, completion_ids], 1),
            torch.cat([torch.ones_like(prompt_ids), mask], 1), width)
    drift = torch.zeros_like(logps) if drift is None else drift
    return {"prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids),
            "completion_ids": completion_ids, "completion_mask": mask,
            "advantages": torch.ones(b), "old_per_token_logps": logps - drift,
            "num_items_in_batch": mask.sum()}


def _loss(trainer, inputs, **attrs) -> float:
    saved = {k: getattr(trainer, k) for k in attrs}
    for k, v in attrs.items():
        setattr(trainer, k, v)
    try:
        trainer.model.train()
        with torch.no_grad():
            return float(trainer._compute_loss(trainer.model, inputs))
    finally:
        for k, v in saved.items():
            setattr(trainer, k, v)


def test_sequence_ratio_over_one_token_equals_the_token_ratio(grpo_trainer):
    """GSPO's ratio is the length-normalised sequence likelihood ratio: over a one-token
    completion it is that token's ratio, so the losses agree; over longer ones they differ."""
    one = _loss_inputs(grpo_trainer, [1, 1], width=1, drift=torch.tensor([[0.1], [-0.05]]))
    assert _loss(grpo_trainer, one, importance_sampling_level="sequence") == pytest.approx(
        _loss(grpo_trainer, one, importance_sampling_level="token"), rel=1e-6)
    three = _loss_inputs(grpo_trainer, [3, 3], width=3,
                         drift=torch.tensor([[0.5, -0.4, 0.3], [0.3, 0.3, -0.5]]))
    assert _loss(grpo_trainer, three, importance_sampling_level="sequence") != pytest.approx(
        _loss(grpo_trainer, three, importance_sampling_level="token"), rel=1e-3)


def test_dr_grpo_is_not_length_normalised(grpo_trainer):
    """With every token's loss equal, GRPO averages per sequence (length-free); Dr. GRPO divides
    the sum by a constant, so doubling every length doubles its loss."""
    short = _loss_inputs(grpo_trainer, [2, 4], width=8)
    long = _loss_inputs(grpo_trainer, [4, 8], width=8)
    assert _loss(grpo_trainer, short, loss_type="grpo") == pytest.approx(
        _loss(grpo_trainer, long, loss_type="grpo"), rel=1e-5)
    assert _loss(grpo_trainer, long, loss_type="dr_grpo") == pytest.approx(
        2 * _loss(grpo_trainer, short, loss_type="dr_grpo"), rel=1e-5)


def test_refill_fills_the_batch_with_informative_groups(grpo_trainer):
    """Half the step's prompts are flat (all rewards equal): refill samples further prompts until
    all 4 places hold a group whose rewards differ; the batch keeps its configured size."""
    data = grpo_trainer.train_dataset
    rows = [data[i] for i in (0, 1, 8, 9) for _ in range(4)]  # 2 flat + 2 mixed groups
    grpo_trainer.model.train()
    grpo_trainer.dynamic_mode = "refill"
    out = grpo_trainer._generate_and_score_completions(rows)
    assert out["advantages"].numel() == 16
    assert bool(informative_groups(out["advantages"], 4).all())
    assert bool((out["completion_mask"].sum(1) > 0).all())  # nothing masked: all places filled
    metrics = grpo_trainer._metrics["train"]
    assert metrics["dynamic_sampling/kept_frac"][-1] == 0.5
    assert metrics["dynamic_sampling/informative_frac"][-1] == 1.0
    assert metrics["dynamic_sampling/rounds"][-1] >= 2
    assert metrics["dynamic_sampling/generated_frac"][-1] > 1.0  # the refill's extra cost
    assert int(out["num_items_in_batch"]) == int(out["completion_mask"].sum())


def test_mask_mode_shrinks_the_batch_instead(grpo_trainer):
    """`mask` trains on the 2 informative groups alone, and their token-level loss is the one the
    full batch with the flat groups masked out would give."""
    data = grpo_trainer.train_dataset
    rows = [data[i] for i in (0, 1, 8, 9) for _ in range(4)]
    grpo_trainer.model.train()
    grpo_trainer.dynamic_mode = "mask"
    torch.manual_seed(0)
    try:
        out = grpo_trainer._generate_and_score_completions(rows)
    finally:
        grpo_trainer.dynamic_mode = "refill"
    assert out["advantages"].numel() == 8 and bool(informative_groups(out["advantages"], 4).all())
    assert bool((out["completion_mask"].sum(1) > 0).all())
    assert int(out["num_items_in_batch"]) == int(out["completion_mask"].sum())
    metrics = grpo_trainer._metrics["train"]
    assert metrics["dynamic_sampling/generated_frac"][-1] == 1.0
    assert metrics["dynamic_sampling/trained_frac"][-1] == 0.5
    # The flat groups back in, masked out: the same loss.
    padded = {}
    for key, value in out.items():
        if key == "num_items_in_batch":
            padded[key] = value
            continue
        filler = value[:1].expand(8, *value.shape[1:])
        padded[key] = torch.cat([filler * 0 if key == "completion_mask" else filler, value])
    assert _loss(grpo_trainer, padded, loss_type="dapo") == pytest.approx(
        _loss(grpo_trainer, out, loss_type="dapo"), rel=1e-5)


@pytest.mark.parametrize("informative, slices, want", [
    ([1, 1, 0, 0, 1, 1, 0, 0], 1, [1, 1, 0, 0, 1, 1, 0, 0]),
    ([1, 1, 0, 0, 1, 1, 0, 0], 8, [1] * 8),                  # TRL's 8 slices need 8 rows
    ([0, 0, 0, 0, 0, 0, 0, 0], 1, [1, 1, 0, 0, 0, 0, 0, 0]),  # nothing informative: one group
    ([0, 0, 1, 1, 0, 0, 0, 0], 4, [1, 1, 1, 1, 0, 0, 0, 0]),
])
def test_mask_mode_rows(informative, slices, want):
    from posttrain.stages.dynamic_sampling import trained_rows
    rows = trained_rows(torch.tensor(informative, dtype=torch.bool), 2, slices)
    assert rows.int().tolist() == want


@pytest.mark.slow
def test_every_preset_trains_through_the_stage(tiny_run):
    from posttrain.manifest import Manifest
    from posttrain.runner import run_stage
    for preset, path in PRESET_RECIPES.items():
        entry = run_stage("grpo", str(path), tiny_run,
                          {"max_steps": "1", "per_device_train_batch_size": "16",
                           "save_steps": "1000", "eval_suite": "null"}, eval_after=False)
        assert entry["status"] == "done", preset
        stage = Manifest(tiny_run).stage(f"grpo_{preset}")
        assert stage["plan"]["recipe"]["objective"] == preset
        trainer = stage["plan"]["trainer"]
        assert {k: trainer[k] for k in PAPERS[preset]} == PAPERS[preset], preset
        logs = [json.loads(line) for line in
                (Path(stage["output_dir"]).parent / "logs.jsonl").read_text().splitlines()]
        assert any("reward" in r for r in logs), preset
