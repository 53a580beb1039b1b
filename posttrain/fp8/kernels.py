"""Triton kernels of the CUDA path: fused quantization and the grouped (expert) FP8 GEMMs.

Why Triton, written here:
- Quantization is memory-bound: one pass per operand that reads the input once and writes E4M3
  values and scales (and the transposed copy Wgrad reads, from the same tile in registers) runs
  at memory speed, where the reference's chain of torch ops (pad, view, amax, divide, clamp,
  cast, transpose, a second quantization) reads and writes the tensor several times; on an H200
  it cost 1.6-2.7x the FP8 GEMM itself. torch.compile could fuse the one-output case, but not
  without a recompile per token count and not the transposed second output in the same pass;
  torchao's blockwise kernels write amax/448 scales only (no power-of-two rounding) and
  Transformer Engine is a multi-GB CUDA build the GPU image lacks.
- torch's scaled grouped GEMM (`torch.nn.functional.scaled_grouped_mm`) takes row-wise or MX
  scales, not 1x128 / 128x128 ones (its meta check, `_meta_grouped_mm_common`, and torchao's
  blockwise MoE code, which emulates this case in BF16, say as much). The grouped kernels follow
  DeepGEMM's contiguous layout instead (posttrain.fp8.grouped): every expert's rows start at a
  multiple of 128, so each 128-row tile belongs to one expert (m-grouped: Fprop, Dgrad) and each
  128-token block of a transposed operand to one expert (k-grouped: Wgrad).

Rounding is done in FP32 arithmetic with the reference's rules (max-abs scale, power of two from
the scale's bits, round-to-nearest-even to E4M3, saturation at 448), so the cast to E4M3 is
exact and the kernels equal the reference bit for bit on any backend, Triton's CPU interpreter
included (tests/test_fp8_kernels.py). The GEMMs scale each 128-wide K-block's partial product and
add it into an FP32 accumulator: DeepSeek-V3's promotion every N_C = 128.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from posttrain.fp8.layout import BLOCK, TILE, WEIGHT_BLOCK, padded_rows, round_up, tile_scale_layout
from posttrain.fp8.quantize import AMAX_FLOOR, E4M3, E4M3_MAX, FP8Tensor

_FLOOR = tl.constexpr(AMAX_FLOOR)
_MAX = tl.constexpr(E4M3_MAX)


@triton.jit
def _scale(amax, POW2: tl.constexpr):
    """Max-abs scale of a tile (amax floored), rounded up to a power of two with POW2."""
    s = tl.math.div_rn(tl.maximum(amax, _FLOOR), _MAX)
    if POW2:
        bits = s.to(tl.int32, bitcast=True)
        up = (bits & 0x7F800000) + 0x00800000
        s = tl.where((bits & 0x007FFFFF) != 0, up, bits).to(tl.float32, bitcast=True)
    return s


@triton.jit
def _to_e4m3_grid(v):
    """FP32 values rounded to E4M3's grid (nearest, ties to even; ±448 saturation), as FP32."""
    a = tl.abs(v)
    bits = a.to(tl.int32, bitcast=True)
    # Normal range: keep 3 mantissa bits (drop 20, round half to even).
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
    # Subnormal range (< 2^-6): multiples of 2^-9; adding 2^14 rounds to exactly that grid.
    sub = (a + 16384.0) - 16384.0
    r = tl.minimum(tl.where(a < 0.015625, sub, normal), _MAX)
    return tl.where(v < 0, -r, r)


