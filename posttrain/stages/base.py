"""Base stage (demo fixture): build the tokenizer and a tiny DeepSeek-V3-style MoE, then give it
weak competence with a short causal-LM pass over task text.

The text is mostly "problem answer" lines (so the base gets some easy problems right) and now and
then a full chat-formatted `<think>…</think><answer>…</answer>` sample (so R1-Zero RL from this
base finds some reward). It stands in for a pretrained base model; real recipes start from a hub
model instead and skip this stage.

Run: `posttrain base recipes/tiny/base.yaml --run demo` (or `make base`).
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any, ClassVar

from posttrain.answer_format import completion
from posttrain.data import prompt_messages, task_rows
from posttrain.errors import UserError
from posttrain.models import TINY_CONFIGS, build_tiny_model, count_params, train_tokenizer
from posttrain.recipe import Recipe as BaseRecipe
from posttrain.recipe import TrainingFields, positive
from posttrain.stages.context import StageContext
from posttrain.stages.training import run_training


@dataclasses.dataclass
class Recipe(TrainingFields, BaseRecipe):
    """Base-model recipe.

    Attributes:
        arch: Tiny architecture to build (deepseek_v3, qwen2, llama).
        model_config: Overrides of the tiny config (hidden_size, n_routed_experts, ...).
        vocab_size: BPE vocabulary size of the locally trained tokenizer.
        pretrain_data: Task specs whose text the LM pass reads.
        tagged_fraction: Share of samples rendered in the chat + tag format.
        chat_fraction: Share of samples rendered as a chat whose assistant turn is the bare
            answer: the base then answers chat prompts plainly and uses the tags only now and
            then (R1-Zero's starting point: format rate near 0, yet some reward to find).
        worked_fraction: Share of the plain lines that show the worked steps before the answer
            ("problem steps answer", like worked solutions in pretraining text): the skill is
            latent in the base, for the cold start and RL to bring out in the tagged format.
    """

    arch: str = "deepseek_v3"
    model_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    vocab_size: int = 384
    pretrain_data: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    tagged_fraction: float = 0.1
    chat_fraction: float = 0.0
    worked_fraction: float = 0.0

    KIND: ClassVar[str] = "base"
    TRAINER_CONFIG: ClassVar[str] = "trl.SFTConfig"
    TRAINER_DEFAULTS: ClassVar[dict[str, Any]] = dict(
        max_steps=300, learning_rate=3e-3, per_device_train_batch_size=32,
        lr_scheduler_type="cosine", warmup_steps=20, max_length=256, dataset_text_field="text",
        packing=False)
    REQUIRED: ClassVar[tuple[str, ...]] = ("pretrain_data",)

    def validate(self) -> None:
        super().validate()
        if self.arch not in TINY_CONFIGS:
            raise UserError(f"arch must be one of {', '.join(TINY_CONFIGS)}, got {self.arch!r}")
        if not 0 <= self.tagged_fraction <= 1:
            raise UserError(f"tagged_fraction must be in [0, 1], got {self.tagged_fraction}")
        if not 0 <= self.chat_fraction <= 1 - self.tagged_fraction:
            raise UserError(f"chat_fraction must be in [0, 1 - tagged_fraction], got "
                            f"{self.chat_fraction}")
        if not 0 <= self.worked_fraction <= 1:
            raise UserError(f"worked_fraction must be in [0, 1], got {self.worked_fraction}")
        positive(self, "vocab_size", "max_steps", "learning_rate", "per_device_train_batch_size")


def preflight(recipe: Recipe, ctx: StageContext) -> None:
    from posttrain.data import check_spec
    for i, spec in enumerate(recipe.pretrain_data):
        check_spec(spec, f"pretrain_data[{i}]")


def pretrain_texts(recipe: Recipe, tokenizer=None) -> list[str]:
    """Plain "problem answer" lines, with a `tagged_fraction` of chat-formatted CoT samples."""
    rng = random.Random(recipe.seed)
    texts = []
    for spec in recipe.pretrain_data:
        for row in task_rows(spec, recipe.seed):
            draw = rng.random()
            if tokenizer is not None and draw < recipe.tagged_fraction + recipe.chat_fraction:
                tagged = draw < recipe.tagged_fraction
                reply = completion(row["trace"], row["answer"]) if tagged else row["answer"]
                msgs = prompt_messages(row["prompt"], recipe.system_prompt) + [
                    {"role": "assistant", "content": reply}]
                texts.append(tokenizer.apply_chat_template(msgs, tokenize=False))
            elif rng.random() < recipe.worked_fraction:
                texts.append(f"{row['prompt']} {row['trace']} {row['answer']}")
            else:
                texts.append(f"{row['prompt']} {row['answer']}")
    rng.shuffle(texts)
    return texts


def main(recipe: Recipe, ctx: StageContext) -> dict[str, Any]:
    import datasets
    from trl import SFTTrainer

    tok_dir = ctx.stage_dir / "tokenizer"
    corpus = pretrain_texts(recipe) + [completion("", "")] * 10
    if recipe.system_prompt:
        corpus += [recipe.system_prompt] * 50
    tokenizer = train_tokenizer(corpus, tok_dir, vocab_size=recipe.vocab_size)
    model = build_tiny_model(recipe.arch, tokenizer, seed=recipe.seed, **recipe.model_config)
    params = count_params(model)
    print(f"[posttrain] built {recipe.arch} with {params / 1e6:.2f}M params, "
          f"vocab {len(tokenizer)}")
    texts = pretrain_texts(recipe, tokenizer)
    train = datasets.Dataset.from_dict({"text": [t + tokenizer.eos_token if not t.endswith(
        tokenizer.eos_token) else t for t in texts]})
    _, out = run_training(recipe, ctx, model, tokenizer, lambda model, callbacks: SFTTrainer(
        model=model, args=ctx.plan.args, train_dataset=train, processing_class=tokenizer,
        callbacks=callbacks))
    return {"train_loss": out.training_loss, "params": params, "train_samples": len(train)}
