"""Supervised fine-tuning: the cold start on `<think>…</think>` CoT data (and later rounds on
rejection-sampled data).

A thin `main()` over TRL's SFTTrainer on chat `messages`. The loss is on the final assistant turn
for any chat template: conversations become TRL prompt/completion rows
(posttrain.stages.sft_data), so no `{% generation %}` markers are needed; full fine-tuning or LoRA
(peft); packing optional. Data: synthetic task specs (rendered with their CoT traces) or any
dataset with a `messages` column, from a local file or the hub.

Run: `posttrain sft recipes/tiny/sft.yaml --run demo` (or `make sft`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from posttrain.data import check_spec, load_sources, to_sft
from posttrain.errors import UserError
from posttrain.recipe import Recipe as BaseRecipe
from posttrain.recipe import TrainingFields, positive
from posttrain.stages.context import StageContext
from posttrain.stages.lora import LoraFields, lora_config
from posttrain.stages.sft_data import OverlongFields, fit_to_length, to_prompt_completion
from posttrain.stages.training import load_trainable, run_training


@dataclasses.dataclass
class Recipe(TrainingFields, OverlongFields, LoraFields, BaseRecipe):
    """SFT recipe: the LoRA fields of `LoraFields`, `overlong` (`OverlongFields`), and the data.

    The loss is on the final assistant turn, for any chat template (posttrain.stages.sft_data);
    `assistant_only_loss: true` trains on every assistant turn of templates with
    `{% generation %}` markers.

    Attributes:
        train_data: Dataset specs (task / path / hub); files need a `messages` column, or
            `prompt`/`trace`/`answer` task columns.
    """

    train_data: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    KIND: ClassVar[str] = "sft"
    TRAINER_CONFIG: ClassVar[str] = "trl.SFTConfig"
    TRAINER_DEFAULTS: ClassVar[dict[str, Any]] = dict(
        max_steps=300, learning_rate=1e-3, per_device_train_batch_size=16,
        lr_scheduler_type="cosine", warmup_steps=10, max_length=512)
    REQUIRED: ClassVar[tuple[str, ...]] = ("init_from", "train_data")

    def validate(self) -> None:
        super().validate()
        positive(self, "max_steps", "learning_rate", "per_device_train_batch_size",
                 "num_train_epochs", "lora_r")
        self.check_overlong()


def preflight(recipe: Recipe, ctx: StageContext) -> None:
    for i, spec in enumerate(recipe.train_data):
        check_spec(spec, f"train_data[{i}]")
    # Load the data once now (datasets caches it): a missing column or an empty file must stop
    # the stage before it is recorded as started.
    from posttrain.models import shared_tokenizer
    train_rows(recipe, ctx.plan.args)
    tokenizer = shared_tokenizer(ctx.init_path, **recipe.tokenizer_options())  # a bad dir or template: fail now
    if ctx.plan.args.assistant_only_loss and "{% generation %}" not in \
            (tokenizer.chat_template or "").replace("{%-", "{%").replace("-%}", "%}"):
        raise UserError(f"assistant_only_loss: true needs {{% generation %}} markers in the chat "
                        f"template, and {ctx.init_path}'s has none; drop assistant_only_loss "
                        f"(the loss is then on the final assistant turn, for any template)")


def train_rows(recipe: Recipe, args):
    """The training rows: chat `messages`, as prompt/completion unless `assistant_only_loss`."""
    rows = to_sft(load_sources(recipe.train_data, recipe.seed, "train_data"),
                  recipe.system_prompt, recipe.answer_format)
    return rows if args.assistant_only_loss else to_prompt_completion(rows)


def main(recipe: Recipe, ctx: StageContext) -> dict[str, Any]:
    from trl import SFTTrainer

    from posttrain.models import load_tokenizer

    tokenizer = load_tokenizer(ctx.init_path, **recipe.tokenizer_options())
    tokenizer.padding_side = "right"
    train, lengths = fit_to_length(train_rows(recipe, ctx.plan.args), tokenizer,
                                   ctx.plan.args.max_length, recipe.overlong)

    def build(model, callbacks):
        try:
            return SFTTrainer(model=model, args=ctx.plan.args, train_dataset=train,
                              processing_class=tokenizer, peft_config=lora_config(recipe),
                              callbacks=callbacks)
        except (ValueError, KeyError) as e:
            raise UserError(f"sft: cannot prepare the dataset: {str(e).splitlines()[0]}") from None

    _, out = run_training(recipe, ctx, load_trainable(ctx.init_path, recipe), tokenizer, build)
    return {"train_loss": out.training_loss, "train_samples": len(train), **lengths}
