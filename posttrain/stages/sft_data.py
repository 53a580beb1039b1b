"""SFT data the way every chat template can train on it, with honest lengths (sft, distill).

Loss on the answer only, for any model family: conversations become TRL prompt/completion rows
(the last assistant turn is the completion), so TRL masks by where the rendered prompt ends —
no `{% generation %}` markers needed in the template (Llama-3's and most others have none).
`assistant_only_loss: true` keeps whole conversations for templates that do have the markers.

Examples longer than `max_length` are dropped by default (a truncated chain of thought teaches
the model to stop mid-reasoning) or, when the recipe asks, left for TRL to truncate; either way
they are counted in the stage's metrics.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

from posttrain.errors import UserError

OVERLONG = ("drop", "truncate")


@dataclasses.dataclass
class OverlongFields:
    """Recipe field of a stage that fine-tunes on chat data; mixed into its `Recipe`.

    Attributes:
        overlong: What to do with an example longer than `max_length` tokens: `drop` it (the
            default), or `truncate` it (its start kept). Counted in the metrics either way.
    """

    overlong: str = "drop"

    def check_overlong(self) -> None:
        if self.overlong not in OVERLONG:
            raise UserError(f"overlong must be one of {', '.join(OVERLONG)}, got {self.overlong!r}")


def to_prompt_completion(ds, where: str = "train_data"):
    """`messages` rows → TRL's conversational prompt/completion rows (completion: the last turn,
    which must be the assistant's)."""
    def split(row):
        msgs = row["messages"]
        if not msgs or msgs[-1].get("role") != "assistant":
            raise UserError(f"{where}: a conversation does not end with an assistant turn (its "
                            f"last role: {msgs[-1].get('role') if msgs else 'none'}); SFT trains on "
                            f"the final assistant reply")
        if any(m.get("role") == "tool" for m in msgs):
            raise UserError(f"{where}: conversations with tool turns train with "
                            f"assistant_only_loss: true (a template with {{% generation %}} "
                            f"markers), so every assistant turn has loss and no tool result does")
        return {"prompt": msgs[:-1], "completion": msgs[-1:]}
    return ds.map(split, remove_columns=ds.column_names)


def token_lengths(ds, tokenizer) -> list[int]:
    """Tokens of each prompt/completion (or messages) row as the chat template renders it."""
    texts = [tokenizer.apply_chat_template(r["prompt"] + r["completion"] if "prompt" in r
                                           else r["messages"], tokenize=False) for r in ds]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def fit_to_length(ds, tokenizer, max_length: int | None, overlong: str) -> tuple[Any, dict]:
    """Drop (or keep, for TRL to truncate) the rows longer than `max_length`; (rows, figures)."""
    lengths = token_lengths(ds, tokenizer)
    over = [i for i, n in enumerate(lengths) if max_length and n > max_length]
    figures = {"examples": len(ds), "examples_over_max_length": len(over),
               "max_example_tokens": max(lengths, default=0)}
    if over:
        action = "dropped" if overlong == "drop" else "truncated to their start"
        print(f"[posttrain] {len(over)} of {len(ds)} examples are longer than max_length "
              f"{max_length} tokens (longest {figures['max_example_tokens']}): {action} "
              f"(overlong: drop | truncate)", file=sys.stderr)
    if over and overlong == "drop":
        keep = sorted(set(range(len(ds))) - set(over))
        if not keep:
            raise UserError(f"every example is longer than max_length {max_length} tokens; raise "
                            f"max_length or set overlong: truncate")
        ds = ds.select(keep)
    figures["examples_dropped"] = len(over) if overlong == "drop" else 0
    return ds, figures
