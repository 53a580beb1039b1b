"""Rejection sampling: the verified samples of a model, as an SFT dataset (R1's second SFT round).

Samples `samples_per_prompt` completions per prompt from the `init_from` model (e.g. `grpo`) and
keeps only those that pass every check of `posttrain.rollout.filter` — finished, within the
length cap, well formed, right answer, every step right where the task can check its trace, not
a loop, not a duplicate. The stage's output is data, not a model: `runs/<run>/<stage>/data/`
holds `train.jsonl` (chat `messages`, plus answer/task/meta), the same rows as an HF `datasets`
dir (`hf/`, `load_from_disk`) and `stats.json`; the manifest's `output_dir` points there, and its
metrics hold the stats (kept per prompt, pass rate, drop reasons, length histogram). A following
`sft` recipe trains on it with `train_data: [{stage: rejection}]` (recipes/tiny/sft_rs.yaml).

Run: `posttrain rejection recipes/tiny/rejection.yaml --run demo` (or `make rejection`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from posttrain.recipe import Recipe as BaseRecipe
from posttrain.stages.context import StageContext
from posttrain.stages.sampling import (
    FilterFields,
    PromptFields,
    SamplingFields,
    check_prompts,
    print_stats,
    sample_verified,
    write_dataset,
)


@dataclasses.dataclass
class Recipe(FilterFields, SamplingFields, PromptFields, BaseRecipe):
    """Rejection-sampling recipe: prompts, sampling and filter fields; its output is a dataset."""

    eval_suite: str | None = None  # a data stage has no model to evaluate

    KIND: ClassVar[str] = "rejection"
    REQUIRED: ClassVar[tuple[str, ...]] = ("init_from", "prompt_data")
    OUTPUT: ClassVar[str] = "dataset"
    OUTPUT_DIR: ClassVar[str] = "data"

    def validate(self) -> None:
        super().validate()
        self.check_sampling()
        self.check_filter()


def preflight(recipe: Recipe, ctx: StageContext) -> None:
    from posttrain.models import shared_tokenizer
    check_prompts(recipe)
    shared_tokenizer(ctx.init_path, **recipe.tokenizer_options())  # a bad dir or template: fail before starting


def main(recipe: Recipe, ctx: StageContext) -> dict[str, Any]:
    kept, stats = sample_verified(ctx.init_path, recipe)
    figures = stats.as_dict()
    print_stats(figures, "rejection sampling")
    write_dataset(ctx.output_dir, kept, figures, ctx.plan)
    return figures
