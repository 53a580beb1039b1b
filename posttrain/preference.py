"""Preference pairs for DPO: from verifier-scored samples, or from a prompt/chosen/rejected dataset.

Pairs are built per prompt from the model's own samples (on-policy, as DeepSeek aligned its chat
models): chosen = verified correct *and* well formed, the shortest such sample first (so DPO also
prefers concise answers); rejected = wrong or malformed. A prompt whose samples all land on the
same side carries no preference and gives no pair — it is counted, not hidden.

Everything here is pure data work (no model), so the rules are table-tested directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from posttrain.data import prompt_messages, require_columns
from posttrain.errors import UserError


@dataclass(frozen=True)
class Scored:
    """One sample with the verdicts that decide its side of a pair; `turns`: its messages when
    it called tools (the assistant turns and the tool results), else one assistant turn."""

    text: str
    tokens: int
    correct: bool
    well_formed: bool
    turns: tuple = ()

    @property
    def good(self) -> bool:
        return self.correct and self.well_formed

    def messages(self) -> list[dict[str, Any]]:
        return list(self.turns) or [{"role": "assistant", "content": self.text}]


def pairs_for_prompt(samples: list[Scored], max_pairs: int = 1) -> list[tuple[Scored, Scored]]:
    """Up to `max_pairs` (chosen, rejected) pairs from one prompt's samples.

    Chosen samples are taken shortest first; rejected samples are distinct texts, malformed ones
    first (a wrong answer in good form is a smaller mistake than a broken format), then longest
    first. Each rejected text is used once; chosen ones are reused round-robin when there are more
    rejected than chosen.
    """
    good = sorted({s.text: s for s in samples if s.good}.values(), key=lambda s: s.tokens)
    bad = sorted({s.text: s for s in samples if not s.good}.values(),
                 key=lambda s: (s.well_formed, -s.tokens))
    n = min(max_pairs, len(bad)) if good else 0
    return [(good[i % len(good)], bad[i]) for i in range(n)]


def build_pairs(prompts: list[Any], samples: list[list[Scored]], max_pairs: int = 1
                ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Conversational preference rows (TRL's prompt/chosen/rejected) and their statistics."""
    rows: list[dict[str, Any]] = []
    all_good = all_bad = 0
    for prompt, group in zip(prompts, samples):
        pairs = pairs_for_prompt(group, max_pairs)
        if not pairs:
            if group and all(s.good for s in group):
                all_good += 1
            else:
                all_bad += 1
            continue
        for chosen, rejected in pairs:
            rows.append({"prompt": prompt,
                         "chosen": chosen.messages(), "rejected": rejected.messages(),
                         "chosen_tokens": chosen.tokens, "rejected_tokens": rejected.tokens,
                         "rejected_well_formed": rejected.well_formed})
    flat = [s for g in samples for s in g]
    mean = lambda xs: float(sum(xs) / len(xs)) if xs else 0.0  # noqa: E731
    stats = {
        "prompts": len(prompts),
        "pairs": len(rows),
        "prompts_with_pair": len(prompts) - all_good - all_bad,
        "prompts_no_pair": all_good + all_bad,
        "prompts_all_good": all_good,
        "prompts_all_bad": all_bad,
        "samples": len(flat),
        "sample_pass_rate": mean([s.correct for s in flat]),
        "sample_format_rate": mean([s.well_formed for s in flat]),
        "chosen_mean_tokens": mean([r["chosen_tokens"] for r in rows]),
        "rejected_mean_tokens": mean([r["rejected_tokens"] for r in rows]),
        "rejected_malformed_share": mean([not r["rejected_well_formed"] for r in rows]),
    }
    return rows, stats


def _assistant_turns(value: Any, where: str) -> list[dict[str, str]]:
    """A chosen/rejected value as assistant messages (a bare string, or a conversation whose
    leading prompt turns — as in e.g. UltraFeedback — are dropped)."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value):
        first = next((i for i, m in enumerate(value) if m["role"] == "assistant"), None)
        if first is not None:
            return [{"role": m["role"], "content": m.get("content") or ""} for m in value[first:]]
    raise UserError(f"{where}: chosen/rejected must be text or chat messages with an assistant "
                    f"turn, got {str(value)[:80]!r}")


def to_preference(ds, system_prompt: str | None, answer_format: str = "tags",
                  where: str = "train_data"):
    """A prompt/chosen/rejected dataset in the conversational form the chat template renders."""
    require_columns(ds, ["prompt", "chosen", "rejected"], where)

    def convert(row):
        prompt = row["prompt"]
        if isinstance(prompt, str):
            prompt = prompt_messages(prompt, system_prompt, answer_format)
        return {"prompt": prompt, "chosen": _assistant_turns(row["chosen"], where),
                "rejected": _assistant_turns(row["rejected"], where)}

    return ds.map(convert, remove_columns=ds.column_names)
