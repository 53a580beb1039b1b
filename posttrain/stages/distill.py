"""Distillation: a strong teacher's reasoning, learned by a small dense student.

R1's recipe in small: the teacher (by default the last RL/DPO stage of the run) samples
`samples_per_prompt` traces per prompt of the distillation prompt set; only verified ones are kept
(the rejection-sampling filter of `posttrain.rollout.filter`: right answer, right steps, well
formed, no loops, no duplicates). `method:` says how the student learns from the teacher
(`posttrain.stages.distill_methods`): `traces` (R1's: SFT on the verified traces, loss on the
completion only), `logits` (match the teacher's token distributions on those traces) or
`on_policy` (the student samples, the teacher scores every token it wrote). The student sees no
reference traces: the teacher is its only source of reasoning.

The student is either a fresh tiny model built with the teacher's tokenizer (`student:
tiny:qwen2`, `tiny:llama`; `student_config` overrides the tiny config) or a pretrained model
(`init_from:` a stage, a model dir or a hub id, e.g. Qwen/Qwen2.5-1.5B). The teacher's data is
written to `teacher_data/` (JSONL + HF `datasets` + stats) and cached by the rollout engine, so the
Qwen and Llama students of one teacher sample it once. The stage records its `budget`
(`posttrain.budget`): optimizer steps, completions, teacher forward passes, tokens, wall time.

Run: `posttrain distill recipes/tiny/distill_qwen.yaml --run demo` (or
`make distill RECIPE=recipes/tiny/distill_llama.yaml`).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any, ClassVar

from posttrain.errors import UserError
from posttrain.recipe import Recipe as BaseRecipe
from posttrain.recipe import TrainingFields, positive
from posttrain.stages import distill_methods as methods
from posttrain.stages.context import StageContext
from posttrain.stages.lora import LoraFields, lora_config
from posttrain.stages.sampling import (
    FilterFields,
    PromptFields,
    SamplingFields,
    check_prompts,
    load_prompts,
    print_stats,
    sample_verified,
    write_dataset,
)
from posttrain.stages.sft_data import OverlongFields, fit_to_length, to_prompt_completion
from posttrain.stages.training import load_trainable, run_training
from posttrain.stages.vllm_sync import colocated_engine, use_reload_sync

TEACHER_KINDS = ("grpo", "dpo")


@dataclasses.dataclass
class Recipe(TrainingFields, LoraFields, OverlongFields, FilterFields, SamplingFields, PromptFields,
             BaseRecipe):
    """Distillation recipe: the prompt, sampling and filter fields of rejection sampling, the
    teacher, the student, LoRA for a pretrained student (`LoraFields`), and the TRL config
    fields of the method's trainer.

    Attributes:
        teacher: A stage of the run, a model dir or a hub id; null: the run's last finished
            grpo/dpo stage.
        student: `tiny:<arch>` (qwen2, llama) for a fresh tiny student with the teacher's
            tokenizer; leave null and set `init_from` for a pretrained student.
        student_config: Overrides of the tiny student's config (hidden_size, layers, heads...).
        method: `traces` (SFT on the verified traces), `logits` (the teacher's token
            distributions on those traces) or `on_policy` (the teacher scores the student's own
            samples); the logit methods need one tokenizer for teacher and student.
        beta: The divergence of `logits`/`on_policy`, TRL's generalized JSD: 0 forward KL, 0.5
            JSD, 1 reverse KL; null: 0 for logits, 1 for on_policy.
        lmbda: `on_policy` only: the share of steps trained on the student's samples; the rest
            train on the teacher's traces (GKD's mixing). 1: purely on-policy.
        kd_temperature: Softmax temperature of both distributions in the divergence (and, for
            `on_policy`, the student's sampling temperature: TRL uses one value for both).
    """

    teacher: str | None = None
    student: str | None = None
    student_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    method: str = "traces"
    beta: float | None = None
    lmbda: float = 1.0
    kd_temperature: float = 1.0

    KIND: ClassVar[str] = "distill"
    TRAINER_CONFIG: ClassVar[str | None] = methods.SFT
    OTHER_TRAINER_CONFIGS: ClassVar[tuple[str, ...]] = (methods.GKD, methods.ON_POLICY)
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
        if self.lora and self.student:
            raise UserError("distill: lora adapts a pretrained student (init_from); a fresh tiny "
                            "student trains all its weights")
        if self.student:
            from posttrain.models import TINY_CONFIGS
            kind, _, arch = self.student.partition(":")
            if kind != "tiny" or arch not in TINY_CONFIGS:
                raise UserError(f"student must be tiny:<arch> with arch one of "
                                f"{', '.join(TINY_CONFIGS)}, got {self.student!r}")
        positive(self, "learning_rate", "per_device_train_batch_size", "num_train_epochs",
                 "kd_temperature")
        steps = self.trainer.get("max_steps")
        if steps is not None and steps != -1 and steps <= 0:
            raise UserError(f"max_steps must be > 0 (or -1: train num_train_epochs), got {steps}")
        self.check_method()

    def check_method(self) -> None:
        """One-line errors for a method's settings (TRL keys its trainer does not take are
        refused by `TrainingFields.validate`)."""
        if self.method not in methods.METHODS:
            raise UserError(f"distill: method must be one of {', '.join(methods.METHODS)}, got "
                            f"{self.method!r}")
        for name in ("beta", "lmbda"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise UserError(f"distill: {name} must be in [0, 1], got {value}")
        if self.method == "traces" and self.beta is not None:
            raise UserError("distill: beta (the divergence) is for method logits/on_policy; "
                            "traces trains by plain SFT")
        if self.method != "on_policy" and self.lmbda != 1.0:
            raise UserError("distill: lmbda (the on-policy share) is for method on_policy")

    def trainer_config(self) -> str:
        return methods.config_path(self.method, self.lmbda)

    def preset_settings(self) -> dict[str, Any]:
        """The method's TRL settings: divergence, on-policy share, temperature, generation cap."""
        return methods.method_settings(self.method, beta=self.beta, lmbda=self.lmbda,
                                       temperature=self.kd_temperature,
                                       max_new_tokens=self.max_new_tokens)

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
    from posttrain.models import shared_tokenizer
    check_prompts(recipe)
    teacher_tok = shared_tokenizer(ctx.plan.ref_path("teacher"), **recipe.tokenizer_options())
    if ctx.init_path:
        student_tok = shared_tokenizer(ctx.init_path, **recipe.tokenizer_options())
        if recipe.method != "traces":  # a tiny student is built on the teacher's tokenizer
            methods.check_shared_vocabulary(
                teacher_tok, student_tok, vocab_width(ctx.plan.ref_path("teacher")),
                vocab_width(ctx.init_path), ctx.plan.refs["teacher"]["from"],
                ctx.plan.refs["init"]["from"])


