"""Direct preference optimisation: sharpen a model toward correct, well-formed, concise answers
without a reward model (DeepSeek aligned its chat models with SFT + DPO).

Pairs come from the init model's own verifier-scored samples (see `posttrain.preference`: chosen
= correct and well formed, shortest first; rejected = wrong or malformed; prompts whose samples
all agree give no pair), or from any dataset with `prompt`/`chosen`/`rejected` columns. They are
written to `runs/<run>/<stage>/pairs.jsonl` with `pairs_stats.json`, then a thin `main()` runs
TRL's DPOTrainer with the init model, frozen, as the reference (its log-probs precomputed once by
default, so only one model sits in memory while training). TRL logs `rewards/margins` and
`rewards/accuracies` (the preference accuracy) to logs.jsonl; they are plotted to
`dpo_margins.png` and in the run report.

Run: `posttrain dpo recipes/tiny/dpo.yaml --run demo` (or `make dpo`).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar

from posttrain.errors import UserError
from posttrain.recipe import Recipe as BaseRecipe
from posttrain.recipe import TrainingFields, positive
from posttrain.stages.context import StageContext
from posttrain.stages.lora import LoraFields, lora_config
from posttrain.stages.sampling import PromptFields, SamplingFields, load_prompts
from posttrain.stages.training import load_trainable, run_training

# TRL 1.16's DPO losses (DPOTrainer rejects others only at the first step; we say so up front).
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
              "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")


@dataclasses.dataclass
class Recipe(TrainingFields, LoraFields, SamplingFields, PromptFields, BaseRecipe):
    """DPO recipe. Give exactly one of `prompt_data` (sample and score pairs) or `train_data`.

    Sampling uses the fields of `SamplingFields` (spread is what makes pairs: a capped sample is
    malformed, hence rejected); with `lora` (the fields of `LoraFields`), the reference is the
    base with adapters disabled.

    Attributes:
        train_data: Ready preference data: specs of datasets with `prompt`, `chosen`, `rejected`
            (text or chat messages).
        pairs_per_prompt: Most pairs kept per prompt (each rejected sample used once).
    """

    train_data: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    pairs_per_prompt: int = 1

    KIND: ClassVar[str] = "dpo"
    TRAINER_CONFIG: ClassVar[str] = "trl.DPOConfig"
    # No ref_model is passed: with precomputed log-probs TRL scores every pair once with the
    # untouched policy and keeps no second model in memory.
    TRAINER_DEFAULTS: ClassVar[dict[str, Any]] = dict(
        learning_rate=5e-5, beta=0.1, per_device_train_batch_size=16, lr_scheduler_type="cosine",
        warmup_steps=5, max_length=512, precompute_ref_log_probs=True,
        logging_steps=5)
    REQUIRED: ClassVar[tuple[str, ...]] = ("init_from",)

    def validate(self) -> None:
        super().validate()
        if bool(self.prompt_data) == bool(self.train_data):
            raise UserError("dpo: give exactly one of prompt_data (pairs from the model's own "
                            "scored samples) or train_data (a prompt/chosen/rejected dataset)")
        self.check_sampling()
        if self.prompt_data and self.samples_per_prompt < 2:
            raise UserError(f"samples_per_prompt must be >= 2 to form pairs, got "
                            f"{self.samples_per_prompt}")
        for loss in self.trainer.get("loss_type") or []:
            if loss not in LOSS_TYPES:
                raise UserError(f"loss_type: unknown DPO loss {loss!r}; TRL's: {', '.join(LOSS_TYPES)}")
        positive(self, "max_steps", "learning_rate", "per_device_train_batch_size", "beta",
                 "num_train_epochs", "pairs_per_prompt", "lora_r")


def preflight(recipe: Recipe, ctx: StageContext) -> None:
    """Specs, files and columns checked before anything is written."""
    from posttrain.data import check_spec, load_sources, require_columns
    from posttrain.models import shared_tokenizer

    field = "prompt_data" if recipe.prompt_data else "train_data"
    for i, spec in enumerate(recipe.prompt_data or recipe.train_data):
        check_spec(spec, f"{field}[{i}]")
    if recipe.train_data:
        require_columns(load_sources(recipe.train_data, recipe.seed, "train_data"),
                        ["prompt", "chosen", "rejected"], "train_data")
    else:
        load_prompts(recipe)
    shared_tokenizer(ctx.init_path, **recipe.tokenizer_options())  # a bad dir or template: fail before starting


def scored_samples(recipe: Recipe, ctx: StageContext) -> tuple[list[Any], list[list[Any]]]:
    """Prompts and the init model's verifier-scored samples for them."""
    from posttrain.answer_format import is_well_formed
    from posttrain.preference import Scored
    from posttrain.rollout import generate
    from posttrain.scoring import score

    rows = list(load_prompts(recipe))
    outs = generate(ctx.init_path, [r["prompt"] for r in rows], recipe.sampling(),
                    backend=recipe.rollout_backend, batch_size=recipe.rollout_batch_size,
                    shard=True, tokenizer_options=recipe.tokenizer_options())
    samples = []
    for row, comps in zip(rows, outs):
        gold = row.get("answer", row.get("solution"))
        samples.append([Scored(c.text, c.tokens, bool(score(c.text, gold, row.get("task"),
                                                            row.get("meta"))),
                               is_well_formed(c.text, recipe.answer_format) and c.finish_reason == "stop",
                               tuple(c.messages))
                        for c in comps])
    return [r["prompt"] for r in rows], samples