@triton.jit
def _quantize_tiles_kernel(x_ptr, M, K, sxm, sxk,
                           y_ptr, Y_ROWS, sym, s_ptr, ssm, ssk,
                           yt_ptr, YT_ROWS, sytm, st_ptr, stm, stk,
                           POW2: tl.constexpr, ROWS: tl.constexpr, TRANSPOSE: tl.constexpr,
                           B: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = pid_m.to(tl.int64) * B + tl.arange(0, B)   # 64-bit offsets: tensors past 2^31 elements
    rk = pid_k.to(tl.int64) * B + tl.arange(0, B)
    mask = (rm[:, None] < M) & (rk[None, :] < K)
    x = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :] * sxk, mask=mask, other=0.0)
    x = x.to(tl.float32)
    if ROWS:   # 1x128 tiles along K: one scale per row of this tile
        s = _scale(tl.max(tl.abs(x), axis=1), POW2)
        y = _to_e4m3_grid(tl.math.div_rn(x, s[:, None])).to(y_ptr.dtype.element_ty)
        keep = rm < Y_ROWS
        tl.store(y_ptr + rm[:, None] * sym + rk[None, :], y, mask=keep[:, None])
        tl.store(s_ptr + rm * ssm + pid_k * ssk, s, mask=keep)
    if TRANSPOSE:   # 128x1 tiles along M, written transposed: 1x128 tiles of xᵀ
        st = _scale(tl.max(tl.abs(x), axis=0), POW2)
        yt = _to_e4m3_grid(tl.math.div_rn(x, st[None, :])).to(yt_ptr.dtype.element_ty)
        keep = rk < YT_ROWS
        tl.store(yt_ptr + rk[:, None] * sytm + rm[None, :], tl.trans(yt), mask=keep[:, None])
        tl.store(st_ptr + rk * stm + pid_m * stk, st, mask=keep)


@triton.jit
def _quantize_blocks_kernel(w_ptr, N, K, swe, swn, swk,
                            y_ptr, sye, syn, s_ptr, sse, ssn, ssk,
                            yt_ptr, syte, sytk, st_ptr, stse, stsk, stsn,
                            POW2: tl.constexpr, TRANSPOSE: tl.constexpr, B: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    e = tl.program_id(2).to(tl.int64)
    rn = pid_n.to(tl.int64) * B + tl.arange(0, B)
    rk = pid_k.to(tl.int64) * B + tl.arange(0, B)
    mask = (rn[:, None] < N) & (rk[None, :] < K)
    x = tl.load(w_ptr + e * swe + rn[:, None] * swn + rk[None, :] * swk, mask=mask, other=0.0)
    x = x.to(tl.float32)
    s = _scale(tl.max(tl.max(tl.abs(x), axis=1), axis=0), POW2)
    y = _to_e4m3_grid(tl.math.div_rn(x, s)).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + e * sye + rn[:, None] * syn + rk[None, :], y)
    tl.store(s_ptr + e * sse + pid_n * ssn + pid_k * ssk, s)
    if TRANSPOSE:
        tl.store(yt_ptr + e * syte + rk[:, None] * sytk + rn[None, :], tl.trans(y))
        tl.store(st_ptr + e * stse + pid_k * stsk + pid_n * stsn, s)


def _unused(device: torch.device) -> torch.Tensor:
    """A stand-in pointer for an output a launch does not write (no null pointers)."""
    return torch.empty(1, dtype=torch.float32, device=device)


def _empty_scales(rows: int, k: int, device: torch.device) -> torch.Tensor:
    layout = tile_scale_layout(rows, k)   # written straight in the layout cuBLAS reads
    return torch.empty_strided(layout.shape, layout.stride, dtype=torch.float32, device=device)