def vocab_width(path: str) -> int:
    """Rows of a model's output layer, from its config (no weights loaded)."""
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(path).get_text_config().vocab_size
    except (OSError, ValueError) as e:
        raise UserError(f"distill: cannot read the model config of {path}: {e}") from None


def build_student(recipe: Recipe, ctx: StageContext):
    """(model, tokenizer): a fresh tiny student with the teacher's tokenizer, or `init_from`."""
    from posttrain.models import build_tiny_model, count_params, load_tokenizer
    if recipe.student:
        tokenizer = load_tokenizer(ctx.plan.ref_path("teacher"), **recipe.tokenizer_options())
        model = build_tiny_model(recipe.student.partition(":")[2], tokenizer, seed=recipe.seed,
                                 **recipe.student_config)
    else:
        tokenizer = load_tokenizer(ctx.init_path, **recipe.tokenizer_options())
        model = load_trainable(ctx.init_path, recipe)
    print(f"[posttrain] student {recipe.student or ctx.init_path}: "
          f"{count_params(model) / 1e6:.2f}M params", file=sys.stderr)
    return model, tokenizer


def teacher_traces(recipe: Recipe, ctx: StageContext) -> tuple[list[dict[str, Any]], dict, float]:
    """The teacher's verified traces (written to teacher_data/), their stats, seconds taken."""
    from posttrain.rollout import release_engines

    start = time.monotonic()
    kept, stats = sample_verified(ctx.plan.refs["teacher"]["path"], recipe)
    figures = stats.as_dict()
    print_stats(figures, f"teacher {ctx.plan.refs['teacher']['from']}")
    write_dataset(ctx.stage_dir / "teacher_data", kept, figures, ctx.plan)
    release_engines()  # the teacher's generation models leave memory (and the GPU) before training
    return kept, figures, time.monotonic() - start