def preference_data(recipe: Recipe, ctx: StageContext):
    """The pairs to train on, written to pairs.jsonl (reused when resuming the same recipe)."""
    import datasets

    from posttrain import atomic
    from posttrain.dist import is_main_process
    from posttrain.preference import build_pairs, to_preference

    path, stats_path = ctx.stage_dir / "pairs.jsonl", ctx.stage_dir / "pairs_stats.json"
    reuse = ctx.resume and path.exists() and stats_path.exists()
    if reuse:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        stats = json.loads(stats_path.read_text())
    elif recipe.train_data:
        from posttrain.data import load_sources
        ds = to_preference(load_sources(recipe.train_data, recipe.seed, "train_data"),
                           recipe.system_prompt, recipe.answer_format)
        rows, stats = list(ds), {"pairs": len(ds), "source": "train_data"}
    else:
        prompts, samples = scored_samples(recipe, ctx)
        rows, stats = build_pairs(prompts, samples, recipe.pairs_per_prompt)
    if not reuse and is_main_process():
        atomic.write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
        atomic.write_json(stats_path, stats)
    print(f"[posttrain] dpo pairs: {json.dumps(stats)}")
    if not rows:
        raise UserError(f"dpo: no preference pairs ({stats.get('prompts_all_good', 0)} prompts "
                        f"all right, {stats.get('prompts_all_bad', 0)} all wrong); sample more "
                        f"(samples_per_prompt, temperature) or use other prompts")
    return datasets.Dataset.from_list(rows).select_columns(["prompt", "chosen", "rejected"]), stats


def main(recipe: Recipe, ctx: StageContext) -> dict[str, Any]:
    from trl import DPOTrainer

    from posttrain.models import load_tokenizer
    from posttrain.plots import plot_dpo_curves, read_log

    pairs, stats = preference_data(recipe, ctx)
    tokenizer = load_tokenizer(ctx.init_path, **recipe.tokenizer_options())

    def build(model, callbacks):
        try:
            return DPOTrainer(model=model, args=ctx.plan.args, train_dataset=pairs,
                              processing_class=tokenizer, peft_config=lora_config(recipe),
                              callbacks=callbacks)
        except (ValueError, KeyError) as e:
            raise UserError(f"dpo: cannot prepare the preference data: "
                            f"{str(e).splitlines()[0]}") from None

    # run_training lets go of the sampling engine (vLLM worker or cached HF model) first.
    _, out = run_training(recipe, ctx, load_trainable(ctx.init_path, recipe), tokenizer, build)
    plot_dpo_curves(ctx.log_path, ctx.stage_dir / "dpo_margins.png", title=f"{ctx.name}: DPO")
    logs = read_log(ctx.log_path)
    last = next((r for r in reversed(logs) if "rewards/margins" in r), {})
    return {"train_loss": out.training_loss, "pairs": stats.get("pairs", len(pairs)),
            "prompts_no_pair": stats.get("prompts_no_pair"),
            "final_reward_margin": last.get("rewards/margins"),
            "final_preference_accuracy": last.get("rewards/accuracies")}
