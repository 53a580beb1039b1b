"""FP8 copies of the weights, quantized once per optimizer step instead of once per forward.

A weight's 128x128 blocks (and its transpose's, which Dgrad reads) depend on the weight alone, so
every forward and micro-batch between two optimizer steps can share them. An entry is used while
the weight is the same tensor, with the same storage (`data_ptr`), the same version counter
(`_version`, bumped by every in-place write through the tensor: an optimizer's update, a
`load_state_dict`) and the same count of optimizer steps: a global post-step hook on torch
optimizers counts them, which also catches an optimizer that writes through `.data`, which the
version counter does not see.

Entries are held weakly by their weight (they go with the model); `clear()` drops them all.
Cost: 2 bytes of device memory per cached parameter (its blocks and their transpose).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.weak import WeakIdKeyDictionary

from posttrain.fp8.cast import quantize_blocks
from posttrain.fp8.quantize import FP8Tensor

STATS = {"quantized": 0}     # weight quantizations run (what the tests count)
_steps = 0


@dataclass
class _Entry:
    key: tuple
    blocks: FP8Tensor
    blocks_t: FP8Tensor | None


_entries: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _count_step(optimizer, args, kwargs) -> None:
    global _steps
    _steps += 1


_hook = register_optimizer_step_post_hook(_count_step)


def weight_blocks(w: torch.Tensor, pow2: bool, transpose: bool
                  ) -> tuple[FP8Tensor, FP8Tensor | None]:
    """`w` in 128x128 blocks, and its transpose's blocks if `transpose`: cached until `w`
    changes or an optimizer steps."""
    key = (w.data_ptr(), w._version, _steps, pow2, tuple(w.shape), w.dtype, w.device)
    entry = _entries.get(w)
    if entry is not None and entry.key == key and (entry.blocks_t is not None or not transpose):
        return entry.blocks, entry.blocks_t
    blocks, blocks_t = quantize_blocks(w.detach(), pow2, transpose)
    _entries[w] = _Entry(key, blocks, blocks_t)
    STATS["quantized"] += 1
    return blocks, blocks_t


def clear() -> None:
    """Drop every cached FP8 weight (frees their memory)."""
    _entries.clear()