def build_trainer(recipe: Recipe, ctx: StageContext, model, tokenizer, kept: list[dict[str, Any]],
                  callbacks: list):
    """The method's TRL trainer over its data: the traces (SFT, GKD) or the prompts (on-policy),
    with the number of training rows and their length figures."""
    import datasets

    cls = methods.trainer_class(recipe.method, recipe.lmbda)
    common = dict(args=ctx.plan.args, processing_class=tokenizer, callbacks=callbacks,
                  peft_config=lora_config(recipe))
    if recipe.method == "traces":
        tokenizer.padding_side = "right"
        # Loss on the teacher's completion only: no generation markers needed in the template.
        train = to_prompt_completion(datasets.Dataset.from_list(kept).select_columns(["messages"]))
        train, lengths = fit_to_length(train, tokenizer, ctx.plan.args.max_length, recipe.overlong)
        return cls(model=model, train_dataset=train, **common), len(train), lengths
    from posttrain.models import load_model
    teacher = load_model(ctx.plan.refs["teacher"]["path"])
    methods.pad_to_teacher(model, teacher.get_output_embeddings().weight.shape[0])
    tokenizer.padding_side = "left"
    if methods.samples_teacher(recipe.method, recipe.lmbda):  # GKD: messages, prompt = all but the last
        train = datasets.Dataset.from_list(kept).select_columns(["messages"])
    else:
        train = load_prompts(recipe).select_columns(["prompt"])
    return cls(model=model, teacher_model=teacher, train_dataset=train, **common), len(train), {}


def main(recipe: Recipe, ctx: StageContext) -> dict[str, Any]:
    from posttrain.budget import trainer_budget
    from posttrain.models import count_params

    teacher = ctx.plan.refs["teacher"]
    kept, figures, teacher_s = [], None, 0.0
    if methods.samples_teacher(recipe.method, recipe.lmbda):
        kept, figures, teacher_s = teacher_traces(recipe, ctx)

    model, tokenizer = build_student(recipe, ctx)
    built: dict[str, Any] = {}

    def build(model, callbacks):
        with colocated_engine(model, getattr(ctx.plan.args, "use_vllm", False)):
            trainer, built["rows"], built["lengths"] = build_trainer(recipe, ctx, model,
                                                                     tokenizer, kept, callbacks)
        use_reload_sync(trainer)  # on-policy with vLLM: new weights through vLLM's reload path
        return trainer

    trainer, out = run_training(recipe, ctx, model, tokenizer, build)
    budget = trainer_budget(trainer, out, ctx.log_path,
                            teacher_samples=(figures or {}).get("n_samples", 0),
                            teacher_tokens=(figures or {}).get("generated_tokens", 0),
                            teacher_scores=recipe.method != "traces", teacher_s=teacher_s)
    return {"teacher": teacher["from"], "method": recipe.method, "train_loss": out.training_loss,
            "student_params": count_params(trainer.model), "train_samples": built["rows"],
            "budget": budget, **({"teacher_data": figures} if figures else {}),
            **built["lengths"]}
