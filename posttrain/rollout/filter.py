"""Which sampled traces are good enough to train on: the rejection-sampling filter.

Shared by rejection sampling (R1's second SFT round) and distillation (the teacher's traces for
the students). A sample is kept only if it finished (no truncation), fits the length cap, is well
formed (`<think>…</think><answer>…</answer>`), has the right final answer (`posttrain.scoring`,
the same verifier as the RL rewards and the evals), has every reasoning step right where the
task can check its trace (all synthetic tasks can: right answers reached through a wrong step are
common — e.g. `9+5+0=15` inside a trace with the right sum), is not a repetition loop, and is not
a duplicate of a sample already kept for the same prompt. Each dropped sample is counted under
the first reason that rejects it, so the stats say how much each check removed.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from posttrain.answer_format import is_well_formed
from posttrain.rollout.types import Completion
from posttrain.scoring import score, think_text
from posttrain.tasks import TASKS
from posttrain.tasks.base import load_meta

DROP_REASONS = ("truncated", "too_long", "format", "wrong_answer", "wrong_steps", "repetitive",
                "duplicate", "over_quota")
LENGTH_BINS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


@dataclass
class FilterConfig:
    """Settings of the filter.

    Attributes:
        check_steps: Also verify each step of the `<think>` trace where the task can.
        answer_format: What well formed means (posttrain.answer_format): `tags`, or `boxed`
            for R1-style models (`</think>`, then a final `\\boxed{}`).
        max_tokens: Length cap on a kept completion (tokens, EOS included); null for none.
        max_per_prompt: Keep at most this many distinct samples per prompt (null: all), so easy
            prompts do not crowd out hard ones.
        repetition_ngram: Word n-gram size of the repetition check.
        repetition_min_ngrams: Texts with fewer n-grams than this are never called repetitive
            (short traces are judged by the checkers; this catches long loops).
        repetition_max_dup: Drop when more than this share of the n-grams are repeats.
    """

    check_steps: bool = True
    answer_format: str = "tags"
    max_tokens: int | None = None
    max_per_prompt: int | None = None
    repetition_ngram: int = 4
    repetition_min_ngrams: int = 16
    repetition_max_dup: float = 0.5


@dataclass
class FilterStats:
    """Counts the stage writes into the manifest."""

    n_prompts: int = 0
    n_samples: int = 0
    n_kept: int = 0
    right_answers: int = 0
    generated_tokens: int = 0
    drops: Counter = field(default_factory=Counter)
    kept_per_prompt: Counter = field(default_factory=Counter)
    kept_per_task: Counter = field(default_factory=Counter)
    kept_lengths: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        hist, lo = {}, 0
        for hi in (*LENGTH_BINS, float("inf")):
            label = f"{lo + 1}-{hi}" if hi != float("inf") else f">{lo}"
            count = sum(lo < n <= hi for n in self.kept_lengths)
            if count:
                hist[label] = count
            lo = hi
        return {
            "n_prompts": self.n_prompts, "n_samples": self.n_samples, "n_kept": self.n_kept,
            "generated_tokens": self.generated_tokens,
            "pass_rate": self.n_kept / max(1, self.n_samples),
            "answer_pass_rate": self.right_answers / max(1, self.n_samples),
            # Of the samples with the right answer, the share whose steps were wrong.
            "wrong_steps_given_right_answer": self.drops["wrong_steps"] / max(1, self.right_answers),
            "prompts_with_kept": self.n_prompts - self.kept_per_prompt.get(0, 0),
            "kept_per_prompt": {str(k): v for k, v in sorted(self.kept_per_prompt.items())},
            "kept_per_task": dict(self.kept_per_task),
            "drop_reasons": {r: self.drops[r] for r in DROP_REASONS},
            "mean_kept_tokens": sum(self.kept_lengths) / max(1, len(self.kept_lengths)),
            "kept_length_histogram": hist,
        }


def is_repetitive(text: str, n: int = 4, min_ngrams: int = 16, max_dup: float = 0.5) -> bool:
    """True when more than `max_dup` of the text's word n-grams repeat earlier ones (a loop)."""
    words = re.findall(r"[^\s|]+", text)
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if len(grams) < min_ngrams:
        return False
    return 1 - len(set(grams)) / len(grams) > max_dup


def rejection_reason(c: Completion, row: dict[str, Any], cfg: FilterConfig) -> str | None:
    """The first check sample `c` of prompt `row` fails (None: keep it), except dedup/quota.

    `row` holds `answer` (gold), and for synthetic tasks `task` and `meta`.
    """
    if c.finish_reason == "length":
        return "truncated"
    if cfg.max_tokens is not None and c.tokens > cfg.max_tokens:
        return "too_long"
    if not is_well_formed(c.text, cfg.answer_format):
        return "format"
    task, meta = row.get("task"), row.get("meta")
    if not score(c.text, row.get("answer"), task, meta):
        return "wrong_answer"
    if cfg.check_steps and task in TASKS and meta is not None:
        trace = think_text(c.text) or ""
        try:
            steps_ok = TASKS[task].check_trace(trace, load_meta(meta))
        except NotImplementedError:  # a task without a step checker: the answer decides
            steps_ok = True
        if not steps_ok:
            return "wrong_steps"
    if is_repetitive(c.text, cfg.repetition_ngram, cfg.repetition_min_ngrams,
                     cfg.repetition_max_dup):
        return "repetitive"
    return None


def filter_samples(rows: list[dict[str, Any]], completions: list[list[Completion]],
                   cfg: FilterConfig) -> tuple[list[dict[str, Any]], FilterStats]:
    """Kept samples (one record each) and the stats, for prompts `rows` and their samples.

    Each row needs `messages` (the chat prompt) and `answer`; `task`, `meta` where synthetic.
    A kept record is the row's prompt plus the sample as the assistant turn, ready for SFT.
    """
    stats = FilterStats(n_prompts=len(rows))
    kept: list[dict[str, Any]] = []
    for row, samples in zip(rows, completions):
        seen: set[str] = set()
        n_kept = 0
        for c in samples:
            stats.n_samples += 1
            stats.generated_tokens += c.tokens
            reason = rejection_reason(c, row, cfg)
            if reason in (None, "wrong_steps", "repetitive"):
                stats.right_answers += 1
            if reason is None:
                norm = " ".join(c.text.split())
                if norm in seen:
                    reason = "duplicate"
                elif cfg.max_per_prompt is not None and n_kept >= cfg.max_per_prompt:
                    reason = "over_quota"
                seen.add(norm)
            if reason is not None:
                stats.drops[reason] += 1
                continue
            n_kept += 1
            stats.kept_lengths.append(c.tokens)
            stats.kept_per_task[row.get("task") or "other"] += 1
            kept.append({
                "messages": [*row["messages"], *(c.messages or
                                                 [{"role": "assistant", "content": c.text.strip()}])],
                "answer": str(row.get("answer")), "task": row.get("task"),
                "meta": row.get("meta"), "tokens": c.tokens,
            })
        stats.kept_per_prompt[n_kept] += 1
    stats.n_kept = len(kept)
    return kept, stats
