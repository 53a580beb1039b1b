"""Routed experts of a DeepSeek-V3-style MoE in FP8: each projection of all experts is one grouped
GEMM, with no Python loop over experts and, on a GPU, no host sync.

`FP8Experts` takes transformers' fused experts (3-D `gate_up_proj` (E, 2I, H) and `down_proj`
(E, H, I) parameters, shared, so keys, checkpoints and the optimizer see no change). Its forward
lays the (token, expert) assignments out contiguously, 128-row aligned per expert
(posttrain.fp8.grouped), runs gate_up and down as grouped FP8 linears (Fprop and Dgrad m-grouped,
Wgrad k-grouped, the same three GEMMs and tilings as posttrain.fp8.linear), and adds the
weighted outputs back per token. Weights are quantized once per optimizer step
(posttrain.fp8.cache). A GEMM that `FP8Config` keeps in high precision, or the emulated
limited-precision accumulator, runs the same tiles in FP32 (CPU ablations, bench/fp8.py).
"""

from __future__ import annotations

import torch
from torch import nn

from posttrain.fp8 import grouped
from posttrain.fp8.cache import weight_blocks
from posttrain.fp8.cast import quantize_tiles
from posttrain.fp8.config import DEFAULT, FP8Config, output_dtype
from posttrain.fp8.gemm import limited_precision_dot
from posttrain.fp8.grouped import GroupLayout, group_rows, scatter_rows
from posttrain.fp8.layout import BLOCK
from posttrain.fp8.quantize import FP8Tensor, from_saved, to_saved

_CHUNK_ELEMS = 1 << 24


