"""Fine-grained E4M3 quantization as in DeepSeek-V3 §3.3.2: 1x128 tiles for activations and
gradients, 128x128 blocks for weights, one FP32 scale per tile or block.

Why tiles rather than one scale per tensor: an outlier only costs precision inside its own 128
values instead of squeezing the whole tensor towards zero. The scale is online max-abs:
`scale = amax / 448` (448 is E4M3's largest finite value), with `amax` floored so an all-zero tile
does not divide by zero. With `pow2` (DeepSeek-V3's and Transformer Engine's default) the scale is
rounded up to a power of two: dividing by it only shifts exponents, so the scale itself adds no
rounding, and values quantized under one power-of-two scale re-tile under another without a
second rounding as long as they stay in E4M3's normal range. Shapes that do not divide by 128
are zero-padded: the padding quantizes to exact zeros and adds nothing to a dot product.

`quantize` is the reference (any device; what the CPU runs). The training layers quantize through
posttrain.fp8.cast, which on a CUDA device runs one fused Triton pass per operand (the same values
bit for bit).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from posttrain.fp8.layout import BLOCK, TILE, WEIGHT_BLOCK

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0                 # torch.finfo(torch.float8_e4m3fn).max
# Only keeps an all-zero tile's scale finite (zeros stay exact). DeepGEMM's test helpers floor at
# 1e-4, sized for activations; on gradient tiles (amax 1e-6 .. 1e-10 late in training) that floor
# squeezes the tile into a fraction of E4M3's range and flushes its small entries.
AMAX_FLOOR = 1e-12

__all__ = ["AMAX_FLOOR", "BLOCK", "E4M3", "E4M3_MAX", "TILE", "WEIGHT_BLOCK", "FP8Tensor",
           "ceil_div", "from_saved", "pad_to", "pow2_ceil", "quantize",
           "quantize_weight", "retile_columns", "to_e4m3", "to_saved"]


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def pad_to(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """`x` (last two dims) zero-padded at the bottom and right up to multiples of `rows`, `cols`."""
    pr = ceil_div(x.shape[-2], rows) * rows - x.shape[-2]
    pc = ceil_div(x.shape[-1], cols) * cols - x.shape[-1]
    return F.pad(x, (0, pc, 0, pr)) if pr or pc else x


@dataclass
class FP8Tensor:
    """A tensor stored as E4M3 values and FP32 scales, `value ≈ data * scale` per block.

    2-D, or 3-D for a stack of expert weights (a leading group dimension, each group blocked on
    its own: a 128x128 block never spans two experts).

    Attributes:
        data: E4M3 values, zero-padded: columns to a multiple of 128, rows to whole 128-row
            blocks for 128x128 blocks (so the transpose of a weight is again a valid 128x128-blocked
            tensor); the CUDA path also pads a tiled operand's rows (posttrain.fp8.layout).
        scale: FP32 scale per block: (rows / block_rows, cols / 128) over the padded data, any
            strides (the CUDA path writes them in the layout cuBLAS reads).
        shape: The unpadded (rows, cols) of one group.
        block: (1, 128) for tiles, (128, 128) for weight blocks.
    """

    data: torch.Tensor
    scale: torch.Tensor
    shape: tuple[int, int]
    block: tuple[int, int]

    def row_scales(self) -> torch.Tensor:
        """Scales expanded to one row per data row: shape (..., padded rows, column blocks)."""
        if self.block[0] == 1:
            return self.scale
        return self.scale.repeat_interleave(self.block[0], dim=-2)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The represented values (unpadded), in `dtype`."""
        *lead, rows, cols = self.data.shape
        vals = self.data.to(torch.float32).view(*lead, rows, cols // BLOCK, BLOCK)
        vals = (vals * self.row_scales()[..., None]).view(self.data.shape)
        return vals[..., : self.shape[0], : self.shape[1]].to(dtype)

    def t(self) -> FP8Tensor:
        """Transpose of a 128x128-blocked tensor, still 128x128-blocked, at no precision cost."""
        if self.block != WEIGHT_BLOCK:
            raise ValueError("only 128x128 blocks transpose exactly; re-tile 1x128 tiles instead")
        return FP8Tensor(self.data.transpose(-1, -2).contiguous(),
                         self.scale.transpose(-1, -2).contiguous(),
                         (self.shape[1], self.shape[0]), self.block)


def to_saved(t: FP8Tensor | None) -> tuple[tuple, tuple | None]:
    """An FP8Tensor as (tensors, meta): the tensors go through `ctx.save_for_backward` (so
    saved-tensor hooks, activation checkpointing and offloading, see them)."""
    return ((None, None), None) if t is None else ((t.data, t.scale), (t.shape, t.block))


def from_saved(tensors, meta: tuple | None) -> FP8Tensor | None:
    """The inverse of `to_saved`."""
    return None if meta is None else FP8Tensor(tensors[0], tensors[1], *meta)


def to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Round FP32 values to E4M3 (round-to-nearest-even), saturating at ±448 instead of NaN."""
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def pow2_ceil(scale: torch.Tensor) -> torch.Tensor:
    """The smallest power of two >= each (positive, normal) FP32 `scale`, exactly: from the bits
    (exp2(ceil(log2(s))) can round a scale just above a power of two down, and the Triton kernel
    computes it from the bits too)."""
    bits = scale.contiguous().view(torch.int32)
    up = (bits & 0x7F800000) + 0x00800000
    return torch.where((bits & 0x007FFFFF) != 0, up, bits).view(torch.float32)


def quantize(x: torch.Tensor, block: tuple[int, int] = TILE, pow2: bool = False) -> FP8Tensor:
    """Quantize a 2-D (or, for 128x128 blocks, 3-D stacked) tensor with one max-abs scale per
    `block` ((1, 128) or (128, 128)); with `pow2`, each scale rounded up to a power of two."""
    if block not in (TILE, WEIGHT_BLOCK):
        raise ValueError(f"block must be {TILE} or {WEIGHT_BLOCK}, got {block}")
    if x.dim() != 2 and not (x.dim() == 3 and block == WEIGHT_BLOCK):
        raise ValueError(f"quantize takes a 2-D tensor (3-D stacked weights in 128x128 blocks), "
                         f"got shape {tuple(x.shape)}")
    br = block[0]
    xp = pad_to(x.detach().to(torch.float32), br, BLOCK)
    *lead, rows, cols = xp.shape
    tiles = xp.view(*lead, rows // br, br, cols // BLOCK, BLOCK)
    amax = tiles.abs().amax(dim=(-3, -1)).clamp(min=AMAX_FLOOR)
    scale = amax / E4M3_MAX
    if pow2:
        scale = pow2_ceil(scale)
    data = to_e4m3(tiles / scale[..., :, None, :, None]).view(xp.shape)
    if br == 1:
        data = data.contiguous()
    return FP8Tensor(data, scale, (x.shape[-2], x.shape[-1]), block)


def quantize_weight(w: torch.Tensor, pow2: bool = False) -> FP8Tensor:
    """A Linear weight (out, in), or a stack of expert weights (E, out, in), in 128x128 blocks."""
    return quantize(w, WEIGHT_BLOCK, pow2)


def retile_columns(x: FP8Tensor, pow2: bool = False) -> FP8Tensor:
    """1x128 tiles of `x` → 1x128 tiles of `xᵀ` (i.e. 128x1 tiles of `x`), from the FP8 values
    alone. Under amax/448 scales the values are rounded a second time; under power-of-two scales
    it adds no error to values that stay in E4M3's normal range. (The training layers quantize
    the Wgrad operand once, from high precision, instead: `cast.quantize_tiles(transpose=True)`.)"""
    return quantize(x.dequantize().t(), TILE, pow2)
