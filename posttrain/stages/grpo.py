"""GRPO: reinforcement learning with rule-based, verifiable rewards (R1 and R1-Zero).

A thin `main()` over TRL's GRPOTrainer. Task prompts become chat prompts; the `answer`, `task` and
`meta` columns ride along so the rewards (`posttrain.rewards`, picked by name with weights) can
check each completion with the same code the eval suites use. No reward model, no value model:
the advantage of a completion is its reward relative to the other `num_generations` samples of
the same prompt. Every other knob is TRL's own field under its own name (`beta` for the KL to a
reference model, `epsilon`/`epsilon_high` for clip-higher, `loss_type`, `scale_rewards`,
`mask_truncated_completions`, `temperature`, `use_vllm` + `vllm_mode`, ...).

`objective:` names one paper's settings (the table in posttrain.stages.objectives, which also
says which TRL trainer runs it); any of them stays overridable by its own key.

Run: `posttrain grpo recipes/tiny/grpo.yaml --run demo` (or `make grpo`);
R1-Zero straight from the base: `posttrain grpo recipes/tiny/grpo_zero.yaml --run demo`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

from transformers import TrainerCallback

from posttrain.errors import UserError
from posttrain.recipe import Recipe as BaseRecipe
from posttrain.recipe import TrainingFields, positive
from posttrain.stages.context import StageContext
from posttrain.stages.lora import LoraFields, lora_config
from posttrain.stages.objectives import GRPO_CONFIG, OBJECTIVES, config_class, trainer_class
from posttrain.stages.objectives import objective as find_objective
from posttrain.stages.sampling import PromptFields
from posttrain.stages.training import load_trainable, run_training
from posttrain.stages.vllm_sync import (
    RolloutCheck,
    colocated_engine,
    on_policy_every_step,
    use_reload_sync,
)
from posttrain.tools import PythonTool, StepClock, ToolLimits, check_tools

DYNAMIC_SAMPLING = ("refill", "mask")
# Mean |log p| gap between vLLM's sampled tokens and the trainer's above which a GRPO stage stops.
ROLLOUT_LOGPROB_GAP = 0.5
# Gap below which a colocated, every-step-synced sampler counts as the policy itself: float32 on
# both sides measured ~2e-6 here; bf16 kernels on GPUs differ by more, and keep the correction.
DROP_IS_CORRECTION_BELOW = 1e-3


@dataclasses.dataclass
class Recipe(TrainingFields, LoraFields, PromptFields, BaseRecipe):
    """GRPO recipe: the prompt fields of `PromptFields`, LoRA (`LoraFields`), the rewards, and TRL
    GRPOConfig fields.

    Attributes:
        rewards: Reward name (keys of `posttrain.rewards.REWARDS`) → weight in the total reward.
        reward_kwargs: Reward name → parameters of that reward (e.g. `{cosine: {max_len: 256}}`).
        objective: An RL objective preset (posttrain.stages.objectives.OBJECTIVES); null: TRL's
            fields as the recipe sets them.
        dynamic_sampling: DAPO dynamic sampling (posttrain.stages.dynamic_sampling): `refill`
            (or true) keeps sampling prompts until the batch holds only groups whose rewards
            differ; `mask` only masks the others out; false: off. Null: the objective's, else off.
        max_sampling_rounds: Most generations per step under `refill`, the step's own included.
        overlong_shaping: DAPO's soft overlong punishment: adds the `soft_overlong` reward over
            the last 20% of `max_completion_length` (unless `rewards` has it). Null: the
            objective's, else off.
        rollout_logprob_gap: With vLLM generating, stop the stage when the mean gap between
            vLLM's and the trainer's log-probs of the sampled tokens exceeds this
            (posttrain.stages.vllm_sync); null: no check.
        drop_is_correction_below: With vLLM colocated and synced every step, turn TRL's
            importance-sampling correction off once that gap is below this (then vLLM samples
            the policy itself, and the correction's extra forward pass buys nothing); the
            stage's record gives the step. Null: keep it on (and the check) at every step.
        tools: Tools the policy may call mid-rollout (`[python]`: posttrain.tools), through
            TRL's tool loop; tool results carry no loss (TRL's `tool_mask`).
        max_tool_calls: Tool calls per rollout (later ones are answered that the budget is
            spent); also TRL's `max_tool_calling_iterations`.
    """

    rewards: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"accuracy": 1.0, "format": 0.1})
    reward_kwargs: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    objective: str | None = None
    dynamic_sampling: bool | str | None = None
    max_sampling_rounds: int = 4
    overlong_shaping: bool | None = None
    rollout_logprob_gap: float | None = ROLLOUT_LOGPROB_GAP
    drop_is_correction_below: float | None = DROP_IS_CORRECTION_BELOW
    tools: list[str] = dataclasses.field(default_factory=list)
    max_tool_calls: int = 4

    KIND: ClassVar[str] = "grpo"
    TRAINER_CONFIG: ClassVar[str] = GRPO_CONFIG
    OTHER_TRAINER_CONFIGS: ClassVar[tuple[str, ...]] = tuple(
        {o.config for o in OBJECTIVES.values()} - {GRPO_CONFIG})
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
        preset = find_objective(self.objective)  # an unknown name: the one-line error first
        super().validate()
        if "reward_weights" in self.trainer:
            raise UserError("reward_weights: give weights by name in `rewards: {accuracy: 1.0, ...}`")
        positive(self, "max_steps", "learning_rate", "per_device_train_batch_size",
                 "max_completion_length", "temperature")
        if self.trainer.get("beta", 0) < 0:
            raise UserError(f"beta must be >= 0, got {self.trainer['beta']}")
        if self.dynamic_sampling not in (None, True, False, *DYNAMIC_SAMPLING):
            raise UserError(f"dynamic_sampling must be refill, mask or false, got "
                            f"{self.dynamic_sampling!r}")
        if self.max_sampling_rounds < 1:
            raise UserError(f"max_sampling_rounds must be >= 1, got {self.max_sampling_rounds}")
        if (self.trainer.get("use_vllm") and self.rollout_logprob_gap is not None
                and self.trainer_settings().get("vllm_importance_sampling_correction") is False):
            raise UserError("rollout_logprob_gap: the check reads the log-prob gap TRL measures "
                            "with vllm_importance_sampling_correction: true; turn that on, or "
                            "set rollout_logprob_gap: null")
        positive(self, "rollout_logprob_gap", "drop_is_correction_below", "max_tool_calls")
        check_tools(self.tools)
        if "max_tool_calling_iterations" in self.trainer:
            raise UserError("max_tool_calling_iterations: set max_tool_calls (calls per rollout)")
        if preset and not preset.dynamic_sampling_ok and self.dynamic_sampling:
            raise UserError(f"objective {self.objective}: dynamic_sampling works with the GRPO "
                            "trainer's objectives, not this one")

    def derived(self) -> dict[str, Any]:
        """The objective's stage fields where the recipe leaves them null, and DAPO's overlong
        reward when shaping is on."""
        preset = find_objective(self.objective)
        stage = preset.stage if preset else {}
        out = super().derived()
        mode = stage.get("dynamic_sampling", False) if self.dynamic_sampling is None \
            else self.dynamic_sampling
        out["dynamic_sampling"] = "refill" if mode is True else mode
        shaping = stage.get("overlong_shaping", False) if self.overlong_shaping is None \
            else self.overlong_shaping
        out["overlong_shaping"] = shaping
        if shaping and "soft_overlong" not in self.rewards:
            length = self.trainer_settings()["max_completion_length"]
            out["rewards"] = {**self.rewards, "soft_overlong": 1.0}
            out["reward_kwargs"] = {**self.reward_kwargs, "soft_overlong": {
                "max_len": length, "cache": max(1, length // 5)}}
        return out

    def trainer_config(self) -> str:
        return config_class(self.objective)

    def preset_settings(self) -> dict[str, Any]:
        preset = find_objective(self.objective)
        return dict(preset.trainer) if preset else {}

    def objective_settings(self) -> dict[str, Any]:
        """What the preset set: its TRL fields the recipe does not set itself."""
        return {k: v for k, v in self.preset_settings().items() if k not in self.trainer}

    def own_settings(self) -> dict[str, Any]:
        # TRL weighs the reward functions in the order `rewards` lists them.
        own: dict[str, Any] = {"reward_weights": list(self.rewards.values())}
        if self.tools and "max_tool_calling_iterations" in self.trainer_fields():
            own["max_tool_calling_iterations"] = self.max_tool_calls  # >= 1 call a round
        return own

    def values(self) -> dict[str, Any]:
        return {**super().values(), "objective_settings": self.objective_settings()}


def preflight(recipe: Recipe, ctx: StageContext) -> None:
    """Every user-input check, before the manifest is touched."""
    from posttrain.data import check_spec
    from posttrain.models import shared_tokenizer
    from posttrain.rewards import build_reward_funcs

    for i, spec in enumerate(recipe.prompt_data):
        check_spec(spec, f"prompt_data[{i}]")
    build_prompts(recipe)  # missing prompt/answer columns, empty files: before the stage starts
    build_reward_funcs(recipe.rewards, recipe.reward_kwargs)
    check_dynamic_sampling(recipe, ctx.plan.args)
    tokenizer = shared_tokenizer(ctx.init_path, **recipe.tokenizer_options())  # a bad dir or template
    if recipe.tools:
        from posttrain.tools.chat import check_tool_template
        check_tool_template(tokenizer, "tools")
    if recipe.trainer.get("use_vllm"):
        from trl.import_utils import is_vllm_available
        if not is_vllm_available():
            raise UserError("use_vllm: true needs vLLM (pip install 'posttrain[vllm]'); "
                            "set use_vllm: false to generate with transformers")


class ToolClock(TrainerCallback):
    """Opens each optimizer step's tool-time budget (`posttrain.tools.StepClock`)."""

    def __init__(self, clock):
        self.clock = clock

    def on_step_begin(self, args, state, control, **kwargs):
        self.clock.start()


