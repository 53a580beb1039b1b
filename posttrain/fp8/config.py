"""What trains in FP8 (`FP8Config`, a recipe's `fp8:`), and the dtype FP8 layers compute in."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from posttrain.errors import UserError

# Module names kept in high precision (the output head, routers, value/score heads).
KEEP_HIGH_PRECISION = ("lm_head", "mlp.gate", "score", "v_head")


@dataclasses.dataclass(frozen=True)
class FP8Config:
    """What trains in FP8 (default: DeepSeek-V3's choice, all three GEMMs of every eligible layer).

    Attributes:
        fprop: `y = x·Wᵀ` in FP8 (else FP32).
        dgrad: `dx = dy·W` in FP8.
        wgrad: `dW = dyᵀ·x` in FP8.
        keep: More module names (or name suffixes, e.g. `self_attn.q_proj`, or a part such as
            `self_attn`) kept in high precision, on top of the head, routers and score heads.
        accumulator_bits: Emulate a tensor-core accumulator that keeps this many significant
            bits (about 14 on H800) in the reference GEMM; null: exact FP32 sums per 128-block.
        promote_every: With `accumulator_bits`: flush the limited accumulator into FP32 every
            this many K (DeepSeek-V3's N_C = 128); null: never (the whole K accumulates limited).
        pow2_scales: Round every scale up to a power of two (the paper's and TE's default);
            false: amax / 448.
    """

    fprop: bool = True
    dgrad: bool = True
    wgrad: bool = True
    keep: tuple[str, ...] = ()
    accumulator_bits: int | None = None
    promote_every: int | None = 128
    pow2_scales: bool = True

    @classmethod
    def parse(cls, value: Any) -> FP8Config:
        """From a recipe's `fp8:` (true, or a mapping of these fields); UserError otherwise."""
        if value is True:
            return cls()
        if not isinstance(value, dict):
            raise UserError(f"fp8: expected true, false or a mapping, got {value!r}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - fields)
        if unknown:
            raise UserError(f"fp8: unknown key {', '.join(unknown)} (known: {', '.join(sorted(fields))})")
        out = cls(**{**value, "keep": tuple(value.get("keep", ()))})
        if out.accumulator_bits is not None and not 2 <= out.accumulator_bits <= 24:
            raise UserError(f"fp8: accumulator_bits must be in [2, 24], got {out.accumulator_bits}")
        if out.promote_every is not None and (out.promote_every <= 0 or out.promote_every % 32):
            raise UserError(f"fp8: promote_every must be a positive multiple of 32, got "
                            f"{out.promote_every}")
        return out


DEFAULT = FP8Config()


def output_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype an FP8 layer returns: autocast's where it is on (a BF16 mixed-precision run
    keeps its activations in BF16), else its input's."""
    device = x.device.type
    if device in ("cuda", "cpu") and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype
