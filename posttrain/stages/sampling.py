"""What the sampling stages share (rejection, distill, dpo; grpo's prompts): recipe fields declared
once, the verified-sampling step, and the atomic dataset write.

Like `stages/lora.py`, this sits below the stage modules so that no stage imports another: the
rejection stage and the teacher half of distillation run the same `sample_verified`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from posttrain import atomic
from posttrain.data import PromptColumns
from posttrain.errors import UserError
from posttrain.recipe import positive


@dataclasses.dataclass
class PromptFields(PromptColumns):
    """Recipe fields of a stage that reads prompts; mixed into its `Recipe`. The column fields
    are `posttrain.data.PromptColumns`'s, shared with the eval suites.

    Attributes:
        prompt_data: Dataset specs (task / path / hub) with a prompt column and an answer (or
            `solution`) column to verify against; synthetic tasks also bring `task` and `meta`.
    """

    prompt_data: list[dict[str, Any]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class SamplingFields:
    """Recipe fields of a stage that samples completions itself; mixed into its `Recipe`.

    Attributes:
        samples_per_prompt: Completions sampled per prompt.
        temperature: Sampling temperature (0: greedy, which gives one distinct sample).
        top_p: Nucleus sampling mass.
        max_new_tokens: Generation cap per sample; a capped sample counts as unfinished.
        rollout_backend: `auto` (vLLM on a GPU where it can run the model), `hf` or `vllm`.
        rollout_batch_size: Sequences per HF generation batch.
        tools: Tools the model may call while it samples (`[python]`, posttrain.tools): the
            tool-using policy sampled as GRPO trains it; kept samples keep their tool turns.
        max_tool_calls: Tool calls per sample.
    """

    samples_per_prompt: int = 8
    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 128
    rollout_backend: str = "auto"
    rollout_batch_size: int = 64
    tools: list[str] = dataclasses.field(default_factory=list)
    max_tool_calls: int = 4

    def check_sampling(self) -> None:
        """UserError for sampling values no backend can run."""
        from posttrain.rollout import BACKENDS
        if self.rollout_backend not in BACKENDS:
            raise UserError(f"rollout_backend must be one of {', '.join(BACKENDS)}, got "
                            f"{self.rollout_backend!r}")
        if self.temperature < 0:
            raise UserError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        positive(self, "samples_per_prompt", "max_new_tokens", "rollout_batch_size",
                 "max_tool_calls")
        from posttrain.tools import check_tools
        check_tools(self.tools)

    def sampling(self):
        """The rollout `Sampling` these fields describe (seeded by the recipe's seed)."""
        from posttrain.rollout import Sampling
        return Sampling(n=self.samples_per_prompt, temperature=self.temperature, top_p=self.top_p,
                        max_new_tokens=self.max_new_tokens, seed=self.seed,
                        tools=tuple(self.tools), max_tool_calls=self.max_tool_calls)


@dataclasses.dataclass
class FilterFields:
    """Which samples a verified-sampling stage keeps (rejection, and distill's teacher half).

    Attributes:
        max_tokens: Length cap on a kept sample (tokens); null: only `max_new_tokens` applies.
        max_per_prompt: Most distinct samples kept per prompt (null: all).
        check_steps: Check each reasoning step where the task can (not only the final answer).
    """

    max_tokens: int | None = None
    max_per_prompt: int | None = 4
    check_steps: bool = True

    def check_filter(self) -> None:
        """UserError for a length cap or quota of 0 or less."""
        positive(self, "max_tokens", "max_per_prompt")

    def filter_config(self):
        from posttrain.rollout.filter import FilterConfig
        return FilterConfig(check_steps=self.check_steps, answer_format=self.answer_format,
                            max_tokens=self.max_tokens, max_per_prompt=self.max_per_prompt)


def load_prompts(recipe) -> Any:
    """The recipe's prompt set as chat prompts with their gold columns."""
    from posttrain.data import load_prompt_rows
    return load_prompt_rows(recipe.prompt_data, recipe, recipe.system_prompt, recipe.seed,
                            recipe.answer_format)


def check_prompts(recipe) -> None:
    """Specs, files and the columns sampling needs, checked before anything is written."""
    from posttrain.data import check_spec
    for i, spec in enumerate(recipe.prompt_data):
        check_spec(spec, f"prompt_data[{i}]")
    load_prompts(recipe)


def sample_verified(model_ref: str, recipe) -> tuple[list[dict[str, Any]], Any]:
    """Sample the recipe's prompts from `model_ref` and keep the verified samples
    (`recipe.filter_config()` says which checks a sample must pass)."""
    from posttrain.rollout import generate
    from posttrain.rollout.filter import filter_samples

    ds = load_prompts(recipe)
    rows = [{"messages": r["prompt"], "answer": r.get("answer", r.get("solution")),
             "task": r.get("task"), "meta": r.get("meta")} for r in ds]
    # Under `accelerate launch` each process samples its share; all get every sample back.
    outs = generate(model_ref, [r["messages"] for r in rows], recipe.sampling(),
                    backend=recipe.rollout_backend, batch_size=recipe.rollout_batch_size,
                    shard=True, tokenizer_options=recipe.tokenizer_options())
    return filter_samples(rows, outs, recipe.filter_config())


def write_dataset(out_dir: Path, kept: list[dict[str, Any]], stats: dict[str, Any],
                  plan=None) -> Path:
    """`train.jsonl`, an HF `datasets` copy (`hf/`), `stats.json` (and the plan), swapped in whole.

    Written to a temp dir first and renamed into place, so a reader (or a resumed run) sees the
    old dataset or the new one, never a mix. Only the main process writes (the others return).
    """
    import datasets

    from posttrain.dist import is_main_process

    if not kept:
        raise UserError("no sample passed the filter: nothing to train on; check the model's "
                        "eval figures, or raise samples_per_prompt / temperature / max_new_tokens")
    if not is_main_process():
        return out_dir
    tmp = atomic.fresh_dir(out_dir)
    with (tmp / "train.jsonl").open("w") as f:
        for row in kept:
            f.write(json.dumps(row) + "\n")
    datasets.Dataset.from_list(kept).save_to_disk(str(tmp / "hf"))
    (tmp / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    if plan is not None:
        plan.write(tmp)
    return atomic.replace_dir(tmp, out_dir)


def print_stats(stats: dict[str, Any], what: str) -> None:
    drops = ", ".join(f"{k} {v}" for k, v in stats["drop_reasons"].items() if v)
    print(f"[posttrain] {what}: kept {stats['n_kept']} of {stats['n_samples']} samples "
          f"({stats['pass_rate']:.1%}; right answer {stats['answer_pass_rate']:.1%}), "
          f"{stats['prompts_with_kept']}/{stats['n_prompts']} prompts kept something; "
          f"dropped: {drops or 'none'}", file=sys.stderr)
