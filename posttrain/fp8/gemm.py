"""Blockwise-scaled FP8 GEMM `A @ Bᵀ` with FP32 promotion every 128 along K (DeepSeek-V3 §3.3.2).

Both operands are `FP8Tensor`s quantized along K (activations in 1x128 tiles, weights in 128x128
blocks, or, for Wgrad, both in 1x128 tiles along the tokens). Each 128-wide slice of K gives a
partial product that is scaled by its two block scales and added into an FP32 accumulator: the
per-block scales can only be applied there, and this is also what bounds the accumulation error
(see `limited_precision_dot`).

Two paths, chosen per call by posttrain.fp8.backend:
- reference (any device, the CPU's): exact E4M3 values multiplied and summed in FP32 per
  128-block, then promoted and scaled, FP32 across blocks.
- CUDA (SM90): `torch.nn.functional.scaled_mm` with BlockWise1x128 / BlockWise128x128 scales
  (cuBLAS), operands padded and scales laid out by posttrain.fp8.layout (`prepare_scaled_mm`).
  Where it is refused or fails, the reference runs and the fallback is warned and recorded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from posttrain.fp8 import backend
from posttrain.fp8.layout import TILE, WEIGHT_BLOCK, GemmLayout, ScaleLayout, scaled_mm_layout
from posttrain.fp8.quantize import BLOCK, FP8Tensor

# Bound on the (K-blocks x M x N) FP32 partials the reference materializes at once.
_CHUNK_ELEMS = 1 << 24


def fp8_gemm(a: FP8Tensor, b: FP8Tensor, out_dtype: torch.dtype = torch.float32, name: str = ""
             ) -> torch.Tensor:
    """`A @ Bᵀ` of shape (a.rows, b.rows); both quantized along the same K. `name` says which
    layer and GEMM this is, for the warning if it cannot run on cuBLAS."""
    if a.data.shape[1] != b.data.shape[1]:
        raise ValueError(f"K mismatch: {a.shape} vs {b.shape}")
    choice = backend.choose_gemm(a.block, b.block, a.data.device)
    why = choice.why
    if choice.fast:
        try:
            return _gemm_cuda(a, b, out_dtype)
        except (RuntimeError, ValueError, NotImplementedError) as e:
            why = f"scaled_mm raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if why:
        blocks = "1x128 x 128x128" if b.block == WEIGHT_BLOCK else "1x128 x 1x128"
        backend.fallback("GEMM", f"{name or 'A·Bᵀ'} ({a.shape[0]}x{a.shape[1]} · "
                         f"({b.shape[0]}x{b.shape[1]})ᵀ, {blocks})", why)
    return gemm_reference(a, b, out_dtype)


def gemm_reference(a: FP8Tensor, b: FP8Tensor, out_dtype: torch.dtype = torch.float32
                   ) -> torch.Tensor:
    """Exact E4M3 products, FP32 sums within each 128-block, scaled and promoted to FP32."""
    m, n = a.data.shape[0], b.data.shape[0]
    kb = a.data.shape[1] // BLOCK
    sa = a.row_scales().t()  # (kb, m)
    sb = b.row_scales().t()  # (kb, n)
    out = torch.zeros(m, n, dtype=torch.float32, device=a.data.device)
    step = max(1, _CHUNK_ELEMS // max(1, m * n))
    for k0 in range(0, kb, step):
        k1 = min(kb, k0 + step)
        # (k, m, 128) @ (k, 128, n): one partial product per K-block.
        ak = a.data[:, k0 * BLOCK:k1 * BLOCK].to(torch.float32).view(m, k1 - k0, BLOCK)
        bk = b.data[:, k0 * BLOCK:k1 * BLOCK].to(torch.float32).view(n, k1 - k0, BLOCK)
        partial = torch.bmm(ak.transpose(0, 1), bk.permute(1, 2, 0))
        partial *= sa[k0:k1, :, None] * sb[k0:k1, None, :]
        out += partial.sum(dim=0)
    return out[: a.shape[0], : b.shape[0]].to(out_dtype)


@dataclass
class ScaledMMArgs:
    """The operands of `torch.nn.functional.scaled_mm` for `A @ Bᵀ`, laid out by `layout`.

    Attributes:
        mat_a: (m, k) E4M3, row-major, rows zero-padded.
        mat_b: (k, n) E4M3, column-major (B's rows zero-padded, transposed as a view).
        scale_a: A's 1x128 scales, shape and strides as `layout.scale_a`.
        scale_b: B's scales, shape and strides as `layout.scale_b` (128x128: K-blocks padded).
        layout: The rules these follow.
    """

    mat_a: torch.Tensor
    mat_b: torch.Tensor
    scale_a: torch.Tensor
    scale_b: torch.Tensor
    layout: GemmLayout


def _pad_rows(data: torch.Tensor, rows: int) -> torch.Tensor:
    if data.shape[0] == rows:
        return data
    pad = (0, 0, 0, rows - data.shape[0])
    return F.pad(data.view(torch.uint8), pad).view(data.dtype)   # E4M3 zero is byte 0


def _place(src: torch.Tensor, layout: ScaleLayout) -> torch.Tensor:
    """`src` in the top-left of a tensor of `layout`'s shape and strides, the rest 1.0; `src`
    itself where it already is one (the Triton quantizer writes scales that way)."""
    if tuple(src.shape) == layout.shape and all(
            size == 1 or st == want for size, st, want in zip(src.shape, src.stride(), layout.stride)):
        return src
    out = torch.empty_strided(layout.shape, layout.stride, dtype=torch.float32, device=src.device)
    out.fill_(1.0)
    out[: src.shape[0], : src.shape[1]].copy_(src)
    return out


def prepare_scaled_mm(a: FP8Tensor, b: FP8Tensor) -> ScaledMMArgs:
    """Pad the operands and lay out their scales as torch's blockwise scaled_mm requires
    (posttrain.fp8.layout). The values are unchanged: padding rows are zeros."""
    if a.block != TILE:
        raise ValueError(f"A must be in 1x128 tiles, got {a.block}")
    layout = scaled_mm_layout(a.data.shape[0], b.data.shape[0], a.data.shape[1], b.block)
    b_scale = b.scale if b.block == TILE else b.scale.t()   # 128x128: (K-blocks, N-blocks)
    return ScaledMMArgs(_pad_rows(a.data, layout.m), _pad_rows(b.data, layout.n).t(),
                        _place(a.scale, layout.scale_a), _place(b_scale, layout.scale_b), layout)


def scaled_mm_reference(args: ScaledMMArgs) -> torch.Tensor:
    """What scaled_mm computes from `args`, by the reference GEMM: (m, n) padded, FP32. Reads the
    scales as cuBLAS does, so a misplaced scale changes the result (tests/test_fp8_layout.py)."""
    lay = args.layout
    kb = lay.k // BLOCK
    a = FP8Tensor(args.mat_a, args.scale_a, (lay.m, lay.k), TILE)
    if lay.b_block == WEIGHT_BLOCK:
        b = FP8Tensor(args.mat_b.t(), args.scale_b[:kb].t(), (lay.n, lay.k), WEIGHT_BLOCK)
    else:
        b = FP8Tensor(args.mat_b.t(), args.scale_b, (lay.n, lay.k), TILE)
    return gemm_reference(a, b)


def _gemm_cuda(a: FP8Tensor, b: FP8Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """cuBLAS blockwise-scaled GEMM, in the output dtype asked for (FP32 for Wgrad's
    accumulation into FP32 master grads)."""
    from torch.nn.functional import ScalingType, scaled_mm

    args = prepare_scaled_mm(a, b)
    recipe_b = (ScalingType.BlockWise128x128 if b.block == WEIGHT_BLOCK
                else ScalingType.BlockWise1x128)
    out = scaled_mm(args.mat_a, args.mat_b, args.scale_a, ScalingType.BlockWise1x128,
                    args.scale_b, recipe_b, output_dtype=out_dtype)
    return out[: a.shape[0], : b.shape[0]]


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepGEMM's similarity error `1 − 2Σxy / Σ(x² + y²)`: 0 for equal tensors."""
    x, y = x.detach().double(), y.detach().double()
    denom = (x * x + y * y).sum()
    return float(1 - 2 * (x * y).sum() / denom) if denom > 0 else 0.0


def round_mantissa(x: torch.Tensor, bits: int) -> torch.Tensor:
    """FP32 values truncated (toward zero) to `bits` significant bits, implicit bit included.

    Truncation is how an accumulator that aligns addends to its own exponent and keeps a fixed
    number of bits drops the low ones.
    """
    drop = 24 - bits
    if drop <= 0:
        return x
    i = x.contiguous().view(torch.int32)
    mask = ~((1 << drop) - 1)
    return (i & mask).view(torch.float32)


def limited_precision_dot(a: torch.Tensor, b: torch.Tensor, bits: int = 14,
                          promote_every: int | None = None, group: int = 32) -> torch.Tensor:
    """`a @ bᵀ` (FP32 inputs, optionally batched) with an accumulator that keeps only `bits`
    significant bits.

    Emulates the tensor-core accumulation the paper measured on H800 (about 14 bits): every
    `group` products (one MMA instruction's K) are summed and added into the limited accumulator,
    which is then truncated. With `promote_every` (128 in DeepSeek-V3), the limited accumulator
    is flushed into an FP32 one every that many K, which keeps its value, and so its truncation
    error, small.
    """
    *lead, m, k = a.shape
    acc32 = torch.zeros(*lead, m, b.shape[-2], dtype=torch.float32, device=a.device)
    acc = torch.zeros_like(acc32)
    for k0 in range(0, k, group):
        part = a[..., k0:k0 + group] @ b[..., k0:k0 + group].transpose(-1, -2)
        acc = round_mantissa(acc + part, bits)
        if promote_every and (k0 + group) % promote_every == 0:
            acc32 += acc
            acc.zero_()
    return acc32 + acc


def _probe_cublas(a_block: tuple[int, int], b_block: tuple[int, int]) -> str | None:
    """None if cuBLAS takes this block pair and agrees with the reference, else why not."""
    from posttrain.fp8.quantize import quantize

    if torch.cuda.get_device_capability() < (9, 0):
        return f"blockwise scaled_mm needs SM90, this GPU is SM{torch.cuda.get_device_capability()}"
    if not hasattr(torch.nn.functional, "scaled_mm"):
        return f"torch {torch.__version__} has no torch.nn.functional.scaled_mm"
    if a_block != TILE or b_block not in (TILE, WEIGHT_BLOCK):
        return f"no cuBLAS recipe for {a_block} x {b_block}"
    # 200 rows (not a multiple of 16), K 640 (5 K-blocks, not a multiple of 4), B 300 rows.
    x, w = backend.probe_inputs((200, 640), (300, 640))
    a, b = quantize(x, a_block, True), quantize(w, b_block, True)
    got = _gemm_cuda(a, b, torch.float32)
    diff = calc_diff(got, gemm_reference(a, b))
    if got.dtype != torch.float32 or diff > 1e-5:
        return f"disagrees with the reference GEMM (calc_diff {diff:.1e}, out {got.dtype})"
    return None


backend.PROBES["cublas"] = _probe_cublas
