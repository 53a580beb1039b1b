"""GRPO: reinforcement learning with rule-based, verifiable rewards (R1 and R1-Zero).

A thin `main()` over TRL's GRPOTrainer. Task prompts become chat prompts; the `answer`, `task` and
`meta` columns ride along so the rewards (`posttrain.rewards`, picked by name with weights) can
check each completion with the same code the eval suites use. No reward model, no value model:
the advantage of a completion is its reward relative to the other `num_generations` samples of
the same prompt. Every other knob is TRL's own field under its own name (`beta` for the KL to a
reference model, `epsilon`/`epsilon_high` for clip-higher, `loss_type`, `scale_rewards`,
`mask_truncated_completions`, `temperature`, `use_vllm` + `vllm_mode`, ...).

`objective: grpo | dr_grpo | dapo | gspo | cispo | rloo | reinforce_pp` sets one paper's settings
(posttrain.stages.objectives); any of them stays overridable by its own key.

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
    load_trainable,
    prepare_model,
    save_final,
    stage_callbacks,
)
from posttrain.stages.objectives import objective as find_objective
from posttrain.stages.sampling import PromptFields

DYNAMIC_SAMPLING = ("refill", "mask")


@dataclasses.dataclass
class Recipe(PromptFields, BaseRecipe):
    """GRPO recipe: the prompt fields of `PromptFields`, the rewards, and TRL GRPOConfig fields.

    Attributes:
        rewards: Reward name (keys of `posttrain.rewards.REWARDS`) → weight in the total reward.
        reward_kwargs: Reward name → parameters of that reward (e.g. `{cosine: {max_len: 256}}`).
        objective: An RL objective preset (posttrain.stages.objectives): grpo, dr_grpo, dapo,
            gspo, cispo, rloo or reinforce_pp; null: TRL's fields as the recipe sets them.
        dynamic_sampling: DAPO dynamic sampling (posttrain.stages.dynamic_sampling): `refill`
            (or true) keeps sampling prompts until the batch holds only groups whose rewards
            differ; `mask` only masks the others out; false: off. Null: the objective's, else off.
        max_sampling_rounds: Most generations per step under `refill`, the step's own included.
        overlong_shaping: DAPO's soft overlong punishment: adds the `soft_overlong` reward over
            the last 20% of `max_completion_length` (unless `rewards` has it). Null: the
            objective's, else off.
    """

    rewards: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"accuracy": 1.0, "format": 0.1})
    reward_kwargs: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    objective: str | None = None
    dynamic_sampling: bool | str | None = None
    max_sampling_rounds: int = 4
    overlong_shaping: bool | None = None

    KIND: ClassVar[str] = "grpo"
    TRAINER_CONFIG: ClassVar[str] = "trl.GRPOConfig"
    # Our defaults for TRL's GRPOConfig; every one is overridable from the recipe by the same name.
    TRAINER_DEFAULTS: ClassVar[dict[str, Any]] = dict(
        max_steps=100, learning_rate=1e-5, per_device_train_batch_size=32, num_generations=8,
        max_completion_length=128, temperature=0.7, beta=0.0, loss_type="dapo",
        lr_scheduler_type="constant", logging_steps=1, save_steps=50, log_completions=False,
        # With vLLM generating, correct for its sampler differing from the trained policy (TRL's
        # truncated importance sampling; the ratio and log-prob gap are logged and plotted).
        vllm_importance_sampling_correction=True)
    REQUIRED: ClassVar[tuple[str, ...]] = ("init_from", "prompt_data", "rewards")

    def validate(self) -> None:
        self._apply_objective()
        super().validate()
        if "reward_weights" in self.trainer:
            raise UserError("reward_weights: give weights by name in `rewards: {accuracy: 1.0, ...}`")
        positive(self, "max_steps", "learning_rate", "per_device_train_batch_size",
                 "max_completion_length", "temperature")
        if self.trainer.get("beta", 0) < 0:
            raise UserError(f"beta must be >= 0, got {self.trainer['beta']}")

    def _apply_objective(self) -> None:
        """Resolve the preset's stage fields (recipe keys win) and DAPO's overlong reward."""
        preset = find_objective(self.objective)
        stage = preset.stage if preset else {}
        if self.dynamic_sampling is None:
            self.dynamic_sampling = stage.get("dynamic_sampling", False)
        if self.dynamic_sampling is True:
            self.dynamic_sampling = "refill"
        if self.dynamic_sampling not in (False, *DYNAMIC_SAMPLING):
            raise UserError(f"dynamic_sampling must be refill, mask or false, got "
                            f"{self.dynamic_sampling!r}")
        if self.max_sampling_rounds < 1:
            raise UserError(f"max_sampling_rounds must be >= 1, got {self.max_sampling_rounds}")
        if self.overlong_shaping is None:
            self.overlong_shaping = stage.get("overlong_shaping", False)
        if self.overlong_shaping and "soft_overlong" not in self.rewards:
            length = self.trainer_settings()["max_completion_length"]
            self.rewards = {**self.rewards, "soft_overlong": 1.0}
            self.reward_kwargs = {**self.reward_kwargs, "soft_overlong": {
                "max_len": length, "cache": max(1, length // 5)}}
        if preset and preset.config != "trl.GRPOConfig" and self.dynamic_sampling:
            raise UserError(f"objective {self.objective}: dynamic_sampling works with the GRPO "
                            "trainer's objectives, not this one")

    def trainer_config(self) -> str:
        preset = find_objective(self.objective)
        return preset.config if preset else self.TRAINER_CONFIG

    def objective_settings(self) -> dict[str, Any]:
        """What the preset set: its TRL fields the recipe does not set itself."""
        preset = find_objective(self.objective)
        return {k: v for k, v in preset.trainer.items() if k not in self.trainer} if preset else {}

    def values(self) -> dict[str, Any]:
        return {**super().values(), "objective_settings": self.objective_settings()}

    def trainer_settings(self) -> dict[str, Any]:
        settings = {**super().trainer_settings(), **self.objective_settings(),
                    # TRL weighs the reward functions in the order `rewards` lists them.
                    "reward_weights": list(self.rewards.values())}
        if self.trainer_config() == self.TRAINER_CONFIG:
            return settings
        accepted = self.trainer_fields()
        stray = sorted(k for k in self.trainer if k not in accepted)
        if stray:
            raise UserError(f"objective {self.objective}: {', '.join(stray)} is not a field of "
                            f"{self.trainer_config()}")
        return {k: v for k, v in settings.items() if k in accepted}


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

    from posttrain.budget import trainer_budget
    from posttrain.models import load_tokenizer
    from posttrain.plots import plot_reward_curve
    from posttrain.rewards import build_reward_funcs
    from posttrain.stages.dynamic_sampling import DynamicSamplingGRPOTrainer

    tokenizer = load_tokenizer(ctx.init_path)
    model = prepare_model(load_trainable(ctx.init_path, recipe), recipe)
    train = build_prompts(recipe)
    reward_funcs, _ = build_reward_funcs(recipe.rewards, recipe.reward_kwargs)
    extra: dict[str, Any] = {}
    if recipe.trainer_config() == "trl.RLOOConfig":
        from trl import RLOOTrainer as trainer_cls
    elif recipe.dynamic_sampling:
        trainer_cls = DynamicSamplingGRPOTrainer
        extra = {"mode": recipe.dynamic_sampling, "max_sampling_rounds": recipe.max_sampling_rounds}
    else:
        trainer_cls = GRPOTrainer
    trainer = trainer_cls(model=model, reward_funcs=reward_funcs, args=ctx.plan.args,
                          train_dataset=train, processing_class=tokenizer,
                          callbacks=stage_callbacks(recipe, ctx), **extra)
    out = trainer.train(resume_from_checkpoint=last_checkpoint(ctx))
    tokenizer.padding_side = "left"
    save_final(trainer.model, tokenizer, ctx)
    plot_reward_curve(ctx.log_path, ctx.stage_dir / "reward_curve.png", title=f"{ctx.run}/{ctx.name}")
    history = [r for r in trainer.state.log_history if "reward" in r]
    return {"train_loss": out.training_loss, "train_prompts": len(train),
            "reward_first": history[0]["reward"] if history else None,
            "reward_last": history[-1]["reward"] if history else None,
            "budget": trainer_budget(trainer, out, ctx.log_path)}
