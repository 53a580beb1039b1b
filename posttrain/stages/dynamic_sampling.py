"""DAPO dynamic sampling for TRL's GRPOTrainer: a step learns only from groups whose rewards differ.

A group of `num_generations` completions that all earn the same reward (all right or all wrong)
has zero advantage everywhere: it adds nothing to the policy gradient, yet with a token-level loss
(`loss_type: dapo` or `bnpo`) its tokens still count in the normaliser, diluting the gradient of
the groups that do carry signal, and with `beta > 0` it still pulls toward the reference. DAPO
(Yu et al. 2025, §3.2) keeps sampling prompts until the batch is full of groups with mixed
outcomes. TRL 1.16 has no such option (its issue for it is open), hence this subclass.

Two modes:
- `refill` (DAPO): after the step's own generation, sample further prompts from the training set,
  generate and score them, keep their informative groups, until the batch has its configured
  number of informative groups or `max_sampling_rounds` generations ran. If the rounds run out,
  the remaining places hold the first round's uninformative groups, masked out of the loss.
- `mask`: no extra generation; uninformative groups leave the batch, so the step's forward and
  backward passes run on the informative groups alone (plus a few masked rows where TRL's split
  into `steps_per_generation` slices needs a multiple). With a token-level loss (`dapo`, `bnpo`)
  the gradient is the one masking them would give, at a fraction of the compute: about half a
  SmolLM2 batch was uninformative. Per-sequence losses (`grpo`, `dr_grpo`) average over the
  informative completions only, as DAPO's batch of informative groups has them.

Under several processes (`accelerate launch`) each process judges and refills its own groups (the
stage's preflight makes sure no group is split across processes), and the processes agree on the
number of rounds: generation is collective in TRL, so a round runs while any process still has
places to fill, and a process already full discards that round's samples.

Logged per step: `dynamic_sampling/rounds`, `kept_frac` (informative share of the step's own
generation), `informative_frac` (of the batch the optimizer sees), `generated_frac`
(completions generated / the batch's size: the extra generation refill costs) and `trained_frac`
(rows trained on / the batch's size: what `mask` saves).
"""

from __future__ import annotations

import random
from typing import Any

import torch
from trl import GRPOTrainer

# Per-sample tensors aligned with the completion (right-padded) or the prompt (left-padded).
_PROMPT_KEYS = ("prompt_ids", "prompt_mask")
_PER_SAMPLE = {"prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages",
               "old_per_token_logps", "sampling_per_token_logps", "ref_per_token_logps",
               "importance_sampling_ratio", "tool_mask"}


def informative_groups(advantages: torch.Tensor, num_generations: int) -> torch.Tensor:
    """Per sample: True if its group's rewards differ.

    TRL's advantage is `(reward - group mean)`, optionally divided by the group std, elementwise:
    a group of equal rewards gets one identical value (about 0, up to float noise that the std
    scaling can blow up to ~1e-3, so "is it zero" is the wrong test), while unequal rewards give
    unequal advantages. Hence: keep a group when its advantages spread.

    Args:
        advantages: One advantage per sample, groups contiguous (TRL's layout).
        num_generations: Group size G.

    Returns:
        Bool tensor shaped like `advantages`.
    """
    groups = advantages.view(-1, num_generations)
    keep = (groups.amax(dim=1) - groups.amin(dim=1)) > 1e-6
    return keep.repeat_interleave(num_generations)