def check_dynamic_sampling(recipe: Recipe, args) -> None:
    """Dynamic sampling under several processes needs every group on one process: each process
    judges and refills its own groups. Refused here when a process's share of a generation
    would split a group, rather than run as something else."""
    from posttrain.dist import planned_world_size

    world = planned_world_size()
    local = args.per_device_train_batch_size * args.steps_per_generation
    if recipe.dynamic_sampling and world > 1 and local % args.num_generations:
        raise UserError(f"dynamic_sampling: {recipe.dynamic_sampling} on {world} processes needs "
                        f"each process's share of a generation (per_device_train_batch_size x "
                        f"steps_per_generation = {local}) to hold whole groups of "
                        f"num_generations ({args.num_generations})")


def build_prompts(recipe: Recipe):
    """Chat prompts plus the gold columns (`answer`/`solution`, `task`, `meta`) for the rewards."""
    from posttrain.stages.sampling import load_prompts
    ds = load_prompts(recipe)
    # Cold-start columns the rewards never read would only be carried around.
    ds = ds.remove_columns([c for c in ("trace", "answer_format") if c in ds.column_names])
    # The format rewards read each row's answer format (posttrain.answer_format).
    return ds.add_column("answer_format", [recipe.answer_format] * len(ds))


def main(recipe: Recipe, ctx: StageContext) -> dict[str, Any]:
    from posttrain.budget import trainer_budget
    from posttrain.models import load_tokenizer
    from posttrain.plots import plot_reward_curve
    from posttrain.rewards import build_reward_funcs
    from posttrain.stages.dynamic_sampling import DynamicSamplingGRPOTrainer

    tokenizer = load_tokenizer(ctx.init_path, **recipe.tokenizer_options())
    train = build_prompts(recipe)
    reward_funcs, _ = build_reward_funcs(recipe.rewards, recipe.reward_kwargs)
    extra: dict[str, Any] = {}
    cls = trainer_class(recipe.objective)
    if recipe.dynamic_sampling:
        cls = DynamicSamplingGRPOTrainer
        extra = {"mode": recipe.dynamic_sampling, "max_sampling_rounds": recipe.max_sampling_rounds}

    if recipe.tools:  # one PythonTool per rollout (TRL's environment_factory), one step clock
        limits = ToolLimits(max_calls=recipe.max_tool_calls)
        clock = StepClock(limits.step_seconds)
        extra["environment_factory"] = functools.partial(PythonTool, limits, clock)

    check = RolloutCheck(recipe.rollout_logprob_gap, recipe.drop_is_correction_below)

    def build(model, callbacks):
        if ctx.plan.args.use_vllm and (recipe.rollout_logprob_gap is not None
                                       or recipe.drop_is_correction_below is not None):
            callbacks = [check, *callbacks]
        if recipe.tools:
            callbacks = [ToolClock(clock), *callbacks]
        with colocated_engine(model, ctx.plan.args.use_vllm):
            trainer = cls(model=model, reward_funcs=reward_funcs, args=ctx.plan.args,
                          train_dataset=train, processing_class=tokenizer,
                          peft_config=lora_config(recipe), callbacks=callbacks, **extra)
        # vLLM takes new weights through its reload path, every step.
        if use_reload_sync(trainer) and on_policy_every_step(trainer.args):
            check.trainer = trainer
        return trainer

    trainer, out = run_training(recipe, ctx, load_trainable(ctx.init_path, recipe), tokenizer,
                                build)
    plot_reward_curve(ctx.log_path, ctx.stage_dir / "reward_curve.png", title=f"{ctx.run}/{ctx.name}")
    history = [r for r in trainer.state.log_history if "reward" in r]
    return {"train_loss": out.training_loss, "train_prompts": len(train),
            "reward_first": history[0]["reward"] if history else None,
            "reward_last": history[-1]["reward"] if history else None,
            "budget": trainer_budget(trainer, out, ctx.log_path),
            "is_correction_off_from_step": check.dropped_at}