def quantize_tiles(x: torch.Tensor, pow2: bool, rows: bool = True, transpose: bool = False
                   ) -> tuple[FP8Tensor | None, FP8Tensor | None]:
    """posttrain.fp8.quantize.quantize_tiles in one pass: x (m, k) → 1x128 tiles of x (rows
    padded to 16) and of xᵀ (rows padded to 16, columns to 128), scales outer-dim-major."""
    m, k = x.shape
    kp, mt = round_up(k, BLOCK), round_up(m, BLOCK)
    y_rows, yt_rows = padded_rows(m, TILE), padded_rows(k, TILE)
    dev = x.device
    y = torch.empty(y_rows, kp, dtype=E4M3, device=dev) if rows else None
    s = _empty_scales(y_rows, kp, dev) if rows else None
    yt = torch.empty(yt_rows, mt, dtype=E4M3, device=dev) if transpose else None
    st = _empty_scales(yt_rows, mt, dev) if transpose else None
    if (rows or transpose) and m and k:
        unused = _unused(dev)
        y_, s_, yt_, st_ = (t if t is not None else unused for t in (y, s, yt, st))
        grid = (mt // BLOCK, kp // BLOCK)
        _quantize_tiles_kernel[grid](
            x, m, k, x.stride(0), x.stride(1),
            y_, y_rows, y_.stride(0), s_, s_.stride(0), s_.stride(-1),
            yt_, yt_rows, yt_.stride(0), st_, st_.stride(0), st_.stride(-1),
            POW2=pow2, ROWS=rows, TRANSPOSE=transpose, B=BLOCK, num_warps=8)
    return (FP8Tensor(y, s, (m, k), TILE) if rows else None,
            FP8Tensor(yt, st, (k, m), TILE) if transpose else None)


def quantize_blocks(w: torch.Tensor, pow2: bool, transpose: bool = False
                    ) -> tuple[FP8Tensor, FP8Tensor | None]:
    """posttrain.fp8.quantize.quantize_blocks in one pass: a weight (n, k), or a stack (E, n, k),
    → 128x128 blocks of it and, with `transpose`, of its transpose."""
    w3 = w if w.dim() == 3 else w[None]
    e, n, k = w3.shape
    np_, kp = round_up(n, BLOCK), round_up(k, BLOCK)
    dev = w.device
    y = torch.empty(e, np_, kp, dtype=E4M3, device=dev)
    s = torch.empty(e, np_ // BLOCK, kp // BLOCK, dtype=torch.float32, device=dev)
    yt = torch.empty(e, kp, np_, dtype=E4M3, device=dev) if transpose else None
    st = torch.empty(e, kp // BLOCK, np_ // BLOCK, device=dev) if transpose else None
    if e and np_ and kp:
        unused = _unused(dev)
        yt_, st_ = (yt, st) if transpose else (unused, unused)
        yt_strides = yt.stride()[:2] if transpose else (0, 0)
        st_strides = st.stride() if transpose else (0, 0, 0)
        _quantize_blocks_kernel[(np_ // BLOCK, kp // BLOCK, e)](
            w3, n, k, *w3.stride(), y, *y.stride()[:2], s, *s.stride(),
            yt_, *yt_strides, st_, *st_strides,
            POW2=pow2, TRANSPOSE=transpose, B=BLOCK, num_warps=8)
    if w.dim() == 2:
        y, s = y[0], s[0]
        yt, st = (yt[0], st[0]) if transpose else (None, None)
    return (FP8Tensor(y, s, (n, k), WEIGHT_BLOCK),
            FP8Tensor(yt, st, (k, n), WEIGHT_BLOCK) if transpose else None)


@triton.jit
def _m_grouped_kernel(a_ptr, sam, sa_ptr, sasm, sask,
                      b_ptr, sbe, sbn, sb_ptr, sbse, sbsn, sbsk,
                      c_ptr, scm, tile_group_ptr, N, KB,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.load(tile_group_ptr + pid_m * BM // 128)
    iters = tl.where(g >= 0, KB, 0)   # a tile of no group (the tail) is written as zeros
    g = tl.maximum(g, 0).to(tl.int64)
    rm = pid_m.to(tl.int64) * BM + tl.arange(0, BM)
    rn = pid_n.to(tl.int64) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    a_ptrs = a_ptr + rm[:, None] * sam + rk[None, :]
    b_ptrs = b_ptr + g * sbe + rn[None, :] * sbn + rk[:, None]
    sa_ptrs = sa_ptr + rm * sasm
    sb_ptr = sb_ptr + g * sbse + (pid_n * BN // 128) * sbsn
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for kb in range(0, iters):
        a = tl.load(a_ptrs)
        b = tl.load(b_ptrs)
        sa = tl.load(sa_ptrs + kb * sask)
        sb = tl.load(sb_ptr + kb * sbsk)
        acc += tl.dot(a, b) * (sa[:, None] * sb)   # promoted to FP32 every 128 of K
        a_ptrs += BK
        b_ptrs += BK
    c = acc.to(c_ptr.dtype.element_ty)
    tl.store(c_ptr + rm[:, None] * scm + rn[None, :], c, mask=rn[None, :] < N)


def m_grouped_gemm(a: FP8Tensor, b: FP8Tensor, layout, out_dtype: torch.dtype) -> torch.Tensor:
    """Rows of `a` (1x128 tiles, contiguous layout) times their group's `b` (E, n, k) blocks,
    transposed: (layout.rows, n). Tiles of no group come out as zeros."""
    rows, kp = a.data.shape
    n = b.shape[0]
    c = torch.empty(rows, n, dtype=out_dtype, device=a.data.device)
    if rows and n:
        grid = (rows // BLOCK, b.data.shape[1] // BLOCK)
        _m_grouped_kernel[grid](
            a.data, a.data.stride(0), a.scale, a.scale.stride(0), a.scale.stride(1),
            b.data, b.data.stride(0), b.data.stride(1), b.scale, *b.scale.stride(),
            c, c.stride(0), layout.tile_group, n, kp // BLOCK,
            BM=BLOCK, BN=BLOCK, BK=BLOCK, num_warps=8, num_stages=3)
    return c


@triton.jit
def _k_grouped_kernel(a_ptr, sam, sa_ptr, sasm, sask,
                      b_ptr, sbn, sb_ptr, sbsn, sbsk,
                      c_ptr, sce, scm, block_start_ptr, M, N,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.program_id(2)
    k0 = tl.load(block_start_ptr + e)
    k1 = tl.load(block_start_ptr + e + 1)
    e = e.to(tl.int64)
    rm = pid_m.to(tl.int64) * BM + tl.arange(0, BM)
    rn = pid_n.to(tl.int64) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    mm, mn = rm < M, rn < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for kb in range(k0, k1):   # this group's 128-token blocks
        k = kb * BK + rk
        a = tl.load(a_ptr + rm[:, None] * sam + k[None, :], mask=mm[:, None], other=0.0)
        b = tl.load(b_ptr + rn[None, :] * sbn + k[:, None], mask=mn[None, :], other=0.0)
        sa = tl.load(sa_ptr + rm * sasm + kb * sask, mask=mm, other=0.0)
        sb = tl.load(sb_ptr + rn * sbsn + kb * sbsk, mask=mn, other=0.0)
        acc += tl.dot(a, b) * (sa[:, None] * sb[None, :])
    tl.store(c_ptr + e * sce + rm[:, None] * scm + rn[None, :], acc,
             mask=mm[:, None] & mn[None, :])


def k_grouped_gemm(a: FP8Tensor, b: FP8Tensor, layout) -> torch.Tensor:
    """Per group e, `a`'s and `b`'s columns of e's token blocks contracted: `a` (m, rows) and `b`
    (n, rows) in 1x128 tiles along the tokens (Wgrad's dyᵀ and xᵀ); FP32 (groups, m, n)."""
    m, n = a.shape[0], b.shape[0]
    c = torch.empty(layout.groups, m, n, dtype=torch.float32, device=a.data.device)
    if layout.groups and m and n:
        grid = (-(-m // BLOCK), -(-n // BLOCK), layout.groups)
        _k_grouped_kernel[grid](
            a.data, a.data.stride(0), a.scale, a.scale.stride(0), a.scale.stride(1),
            b.data, b.data.stride(0), b.scale, b.scale.stride(0), b.scale.stride(1),
            c, c.stride(0), c.stride(1), layout.block_start, m, n,
            BM=BLOCK, BN=BLOCK, BK=BLOCK, num_warps=8, num_stages=3)
    return c
