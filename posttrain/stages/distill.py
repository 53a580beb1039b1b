"""Distillation: a strong teacher's verified reasoning traces, learned by a small dense student.

R1's recipe in small: the teacher (by default the last RL/DPO stage of the run) samples
`samples_per_prompt` traces per prompt of the distillation prompt set; only verified ones are kept
(the rejection-sampling filter of `posttrain.rollout.filter`: right answer, right steps, well
formed, no loops, no duplicates); the student is trained on them by plain SFT (TRL SFTTrainer, loss
on the completion only). The student sees no reference traces: the teacher's verified traces are
its only reasoning data.

The student is either a fresh tiny model built with the teacher's tokenizer (`student:
tiny:qwen2`, `tiny:llama`; `student_config` overrides the tiny config) or a pretrained model
(`init_from:` a stage, a model dir or a hub id, e.g. Qwen/Qwen2.5-1.5B). The teacher's data is
written to `teacher_data/` (JSONL + HF `datasets` + stats) and cached by the rollout engine, so the
Qwen and Llama students of one teacher sample it once.

Run: `posttrain distill recipes/tiny/distill_qwen.yaml --run demo` (or
`make distill RECIPE=recipes/tiny/distill_llama.yaml`).
"""

from __future__ import annotations

import dataclasses
import sys
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
from posttrain.stages.sampling import (
    FilterFields,
    PromptFields,
    SamplingFields,
    check_prompts,
    print_stats,
    sample_verified,
    write_dataset,
)
from posttrain.stages.sft_data import OverlongFields, fit_to_length, to_prompt_completion

TEACHER_KINDS = ("grpo", "dpo")


@dataclasses.dataclass
class Recipe(OverlongFields, FilterFields, SamplingFields, PromptFields, BaseRecipe):
    """Distillation recipe: the prompt, sampling and filter fields of rejection sampling, the
    teacher, the student, and TRL SFTConfig fields for the student's training.

    Attributes:
        teacher: A stage of the run, a model dir or a hub id; null: the run's last finished
            grpo/dpo stage.
        student: `tiny:<arch>` (qwen2, llama) for a fresh tiny student with the teacher's
            tokenizer; leave null and set `init_from` for a pretrained student.
        student_config: Overrides of the tiny student's config (hidden_size, layers, heads...).
    """

    teacher: str | None = None
    student: str | None = None
    student_config: dict[str, Any] = dataclasses.field(default_factory=dict)

    KIND: ClassVar[str] = "distill"
    TRAINER_CONFIG: ClassVar[str | None] = "trl.SFTConfig"
    TRAINER_DEFAULTS: ClassVar[dict[str, Any]] = dict(
        max_steps=400, learning_rate=2e-3, per_device_train_batch_size=32,
        lr_scheduler_type="cosine", warmup_steps=20, max_length=512, save_steps=200)
    REQUIRED: ClassVar[tuple[str, ...]] = ("prompt_data",)

    def validate(self) -> None:
        super().validate()
        self.check_sampling()
        self.check_overlong()
        self.check_filter()
        if bool(self.student) == bool(self.init_from):
            raise UserError("distill: give exactly one of student (tiny:qwen2, tiny:llama: a "
                            "fresh tiny student) or init_from (a pretrained student)")
        if self.student:
            from posttrain.models import TINY_CONFIGS
            kind, _, arch = self.student.partition(":")
            if kind != "tiny" or arch not in TINY_CONFIGS:
                raise UserError(f"student must be tiny:<arch> with arch one of "
                                f"{', '.join(TINY_CONFIGS)}, got {self.student!r}")
        positive(self, "learning_rate", "per_device_train_batch_size", "num_train_epochs")
        steps = self.trainer.get("max_steps")
        if steps is not None and steps != -1 and steps <= 0:
            raise UserError(f"max_steps must be > 0 (or -1: train num_train_epochs), got {steps}")

    def references(self, manifest) -> dict[str, str | None]:
        """The student's init and the teacher; no teacher named: the run's last grpo/dpo stage."""
        teacher = self.teacher
        if not teacher:
            done = [n for n, e in manifest.stages.items()
                    if e.get("kind") in TEACHER_KINDS and e.get("status") == "done"]
            if not done:
                raise UserError(f"distill: no finished {'/'.join(TEACHER_KINDS)} stage in run "
                                f"{manifest.run!r} to be the teacher; run one or set teacher:")
            teacher = done[-1]
        return {**super().references(manifest), "teacher": teacher}


def preflight(recipe: Recipe, ctx: StageContext) -> None:
    from posttrain.models import load_tokenizer
    check_prompts(recipe)
    load_tokenizer(ctx.plan.ref_path("teacher"))
    if ctx.init_path:
        load_tokenizer(ctx.init_path)


def build_student(recipe: Recipe, ctx: StageContext):
    """(model, tokenizer): a fresh tiny student with the teacher's tokenizer, or `init_from`."""
    from posttrain.models import build_tiny_model, count_params, load_model, load_tokenizer
    if recipe.student:
        tokenizer = load_tokenizer(ctx.plan.ref_path("teacher"))
        model = build_tiny_model(recipe.student.partition(":")[2], tokenizer, seed=recipe.seed,
                                 **recipe.student_config)
    else:
        tokenizer, model = load_tokenizer(ctx.init_path), load_model(ctx.init_path)
    print(f"[posttrain] student {recipe.student or ctx.init_path}: "
          f"{count_params(model) / 1e6:.2f}M params", file=sys.stderr)
    return model, tokenizer


def main(recipe: Recipe, ctx: StageContext) -> dict[str, Any]:
    import datasets
    from trl import SFTTrainer

    from posttrain.models import count_params
    from posttrain.rollout import release_engines

    teacher = ctx.plan.refs["teacher"]
    kept, stats = sample_verified(teacher["path"], recipe)
    figures = stats.as_dict()
    print_stats(figures, f"teacher {teacher['from']}")
    write_dataset(ctx.stage_dir / "teacher_data", kept, figures, ctx.plan)
    release_engines()  # the teacher's generation models leave memory (and the GPU) before training

    model, tokenizer = build_student(recipe, ctx)
    model = prepare_model(model, recipe)
    tokenizer.padding_side = "right"
    # Loss on the teacher's completion only: no generation markers needed in the student's template.
    train = to_prompt_completion(datasets.Dataset.from_list(kept).select_columns(["messages"]))
    train, lengths = fit_to_length(train, tokenizer, ctx.plan.args.max_length, recipe.overlong)
    trainer = SFTTrainer(model=model, args=ctx.plan.args, train_dataset=train,
                         processing_class=tokenizer, callbacks=stage_callbacks(recipe, ctx))
    out = trainer.train(resume_from_checkpoint=last_checkpoint(ctx))
    tokenizer.padding_side = "left"
    save_final(trainer.model, tokenizer, ctx)
    return {"teacher": teacher["from"], "train_loss": out.training_loss,
            "student_params": count_params(trainer.model), "train_samples": len(train),
            "teacher_data": figures, **lengths}