def trained_rows(keep: torch.Tensor, num_generations: int, slices: int) -> torch.Tensor:
    """The rows `mask` mode trains on: the informative ones, topped up with the first
    uninformative ones (masked out of the loss) to at least one group and to a multiple of
    `slices` — TRL splits a generation batch into that many equal slices, dropping a remainder.
    """
    rows = keep.clone()
    want = -(-max(int(keep.sum()), num_generations) // slices) * slices
    filler = (~keep).nonzero().squeeze(1)[:want - int(keep.sum())]
    rows[filler] = True
    return rows


def select_rows(batch: dict[str, Any], rows: torch.Tensor) -> dict[str, Any]:
    """The per-sample entries of a generation batch at boolean `rows`."""
    return {k: v[rows] for k, v in batch.items() if k in _PER_SAMPLE}


def merge_batches(batches: list[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Concatenate generation batches: prompts left-padded, completions right-padded to the
    longest (padding is masked out, so its value only has to be a valid token)."""
    out = {}
    for key in batches[0]:
        parts = [b[key] for b in batches]
        if parts[0].dim() == 2 and len({p.shape[1] for p in parts}) > 1:
            width = max(p.shape[1] for p in parts)
            value = pad_token_id if key in ("prompt_ids", "completion_ids") else 0
            left = key in _PROMPT_KEYS
            parts = [torch.nn.functional.pad(p, (width - p.shape[1], 0) if left else
                                             (0, width - p.shape[1]), value=value) for p in parts]
        out[key] = torch.cat(parts)
    return out


class DynamicSamplingGRPOTrainer(GRPOTrainer):
    """GRPOTrainer whose steps learn from informative groups only (DAPO dynamic sampling).

    Why a subclass overriding one method: the only hook between "rewards are known" and "the loss
    is computed" is `_generate_and_score_completions`. We let TRL generate and score (once, or
    again for the refill's further prompts), then assemble the batch from the informative groups
    and recount `num_items_in_batch`, the token-level loss normaliser. Places that stay without an
    informative group are masked out of the loss — the mechanism TRL uses for
    `mask_truncated_completions` — so the batch keeps the shape TRL's buffering and splitting
    across `steps_per_generation` rely on.
    """

    def __init__(self, *args: Any, mode: str = "refill", max_sampling_rounds: int = 4,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.dynamic_mode, self.max_sampling_rounds = mode, max_sampling_rounds
        # Each process draws its own further prompts.
        self._refill_rng = random.Random(self.args.seed + 1 + self.accelerator.process_index)

    def _further_prompts(self, n_prompts: int) -> list[dict[str, Any]]:
        """`n_prompts` training rows, each repeated `num_generations` times (TRL's layout)."""
        data = self.train_dataset
        picks = [self._refill_rng.randrange(len(data)) for _ in range(n_prompts)]
        return [data[i] for i in picks for _ in range(self.num_generations)]

    def _any_process_short(self, short: bool) -> bool:
        """Whether any process still has places to fill (every process must call this)."""
        flag = torch.tensor([float(short)], device=self.accelerator.device)
        return bool(self.accelerator.gather(flag).max().item() > 0)

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        if not self.model.training:
            return out
        g = self.num_generations
        advantages = out["advantages"]
        if advantages.dim() != 1 or advantages.numel() % g:
            raise RuntimeError(f"dynamic sampling: this process holds {advantages.numel()} "
                               f"samples, not whole groups of {g} (the preflight should have "
                               f"refused this batch layout)")
        unknown = set(out) - {"num_items_in_batch"} - _PER_SAMPLE
        if unknown:
            raise RuntimeError(f"dynamic sampling cannot regroup batch entries {sorted(unknown)}")
        keep = informative_groups(advantages, g)
        size, kept_frac, rounds, generated = keep.numel(), keep.float().mean().item(), 1, keep.numel()
        if self.dynamic_mode == "refill":
            parts, have = [select_rows(out, keep)], int(keep.sum())
            while rounds < self.max_sampling_rounds and self._any_process_short(have < size):
                more = super()._generate_and_score_completions(self._further_prompts(size // g))
                rounds += 1
                if have >= size:
                    continue  # this process is full: it only took part in the collective round
                generated += more["advantages"].numel()
                more_keep = informative_groups(more["advantages"], g)
                parts.append(select_rows(more, more_keep))
                have += int(more_keep.sum())
            filler = select_rows(out, ~keep)  # used only if the rounds ran out
            merged = merge_batches(parts + [filler], self._tokenizer.pad_token_id)
            keep = torch.arange(have + filler["advantages"].numel()) < have
            out = {k: v[:size] for k, v in merged.items()}
            keep = keep[:size].to(out["advantages"].device)
        else:
            rows = trained_rows(keep, g, self.args.steps_per_generation)
            out, keep = select_rows(out, rows), keep[rows]
        out["completion_mask"] = out["completion_mask"] * keep.unsqueeze(1).to(out["completion_mask"].dtype)
        if "tool_mask" in out:
            out["tool_mask"] = out["tool_mask"] * keep.unsqueeze(1).to(out["tool_mask"].dtype)
        loss_mask = out["completion_mask"] * out.get("tool_mask", 1)
        out["num_items_in_batch"] = self.accelerator.gather(loss_mask.sum()).sum()
        metrics = self._metrics["train"]
        metrics["dynamic_sampling/kept_frac"].append(kept_frac)
        metrics["dynamic_sampling/informative_frac"].append(keep.float().mean().item())
        metrics["dynamic_sampling/rounds"].append(float(rounds))
        metrics["dynamic_sampling/generated_frac"].append(generated / size)
        metrics["dynamic_sampling/trained_frac"].append(keep.numel() / size)
        return out
