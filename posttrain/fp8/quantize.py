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

Written by hand because torch has the `float8_e4m3fn` dtype and a scaled GEMM but no blockwise
quantizer (torchao's targets other recipes and is not a dependency here).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

BLOCK = 128                      # N_C in the paper: tile width and promotion interval
E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0                 # torch.finfo(torch.float8_e4m3fn).max
# Only keeps an all-zero tile's scale finite (zeros stay exact). DeepGEMM's test helpers floor at
# 1e-4, sized for activations; on gradient tiles (amax 1e-6 .. 1e-10 late in training) that floor
# squeezes the tile into a fraction of E4M3's range and flushes its small entries.
AMAX_FLOOR = 1e-12
TILE = (1, BLOCK)                # activations, gradients: per row per 128 columns
WEIGHT_BLOCK = (BLOCK, BLOCK)    # weights: per 128x128 block


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def pad_to(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """`x` (2-D) zero-padded at the bottom and right up to multiples of `rows` and `cols`."""
    pr = ceil_div(x.shape[0], rows) * rows - x.shape[0]
    pc = ceil_div(x.shape[1], cols) * cols - x.shape[1]
    return F.pad(x, (0, pc, 0, pr)) if pr or pc else x


@dataclass
class FP8Tensor:
    """A 2-D tensor stored as E4M3 values and FP32 scales, `value ≈ data * scale` per block.

    Attributes:
        data: E4M3 values, zero-padded: columns to a multiple of 128, and rows too for 128x128
            blocks (so the transpose of a weight is again a valid 128x128-blocked tensor).
        scale: FP32 scale per block, shape (ceil(rows / block_rows), ceil(cols / 128)).
        shape: The unpadded (rows, cols).
        block: (1, 128) for tiles, (128, 128) for weight blocks.
    """

    data: torch.Tensor
    scale: torch.Tensor
    shape: tuple[int, int]
    block: tuple[int, int]

    def row_scales(self) -> torch.Tensor:
        """Scales expanded to one row per data row: shape (padded rows, column blocks)."""
        if self.block[0] == 1:
            return self.scale
        return self.scale.repeat_interleave(self.block[0], dim=0)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The represented values (unpadded), in `dtype`."""
        vals = self.data.to(torch.float32).view(self.data.shape[0], -1, BLOCK)
        vals = (vals * self.row_scales()[..., None]).view(self.data.shape)
        return vals[: self.shape[0], : self.shape[1]].to(dtype)

    def t(self) -> FP8Tensor:
        """Transpose of a 128x128-blocked tensor, still 128x128-blocked, at no precision cost."""
        if self.block != WEIGHT_BLOCK:
            raise ValueError("only 128x128 blocks transpose exactly; re-tile 1x128 tiles instead")
        return FP8Tensor(self.data.t().contiguous(), self.scale.t().contiguous(),
                         (self.shape[1], self.shape[0]), self.block)


def to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Round FP32 values to E4M3 (round-to-nearest-even), saturating at ±448 instead of NaN."""
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def quantize(x: torch.Tensor, block: tuple[int, int] = TILE, pow2: bool = False) -> FP8Tensor:
    """Quantize a 2-D tensor with one max-abs scale per `block` ((1, 128) or (128, 128)); with
    `pow2`, each scale rounded up to a power of two."""
    if x.dim() != 2:
        raise ValueError(f"quantize takes a 2-D tensor, got shape {tuple(x.shape)}")
    if block not in (TILE, WEIGHT_BLOCK):
        raise ValueError(f"block must be {TILE} or {WEIGHT_BLOCK}, got {block}")
    br = block[0]
    xp = pad_to(x.detach().to(torch.float32), br, BLOCK)
    rows, cols = xp.shape
    tiles = xp.view(rows // br, br, cols // BLOCK, BLOCK)
    amax = tiles.abs().amax(dim=(1, 3)).clamp(min=AMAX_FLOOR)
    scale = amax / E4M3_MAX
    if pow2:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    data = to_e4m3(tiles / scale[:, None, :, None]).view(rows, cols)
    if br == 1:
        data = data.contiguous()
    return FP8Tensor(data, scale, (x.shape[0], x.shape[1]), block)


def quantize_weight(w: torch.Tensor, pow2: bool = False) -> FP8Tensor:
    """A Linear weight (out, in) in 128x128 blocks."""
    return quantize(w, WEIGHT_BLOCK, pow2)


def retile_columns(x: FP8Tensor, pow2: bool = False) -> FP8Tensor:
    """1x128 tiles of `x` → 1x128 tiles of `xᵀ` (i.e. 128x1 tiles of `x`), from the FP8 values
    alone. Under amax/448 scales the values are rounded a second time; under power-of-two scales
    it adds no error to values that stay in E4M3's normal range. (The training layers quantize
    the Wgrad operand once, from high precision, instead: posttrain.fp8.linear.)"""
    return quantize(x.dequantize().t(), TILE, pow2)
