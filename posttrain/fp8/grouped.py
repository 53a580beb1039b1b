"""Grouped FP8 GEMMs for MoE experts in DeepGEMM's contiguous layout, without a loop per expert.

The token→expert assignments of a layer are laid out as rows of one tensor: each expert's rows
together, starting at a multiple of 128, zero rows after each expert's last one (`group_rows`,
`scatter_rows`). Then:
- every 128-row tile belongs to one expert, so Fprop (`x·W_eᵀ`) and Dgrad (`dy·W_e`) are one
  m-grouped GEMM over all tiles, each tile against its expert's 128x128-blocked weight;
- every 128-row block of tokens belongs to one expert, so the 1x128 tiles along the tokens that
  Wgrad reads (`dW_e = dy_eᵀ·x_e`) never mix two experts, and Wgrad is one k-grouped GEMM whose
  K range per expert is its blocks.
The quantized values are then exactly those of a loop that quantizes and multiplies each
expert's rows on their own (tests/test_fp8_grouped.py checks it against that loop).

On a CUDA device the Triton kernels (posttrain.fp8.kernels) run; elsewhere the references below,
vectorized over tiles (no Python loop per expert), with the same per-128 FP32 promotion as
posttrain.fp8.gemm.gemm_reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from posttrain.fp8 import backend
from posttrain.fp8.layout import BLOCK, round_up
from posttrain.fp8.quantize import FP8Tensor

# Bound on the FP32 partial products a reference materializes at once.
_CHUNK_ELEMS = 1 << 24


@dataclass(frozen=True)
class GroupLayout:
    """Where each assignment's row lives in the contiguous layout.

    Attributes:
        dest: (n,) int64 row of each assignment; an assignment to no expert (an index outside
            [0, groups)) gets a row in a parked block that no GEMM reads.
        tile_group: (rows / 128,) int32 expert of each 128-row tile; -1 for parked and tail tiles.
        block_start: (groups + 1,) int32 first tile of each expert; the last entry is the end of
            the last expert's tiles.
        rows: Total rows, a multiple of 128.
        groups: Number of experts.
    """

    dest: torch.Tensor
    tile_group: torch.Tensor
    block_start: torch.Tensor
    rows: int
    groups: int


def group_rows(expert: torch.Tensor, groups: int, exact: bool) -> GroupLayout:
    """The contiguous layout of assignments to `expert` (n,) ids.

    `exact` sizes it to the assignments (reads the counts on the host); otherwise to the bound
    `n + (groups + 1) · 127` rows, which needs no host sync on a GPU (the tail tiles are skipped).
    """
    n = expert.numel()
    # Assignments to no expert go to a parked group `groups` after the real ones.
    e = torch.where((expert >= 0) & (expert < groups), expert, groups).long()
    # scatter_add, not bincount: bincount reads the largest id on the host (a sync on a GPU).
    counts = torch.zeros(groups + 1, dtype=torch.long, device=e.device).scatter_add_(
        0, e, torch.ones_like(e))
    tiles = (counts + BLOCK - 1) // BLOCK
    ends = torch.cumsum(tiles, 0)
    starts = ends - tiles
    order = torch.argsort(e, stable=True)
    sorted_e = e[order]
    rank = torch.arange(n, device=e.device) - (torch.cumsum(counts, 0) - counts)[sorted_e]
    dest = torch.empty_like(e)
    dest[order] = starts[sorted_e] * BLOCK + rank
    rows = int(ends[-1]) * BLOCK if exact else round_up(n + (groups + 1) * (BLOCK - 1), BLOCK)
    tile = torch.arange(rows // BLOCK, device=e.device)
    tile_group = torch.searchsorted(ends[:groups], tile, right=True)
    tile_group = torch.where(tile_group < groups, tile_group, -1).to(torch.int32)
    block_start = torch.cat([starts[:groups], ends[groups - 1:groups]]).to(torch.int32)
    return GroupLayout(dest, tile_group, block_start, rows, groups)


def scatter_rows(x: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
    """Rows of `x` (one per assignment) placed in the layout; zeros elsewhere (differentiable)."""
    out = x.new_zeros(layout.rows, *x.shape[1:])
    return out.index_copy(0, layout.dest, x)


def m_grouped_gemm(a: FP8Tensor, b: FP8Tensor, layout: GroupLayout, out_dtype: torch.dtype,
                   name: str = "") -> torch.Tensor:
    """(rows, n): each row tile of `a` (1x128 tiles along K) times its expert's `b` (E, n, K)
    128x128 blocks, transposed. Tiles of no expert are zeros."""
    choice = backend.choose_triton(a.data.device, "grouped")
    if choice.fast:
        from posttrain.fp8 import kernels
        return kernels.m_grouped_gemm(a, b, layout, out_dtype)
    if choice.why:
        backend.fallback("grouped GEMM", f"{name or 'experts'} {layout.rows}x{a.shape[1]} · "
                         f"{layout.groups}x({b.shape[0]}x{b.shape[1]})ᵀ", choice.why)
    return m_grouped_reference(a, b, layout, out_dtype)


def k_grouped_gemm(a: FP8Tensor, b: FP8Tensor, layout: GroupLayout, name: str = ""
                   ) -> torch.Tensor:
    """FP32 (E, m, n): per expert, `a` (m, rows) times `b` (n, rows)ᵀ over that expert's token
    blocks; both in 1x128 tiles along the tokens (Wgrad's dyᵀ and xᵀ)."""
    choice = backend.choose_triton(a.data.device, "grouped")
    if choice.fast:
        from posttrain.fp8 import kernels
        return kernels.k_grouped_gemm(a, b, layout)
    if choice.why:
        backend.fallback("grouped Wgrad GEMM", f"{name or 'experts'} {layout.groups}x"
                         f"({a.shape[0]}x{layout.rows}) · ({b.shape[0]}x{layout.rows})ᵀ",
                         choice.why)
    return k_grouped_reference(a, b, layout)


def _live_tiles(layout: GroupLayout) -> torch.Tensor:
    return (layout.tile_group >= 0).nonzero().flatten()


def m_grouped_reference(a: FP8Tensor, b: FP8Tensor, layout: GroupLayout,
                        out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reference m-grouped GEMM: exact E4M3 products, FP32 sums per 128-block, then scaled."""
    rows, kp = layout.rows, a.data.shape[1]
    np_, kb, tiles = b.data.shape[1], kp // BLOCK, layout.rows // BLOCK
    out = torch.zeros(tiles, BLOCK, np_, dtype=torch.float32, device=a.data.device)
    a_data = a.data[:rows].view(tiles, BLOCK, kb, BLOCK)
    a_scale = a.scale[:rows].reshape(tiles, BLOCK, kb)
    b_scale = b.scale.repeat_interleave(BLOCK, dim=1)   # (E, np, kb)
    live = _live_tiles(layout)
    step = max(1, _CHUNK_ELEMS // (kb * BLOCK * np_))
    for i in range(0, live.numel(), step):
        t = live[i:i + step]
        g = layout.tile_group[t].long()
        at = a_data[t].float().permute(0, 2, 1, 3)                              # (c, kb, 128, 128)
        bt = b.data[g].float().view(len(t), np_, kb, BLOCK).permute(0, 2, 3, 1)  # (c, kb, 128, np)
        partial = at @ bt                                                       # (c, kb, 128, np)
        partial *= a_scale[t].permute(0, 2, 1)[..., None] * b_scale[g].permute(0, 2, 1)[:, :, None]
        out[t] = partial.sum(dim=1)
    return out.view(rows, np_)[:, : b.shape[0]].to(out_dtype)


def k_grouped_reference(a: FP8Tensor, b: FP8Tensor, layout: GroupLayout) -> torch.Tensor:
    """Reference k-grouped GEMM (Wgrad): per token block, exact products summed in FP32, scaled,
    and added into its expert's FP32 result."""
    mp, np_ = a.data.shape[0], b.data.shape[0]
    tiles = layout.rows // BLOCK
    out = torch.zeros(layout.groups, mp, np_, dtype=torch.float32, device=a.data.device)
    a_data = a.data[:, :layout.rows].view(mp, tiles, BLOCK)
    b_data = b.data[:, :layout.rows].view(np_, tiles, BLOCK)
    live = _live_tiles(layout)
    step = max(1, _CHUNK_ELEMS // (mp * np_))
    for i in range(0, live.numel(), step):
        t = live[i:i + step]
        partial = a_data[:, t].float().permute(1, 0, 2) @ b_data[:, t].float().permute(1, 2, 0)
        partial *= a.scale[:, t].t()[:, :, None] * b.scale[:, t].t()[:, None, :]
        out.index_add_(0, layout.tile_group[t].long(), partial)
    return out[:, : a.shape[0], : b.shape[0]]


def _probe_grouped() -> str | None:
    """None if the Triton grouped GEMMs agree with the references on an uneven routing."""
    from posttrain.fp8 import kernels
    from posttrain.fp8.gemm import calc_diff
    from posttrain.fp8.quantize import TILE, WEIGHT_BLOCK, quantize

    x, w, dy = backend.probe_inputs((300, 640), (3, 200, 640), (300, 200))
    experts = torch.tensor([0, 2, 2, 0, 1] * 60, device="cuda")[:300]
    layout = group_rows(experts, 3, exact=True)
    xp = scatter_rows(x, layout)
    xq, xt = quantize(xp, TILE, True), quantize(xp.t(), TILE, True)
    wq = quantize(w, WEIGHT_BLOCK, True)
    got = kernels.m_grouped_gemm(xq, wq, layout, torch.float32)
    diff = calc_diff(got, m_grouped_reference(xq, wq, layout, torch.float32))
    if diff > 1e-5:
        return f"m-grouped GEMM kernel disagrees with the reference (calc_diff {diff:.1e})"
    dyt = quantize(scatter_rows(dy, layout).t(), TILE, True)
    got = kernels.k_grouped_gemm(dyt, xt, layout)
    diff = calc_diff(got, k_grouped_reference(dyt, xt, layout))
    if diff > 1e-5:
        return f"k-grouped GEMM kernel disagrees with the reference (calc_diff {diff:.1e})"
    return None


backend.PROBES["grouped"] = _probe_grouped
