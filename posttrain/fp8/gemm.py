"""Blockwise-scaled FP8 GEMM `A @ Bᵀ` with FP32 promotion every 128 along K (DeepSeek-V3 §3.3.2).

Both operands are `FP8Tensor`s quantized along K (activations in 1x128 tiles, weights in 128x128
blocks). Each 128-wide slice of K gives a partial product that is scaled by its two block scales
and added into an FP32 accumulator: the per-block scales can only be applied there, and this is
also what bounds the accumulation error (see `limited_precision_dot`).

Two paths, chosen by `fp8_gemm` from the operands' device:
- reference (any device, the CPU one): exact E4M3 values multiplied and summed in FP32 per
  128-block, then promoted and scaled, FP32 across blocks.
- CUDA (Hopper and newer): `torch.nn.functional.scaled_mm` with BlockWise1x128 / BlockWise128x128
  scales (cuBLAS). It is checked against the reference once per process and dropped, with a
  warning, if it is missing or disagrees.
"""

from __future__ import annotations

import warnings

import torch

from posttrain.fp8.quantize import BLOCK, TILE, WEIGHT_BLOCK, FP8Tensor

# Bound on the (K-blocks x M x N) FP32 partials the reference materializes at once.
_CHUNK_ELEMS = 1 << 24
_cuda_ok: dict[tuple, bool] = {}


def fp8_gemm(a: FP8Tensor, b: FP8Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`A @ Bᵀ` of shape (a.rows, b.rows); both quantized along the same K."""
    if a.data.shape[1] != b.data.shape[1]:
        raise ValueError(f"K mismatch: {a.shape} vs {b.shape}")
    if a.data.is_cuda and cuda_path_available(a.block, b.block):
        return _gemm_cuda(a, b, out_dtype)
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


def cuda_path_available(a_block: tuple[int, int] = TILE, b_block: tuple[int, int] = WEIGHT_BLOCK
                        ) -> bool:
    """Whether the cuBLAS blockwise path runs here for these block shapes and matches the
    reference (checked once per pair)."""
    key = (a_block, b_block)
    if key not in _cuda_ok:
        _cuda_ok[key] = _probe_cuda(a_block, b_block)
    return _cuda_ok[key]


def _probe_cuda(a_block: tuple[int, int], b_block: tuple[int, int]) -> bool:
    from posttrain.fp8.quantize import quantize

    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        return False
    if not hasattr(torch.nn.functional, "scaled_mm"):
        return False
    try:
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(256, 512, device="cuda", generator=g)
        w = torch.randn(384, 512, device="cuda", generator=g)
        a, b = quantize(x, a_block), quantize(w, b_block)
        got = _gemm_cuda(a, b, torch.float32)
        ref = gemm_reference(a, b, torch.float32)
        ok = got.dtype == torch.float32 and calc_diff(got, ref) < 1e-5
    except Exception as e:  # noqa: BLE001 - any failure of an optional kernel means: don't use it
        warnings.warn(f"fp8: cuBLAS blockwise scaled_mm unavailable ({str(e).splitlines()[0]}); "
                      "using the reference GEMM", stacklevel=2)
        return False
    if not ok:
        warnings.warn(f"fp8: cuBLAS blockwise scaled_mm {a_block}x{b_block} disagrees with the "
                      "reference; using the reference GEMM", stacklevel=2)
    return ok


def _gemm_cuda(a: FP8Tensor, b: FP8Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """cuBLAS blockwise-scaled GEMM. Layouts as torch's own tests use them: 1x128 scales
    outer-dim-major (M-contiguous), B passed column-major (`b.data.t()`)."""
    from torch.nn.functional import ScalingType, scaled_mm

    def recipe(t: FP8Tensor):
        return ScalingType.BlockWise1x128 if t.block == TILE else ScalingType.BlockWise128x128

    def scales(t: FP8Tensor) -> torch.Tensor:
        return t.scale.t().contiguous().t() if t.block == TILE else t.scale

    a_data, a_scale = a.data, scales(a)
    if a.block == TILE and a_data.shape[0] % 16:
        pad = 16 - a_data.shape[0] % 16   # cuBLAS wants M a multiple of 16
        a_data = torch.nn.functional.pad(a_data.view(torch.uint8), (0, 0, 0, pad)).view(a.data.dtype)
        a_scale = torch.nn.functional.pad(a.scale, (0, 0, 0, pad), value=1.0)
        a_scale = a_scale.t().contiguous().t()
    # The output dtype asked for, FP32 included (Wgrad's accumulation into FP32 master grads):
    # where cuBLAS cannot write it, the probe fails and the reference GEMM is used.
    out = scaled_mm(a_data, b.data.t(), a_scale, recipe(a), scales(b).t(), recipe(b),
                    output_dtype=out_dtype)
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
    """`a @ bᵀ` (FP32 inputs) with an accumulator that keeps only `bits` significant bits.

    Emulates the tensor-core accumulation the paper measured on H800 (about 14 bits): every
    `group` products (one MMA instruction's K) are summed and added into the limited accumulator,
    which is then truncated. With `promote_every` (128 in DeepSeek-V3), the limited accumulator
    is flushed into an FP32 one every that many K, which keeps its value, and so its truncation
    error, small.
    """
    m, k = a.shape
    acc32 = torch.zeros(m, b.shape[0], dtype=torch.float32, device=a.device)
    acc = torch.zeros_like(acc32)
    for k0 in range(0, k, group):
        part = a[:, k0:k0 + group] @ b[:, k0:k0 + group].t()
        acc = round_mantissa(acc + part, bits)
        if promote_every and (k0 + group) % promote_every == 0:
            acc32 += acc
            acc.zero_()
    return acc32 + acc
