"""What torch's blockwise `scaled_mm` (cuBLAS, SM90) needs of an FP8 GEMM's operands: how far
each operand's rows are zero-padded, and the shape and strides of each scale tensor.

Pure functions of shapes, so the CPU tests check them for every width we train; the CUDA path
(posttrain.fp8.gemm, posttrain.fp8.kernels) lays its operands out by them. The rules, read from
torch's checks (`_check_scaled_mm_sizes_v2` in torch/_meta_registrations.py, which mirrors
`_scaled_block1x128_block128x128` and `_scaled_block1x128_block1x128` in
aten/src/ATen/native/cuda/ScaledBlas.cpp) and from torch's test_scaled_matmul_cuda.py:

- `mat_a` (M, K) row-major, `mat_b` (K, N) column-major (`B.data.t()` of a row-major (N, K)),
  K a multiple of 16 (ours: of 128, quantize pads it), both of mat_b's dims multiples of 16.
- 1x128 scales (activations, gradients): shape (rows, K/128), strides (1, rows): "outer-dim-major",
  one column of all rows' scales per 128-block of K. The same for A and for a 1x128 B (Wgrad),
  where B's scales are (N, K/128) and not transposed: cuBLAS read (K/128, N) as a shape error on
  the H200 run of the old code.
- 128x128 scales (weights) as B: shape (L4, N/128) with L4 = round_up(K/128, 4), strides (1, L4):
  K-block-major, the count of K-blocks padded to a multiple of 4 (cuBLAS's 16-byte alignment of
  the scale rows; cublas docs "1D and 128x128 2D block scaling"). The padding entries are never
  read as scales of data; we fill them with 1.0 (torchao does too). Without it, Dgrad of an
  11008-wide layer (86 K-blocks) failed with "scale_b must have shape 88 x 12".
- Rows: a 128x128-blocked operand's rows are padded to 128 (its blocks are whole); a 1x128 one's
  to 16 (torch checks N % 16 for B; M is padded to 16 too, as the code that ran on the H200 did,
  so the output and A's scale columns stay 16-element aligned). Padding rows are zeros, their
  scales 1.0 or the floor scale: they add exact zeros and their output rows are sliced off.
"""

from __future__ import annotations

from dataclasses import dataclass

BLOCK = 128       # scale block along K, and a weight block's rows
ROW_ALIGN = 16    # rows of a 1x128-tiled operand
K_BLOCK_ALIGN = 4  # K-blocks of a 128x128 scale tensor
TILE = (1, BLOCK)
WEIGHT_BLOCK = (BLOCK, BLOCK)


def round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


@dataclass(frozen=True)
class ScaleLayout:
    """Shape and strides (in elements) of a scale tensor as scaled_mm takes it."""

    shape: tuple[int, int]
    stride: tuple[int, int]


@dataclass(frozen=True)
class GemmLayout:
    """`A (m, k) @ B (n, k)ᵀ` as padded for cuBLAS; `m`, `n` are the padded row counts.

    Attributes:
        m: Rows of A after padding.
        n: Rows of B (columns of the output) after padding.
        k: The reduction length (a multiple of 128).
        scale_a: Layout of A's scales.
        scale_b: Layout of B's scales.
        b_block: B's block shape: (1, 128) or (128, 128).
    """

    m: int
    n: int
    k: int
    scale_a: ScaleLayout
    scale_b: ScaleLayout
    b_block: tuple[int, int]


def padded_rows(rows: int, block: tuple[int, int]) -> int:
    """Rows an operand is zero-padded to: whole 128-row blocks, or a multiple of 16 for tiles."""
    return round_up(rows, BLOCK if block == WEIGHT_BLOCK else ROW_ALIGN)


def tile_scale_layout(rows: int, k: int) -> ScaleLayout:
    """1x128 scales of a (rows, k) operand: (rows, k/128), outer-dim-major."""
    return ScaleLayout((rows, k // BLOCK), (1, rows))


def block_scale_layout(rows: int, k: int) -> ScaleLayout:
    """128x128 scales of a (rows, k) B operand: (L4, rows/128), K-block-major, L4 the K-block
    count rounded up to a multiple of 4."""
    l4 = round_up(k // BLOCK, K_BLOCK_ALIGN)
    return ScaleLayout((l4, rows // BLOCK), (1, l4))


def scaled_mm_layout(m: int, n: int, k: int, b_block: tuple[int, int]) -> GemmLayout:
    """The layout of `A @ Bᵀ` for an A of `m` rows in 1x128 tiles and a B of `n` rows in
    `b_block`s, both quantized along a K of `k` (a multiple of 128)."""
    if k % BLOCK:
        raise ValueError(f"K must be a multiple of {BLOCK} (quantize pads it), got {k}")
    if b_block not in (TILE, WEIGHT_BLOCK):
        raise ValueError(f"B's block must be {TILE} or {WEIGHT_BLOCK}, got {b_block}")
    mp, np_ = padded_rows(m, TILE), padded_rows(n, b_block)
    scale_b = block_scale_layout(np_, k) if b_block == WEIGHT_BLOCK else tile_scale_layout(np_, k)
    return GemmLayout(mp, np_, k, tile_scale_layout(mp, k), scale_b, b_block)


def linear_layouts(tokens: int, in_features: int, out_features: int) -> dict[str, GemmLayout]:
    """The three GEMMs of a Linear layer on `tokens` tokens (DeepSeek-V3 §3.3, Figure 6).

    Fprop `y = x·Wᵀ` (x tiles along in, W blocks); Dgrad `dx = dy·W` (dy tiles along out, W's
    blocks transposed); Wgrad `dW = dyᵀ·x` (dyᵀ and xᵀ both in tiles along the tokens).
    """
    return {
        "fprop": scaled_mm_layout(tokens, out_features, round_up(in_features, BLOCK), WEIGHT_BLOCK),
        "dgrad": scaled_mm_layout(tokens, in_features, round_up(out_features, BLOCK), WEIGHT_BLOCK),
        "wgrad": scaled_mm_layout(out_features, in_features, round_up(tokens, BLOCK), TILE),
    }