def per_tile(x: torch.Tensor, w: torch.Tensor, layout: GroupLayout, fn) -> torch.Tensor:
    """FP32 (rows, n): `fn(x_tiles (c, 128, k), w_tiles (c, n, k)) -> (c, 128, n)` over the
    row tiles of `x` (rows, k) and each tile's expert's `w` (E, n, k), in bounded chunks."""
    tiles, n, k = layout.rows // BLOCK, w.shape[1], w.shape[2]
    out = torch.zeros(tiles, BLOCK, n, dtype=torch.float32, device=x.device)
    xt = x.reshape(tiles, BLOCK, k)
    live = (layout.tile_group >= 0).nonzero().flatten()
    step = max(1, _CHUNK_ELEMS // (n * k))
    for i in range(0, live.numel(), step):
        t = live[i:i + step]
        out[t] = fn(xt[t].float(), w[layout.tile_group[t].long()].float())
    return out.view(layout.rows, n)


def per_group(a: torch.Tensor, b: torch.Tensor, layout: GroupLayout, fn) -> torch.Tensor:
    """FP32 (E, m, n): `fn(a_e (E, m, L), b_e (E, n, L))` where a_e, b_e are each expert's
    columns of `a` (m, rows) and `b` (n, rows), zero-padded to a common length L."""
    starts = layout.block_start[:-1].long() * BLOCK
    lengths = layout.block_start[1:].long() * BLOCK - starts
    span = int(lengths.max()) if layout.groups else 0
    pos = torch.arange(span, device=a.device)
    idx = torch.where(pos[None] < lengths[:, None], starts[:, None] + pos[None], a.shape[1])
    zero = a.new_zeros(a.shape[0], 1)
    a_e = torch.cat([a, zero], 1)[:, idx].permute(1, 0, 2)
    b_e = torch.cat([b, b.new_zeros(b.shape[0], 1)], 1)[:, idx].permute(1, 0, 2)
    return fn(a_e.float(), b_e.float())


def matmul_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a @ bᵀ` over the last two dims (the high-precision GEMM of per_tile and per_group)."""
    return a @ b.transpose(-1, -2)


def _m_gemm(a: FP8Tensor, b: FP8Tensor, layout: GroupLayout, out_dtype: torch.dtype,
            config: FP8Config, name: str) -> torch.Tensor:
    if config.accumulator_bits is None:
        return grouped.m_grouped_gemm(a, b, layout, out_dtype, name)
    return per_tile(a.dequantize(), b.dequantize(), layout, lambda x, w: limited_precision_dot(
        x, w, bits=config.accumulator_bits, promote_every=config.promote_every)).to(out_dtype)


def _k_gemm(a: FP8Tensor, b: FP8Tensor, layout: GroupLayout, config: FP8Config, name: str
            ) -> torch.Tensor:
    if config.accumulator_bits is None:
        return grouped.k_grouped_gemm(a, b, layout, name)
    return per_group(a.dequantize(), b.dequantize(), layout, lambda x, w: limited_precision_dot(
        x, w, bits=config.accumulator_bits, promote_every=config.promote_every))


class _FP8GroupedFn(torch.autograd.Function):
    """Rows `x` (rows, k) in the layout, times their expert's `weight` (E, n, k) transposed."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, layout: GroupLayout,
                config: FP8Config) -> torch.Tensor:
        pow2 = config.pow2_scales
        name = f"experts {weight.shape[0]}x {weight.shape[2]}->{weight.shape[1]}"
        out_dtype = output_dtype(x)
        xq, xt = quantize_tiles(x, pow2, rows=config.fprop, transpose=config.wgrad)
        wq, wt = (weight_blocks(weight, pow2, transpose=config.dgrad)
                  if config.fprop or config.dgrad else (None, None))
        if config.fprop:
            y = _m_gemm(xq, wq, layout, out_dtype, config, f"{name} Fprop")
        else:
            y = per_tile(x, weight, layout, matmul_t).to(out_dtype)
        (xt_tensors, xt_meta), (wt_tensors, wt_meta) = to_saved(xt), to_saved(wt)
        ctx.layout, ctx.config, ctx.name = layout, config, name
        ctx.meta = (x.dtype, weight.dtype, xt_meta, wt_meta)
        ctx.save_for_backward(x if not config.wgrad else None,
                              weight if not config.dgrad else None, *xt_tensors, *wt_tensors)
        return y

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x_hp, w_hp, *saved = ctx.saved_tensors
        x_dtype, w_dtype, xt_meta, wt_meta = ctx.meta
        xt, wt = from_saved(saved[:2], xt_meta), from_saved(saved[2:], wt_meta)
        layout, config = ctx.layout, ctx.config
        want_x, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gq, gt = quantize_tiles(grad_out, config.pow2_scales, rows=want_x and config.dgrad,
                                transpose=want_w and config.wgrad)
        grad_x = grad_w = None
        if want_x:
            if config.dgrad:
                grad_x = _m_gemm(gq, wt, layout, x_dtype, config, f"{ctx.name} Dgrad")
            else:
                grad_x = per_tile(grad_out, w_hp.transpose(1, 2), layout, matmul_t).to(x_dtype)
        if want_w:
            if config.wgrad:
                grad_w = _k_gemm(gt, xt, layout, config, f"{ctx.name} Wgrad")
            else:
                grad_w = per_group(grad_out.t(), x_hp.t(), layout, matmul_t)
            grad_w = grad_w.to(w_dtype)
        return grad_x, grad_w, None, None


def fp8_grouped_linear(x: torch.Tensor, weight: torch.Tensor, layout: GroupLayout,
                       config: FP8Config = DEFAULT) -> torch.Tensor:
    """Functional grouped FP8 linear: row tile t of `x` times `weight[tile's expert]ᵀ`."""
    return _FP8GroupedFn.apply(x, weight, layout, config)


class FP8Experts(nn.Module):
    """Routed experts (transformers' fused 3-D parameters) with their GEMMs in FP8, grouped.

    `grouped_fn` is the grouped linear it calls (a benchmark puts another precision's on it).
    """

    grouped_fn = staticmethod(fp8_grouped_linear)

    def __init__(self, experts: nn.Module, config: FP8Config = DEFAULT):
        super().__init__()
        self.fp8_config = config
        self.num_experts = experts.num_experts
        self.gate_up_proj = experts.gate_up_proj
        self.down_proj = experts.down_proj
        self.act_fn = experts.act_fn

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        tokens, k = top_k_index.shape
        expert = top_k_index.reshape(-1)
        # Exact sizes on a CPU (the counts are at hand); the no-sync bound on a GPU.
        layout = group_rows(expert, self.num_experts, exact=not hidden_states.is_cuda)
        token = torch.arange(tokens, device=hidden_states.device).repeat_interleave(k)
        # An index outside [0, E) (transformers' "routed nowhere") contributes nothing.
        valid = (expert >= 0) & (expert < self.num_experts)
        weight = torch.where(valid, top_k_weights.reshape(-1), 0.0)
        x = scatter_rows(hidden_states[token], layout)
        gate, up = self.grouped_fn(x, self.gate_up_proj, layout, self.fp8_config).chunk(2, dim=-1)
        h = self.grouped_fn(self.act_fn(gate) * up, self.down_proj, layout, self.fp8_config)
        y = h[layout.dest] * weight[:, None].to(h.dtype)
        return torch.zeros_like(hidden_states).index_add(0, token, y.to(hidden_states.dtype))
