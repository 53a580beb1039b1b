"""GRPO: reinforcement learning with rule-based, verifiable rewards (R1 and R1-Zero).

A thin `main()` over TRL's GRPOTrainer. Task prompts become chat prompts; the `answer`, `task` and
`meta` columns ride along so the rewards (`posttrain.rewards`, picked by name with weights) can
check each completion with the same code the eval suites use. No reward model, no value model:
the advantage of a completion is its reward relative to the other `num_generations` samples of
the same prompt. Every other knob is TRL's own field under its own name (`beta` for the KL to a
reference model, `epsilon`/`epsilon_high` for clip-higher, `loss_type`, `scale_rewards`,
`mask_truncated_completions`, `temperature`, `use_vllm` + `vllm_mode`, ...).

Run: `posttrain grpo recipes/tiny/grpo.yaml --run demo` (or `make grpo`);
R1-Zero straight from the base: `posttrain grpo recipes/tiny/grpo_zero.yaml --run demo`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from posttrain.errors import UserError
from posttrain.recipe import Recipe as BaseRecipe
from posttrain.recipe import positive
from posttrain.stages.common import (
    StageContext,
    last_checkpoint,
    prepare_model,
    save_final,
    stage_callbacks,
)
from posttrain.stages.sampling import PromptFields


@dataclasses.dataclass
class Recipe(PromptFields, BaseRecipe):
    """GRPO recipe: the prompt fields of `PromptFields`, the rewards, and TRL GRPOConfig fields.

    Attributes:
        rewards: Reward name (keys of `posttrain.rewards.REWARDS`) → weight in the total reward.
        reward_kwargs: Reward name → parameters of that reward (e.g. `{cosine: {max_len: 256}}`).
        dynamic_sampling: DAPO dynamic sampling: groups whose completions all earn the same
            reward are dropped from the loss (see `posttrain.stages.dynamic_sampling`).
    """

    rewards: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"accuracy": 1.0, "format": 0.1})
    reward_kwargs: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    dynamic_sampling: bool = False

    KIND: ClassVar[str] = "grpo"
    TRAINER_CONFIG: ClassVar[str] = "trl.GRPOConfig"
    # Our defaults for TRL's GRPOConfig; every one is overridable from the recipe by the same name.
    TRAINER_DEFAULTS: ClassVar[dict[str, Any]] = dict(
        max_steps=100, learning_rate=1e-5, per_device_train_batch_size=32, num_generations=8,
        max_completion_length=128, temperature=0.7, beta=0.0, loss_type="dapo",
        lr_scheduler_type="constant", logging_steps=1, save_steps=50, log_completions=False)
    REQUIRED: ClassVar[tuple[str, ...]] = ("init_from", "prompt_data", "rewards")

    def validate(self) -> None:
        super().validate()
        if "reward_weights" in self.trainer:
            raise UserError("reward_weights: give weights by name in `rewards: {accuracy: 1.0, ...}`")
        positive(self, "max_steps", "learning_rate", "per_device_train_batch_size",
                 "max_completion_length", "temperature")
        if self.trainer.get("beta", 0) < 0:
            raise UserError(f"beta must be >= 0, got {self.trainer['beta']}")

    def trainer_settings(self) -> dict[str, Any]:
        # TRL weighs the reward functions in the order `rewards` lists them.
        return {**super().trainer_settings(), "reward_weights": list(self.rewards.values())}


def preflight(recipe: Recipe, ctx: StageContext) -> None:
    """Every user-input check, before the manifest is touched."""
    from posttrain.data import check_spec
    from posttrain.models import load_tokenizer
    from posttrain.rewards import build_reward_funcs

    for i, spec in enumerate(recipe.prompt_data):
        check_spec(spec, f"prompt_data[{i}]")
    build_prompts(recipe)  # missing prompt/answer columns, empty files: before the stage starts
    build_reward_funcs(recipe.rewards, recipe.reward_kwargs)
    if recipe.trainer.get("use_vllm"):
        from trl.import_utils import is_vllm_available
        if not is_vllm_available():
            raise UserError("use_vllm: true needs vLLM (pip install 'posttrain[vllm]'); "
                            "set use_vllm: false to generate with transformers")
    load_tokenizer(ctx.init_path)


def build_prompts(recipe: Recipe):
    """Chat prompts plus the gold columns (`answer`/`solution`, `task`, `meta`) for the rewards."""
    from posttrain.stages.sampling import load_prompts
    ds = load_prompts(recipe)
    # Cold-start columns the rewards never read would only be carried around.
    ds = ds.remove_columns([c for c in ("trace", "answer_format") if c in ds.column_names])
    # The format rewards read each row's answer format (posttrain.answer_format).
    return ds.add_column("answer_format", [recipe.answer_format] * len(ds))


def main(recipe: Recipe, ctx: StageContext) -> dict[str, Any]:
    from trl import GRPOTrainer

    from posttrain.models import load_model, load_tokenizer
    from posttrain.plots import plot_reward_curve
    from posttrain.rewards import build_reward_funcs
    from posttrain.stages.dynamic_sampling import DynamicSamplingGRPOTrainer

    tokenizer = load_tokenizer(ctx.init_path)
    model = prepare_model(load_model(ctx.init_path), recipe)
    train = build_prompts(recipe)
    reward_funcs, _ = build_reward_funcs(recipe.rewards, recipe.reward_kwargs)
    trainer_cls = DynamicSamplingGRPOTrainer if recipe.dynamic_sampling else GRPOTrainer
    trainer = trainer_cls(model=model, reward_funcs=reward_funcs, args=ctx.plan.args,
                          train_dataset=train, processing_class=tokenizer,
                          callbacks=stage_callbacks(recipe, ctx))
    out = trainer.train(resume_from_checkpoint=last_checkpoint(ctx))
    tokenizer.padding_side = "left"
    save_final(trainer.model, tokenizer, ctx)
    plot_reward_curve(ctx.log_path, ctx.stage_dir / "reward_curve.png", title=f"{ctx.run}/{ctx.name}")
    history = [r for r in trainer.state.log_history if "reward" in r]
    return {"train_loss": out.training_loss, "train_prompts": len(train),
            "reward_first": history[0]["reward"] if history else None,
            "reward_last": history[-1]["reward"] if history else None}
