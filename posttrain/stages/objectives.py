"""RL objective presets for the GRPO stage: one recipe key, `objective:`, sets a paper's settings.

Each preset is values only: the TRL fields that paper documents (TRL implements every loss and
ratio here: `loss_type`, `importance_sampling_level`, `scale_rewards`, clip-higher, its RLOO
trainer) and our two additions TRL lacks (`dynamic_sampling` with refill, DAPO's overlong reward
shaping as the `soft_overlong` reward). A recipe key of the same name always wins over the preset;
the stage's plan records what the preset set (`objective_settings`).

| preset | paper | what it sets |
|---|---|---|
| grpo | DeepSeekMath (Shao et al. 2024) | sample-level mean loss, std-scaled group advantage, eps 0.2, KL beta 0.04 |
| dr_grpo | Dr. GRPO (Liu et al. 2025) | no std scaling, no length normalisation (constant divisor), beta 0 |
| dapo | DAPO (Yu et al. 2025) | clip-higher 0.2/0.28, token-level loss, beta 0, dynamic sampling with refill, soft overlong punishment over the last 20% of the length budget (their 4k of 20k) |
| gspo | GSPO (Zheng et al. 2025) | sequence-level (length-normalised) ratio, clip 3e-4/4e-4, beta 0, 4 optimizer steps per generation so the ratio is off-policy (TRL's GSPO recipe) |
| cispo | MiniMax-M1 (2025) | clipped, stop-gradient IS weight on every token (`loss_type: cispo`), eps_max 5.0 (ScaleRL's value, as TRL recommends), beta 0 |
| rloo | RLOO (Ahmadian et al. 2024) | TRL's RLOOTrainer: leave-one-out baseline, KL in the reward, beta 0.05 (TRL's default, the paper's range) |
| reinforce_pp | REINFORCE++ (Hu et al. 2025), its `-baseline` variant for verifiable rewards | group-mean baseline then batch-std normalisation (`scale_rewards: batch`), token-level loss, eps 0.2, beta 0 |
"""

from __future__ import annotations

import dataclasses
from typing import Any

from posttrain.errors import UserError

__all__ = ["OBJECTIVES", "Objective", "config_class", "objective", "trainer_class"]

GRPO_CONFIG, GRPO_TRAINER = "trl.GRPOConfig", "trl.GRPOTrainer"


@dataclasses.dataclass(frozen=True)
class Objective:
    """A preset: TRL fields, our stage fields, and which TRL config and trainer run it."""

    paper: str
    trainer: dict[str, Any]
    stage: dict[str, Any] = dataclasses.field(default_factory=dict)
    config: str = GRPO_CONFIG
    trainer_class: str = GRPO_TRAINER

    @property
    def dynamic_sampling_ok(self) -> bool:
        """Whether DAPO dynamic sampling can run with it (its trainer subclasses TRL's GRPO one)."""
        return self.trainer_class == GRPO_TRAINER


OBJECTIVES: dict[str, Objective] = {
    "grpo": Objective("DeepSeekMath (Shao et al. 2024)", dict(
        loss_type="grpo", scale_rewards="group", epsilon=0.2, beta=0.04,
        importance_sampling_level="token")),
    "dr_grpo": Objective("Dr. GRPO (Liu et al. 2025)", dict(
        loss_type="dr_grpo", scale_rewards="none", epsilon=0.2, beta=0.0,
        importance_sampling_level="token")),
    "dapo": Objective("DAPO (Yu et al. 2025)", dict(
        loss_type="dapo", scale_rewards="group", epsilon=0.2, epsilon_high=0.28, beta=0.0,
        importance_sampling_level="token"),
        stage=dict(dynamic_sampling="refill", overlong_shaping=True)),
    "gspo": Objective("GSPO (Zheng et al. 2025)", dict(
        loss_type="grpo", importance_sampling_level="sequence", scale_rewards="group",
        epsilon=3e-4, epsilon_high=4e-4, beta=0.0, steps_per_generation=4)),
    "cispo": Objective("MiniMax-M1 (2025); eps_max from ScaleRL (2025)", dict(
        loss_type="cispo", epsilon_high=5.0, beta=0.0, scale_rewards="group",
        importance_sampling_level="token")),
    "rloo": Objective("RLOO (Ahmadian et al. 2024)", dict(beta=0.05, normalize_advantages=False),
                      config="trl.RLOOConfig", trainer_class="trl.RLOOTrainer"),
    "reinforce_pp": Objective("REINFORCE++ (Hu et al. 2025), -baseline", dict(
        loss_type="dapo", scale_rewards="batch", epsilon=0.2, beta=0.0,
        importance_sampling_level="token")),
}


def import_path(path: str) -> Any:
    """The object a dotted path names (`trl.RLOOTrainer`), imported on demand."""
    module, _, attr = path.rpartition(".")
    return getattr(__import__(module, fromlist=[attr]), attr)


def trainer_class(name: str | None) -> type:
    """The TRL trainer class that runs objective `name` (None: plain GRPO), from the table."""
    preset = objective(name)
    return import_path(preset.trainer_class if preset else GRPO_TRAINER)


def config_class(name: str | None) -> str:
    """The TRL config class path objective `name` trains with (None: GRPO's)."""
    preset = objective(name)
    return preset.config if preset else GRPO_CONFIG


def objective(name: str | None) -> Objective | None:
    """The preset called `name` (None: no preset); UserError naming the known ones."""
    if name is None:
        return None
    if name not in OBJECTIVES:
        raise UserError(f"objective must be one of {', '.join(OBJECTIVES)}, got {name!r}")
    return OBJECTIVES[name]
