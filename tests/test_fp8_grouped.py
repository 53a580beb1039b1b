"""MoE experts in FP8 through grouped GEMMs (posttrain.fp8.grouped, posttrain.fp8.experts) on CPU:
the contiguous layout, and the grouped path against a loop of dense FP8 linears per expert."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from posttrain.fp8 import FP8Config, FP8Experts, calc_diff, fp8_linear, grouped
from posttrain.fp8.config import DEFAULT
from posttrain.fp8.gemm import gemm_reference
from posttrain.fp8.quantize import TILE, WEIGHT_BLOCK, quantize


@pytest.mark.parametrize("exact, rows, tile_group", [
    (True, 384, [0, 2, -1]),
    (False, 640, [0, 2, -1, -1, -1]),    # sized to the bound n + (groups + 1) * 127, no sync
])
def test_group_rows_lays_experts_out_128_aligned(exact, rows, tile_group):
    # Experts 2, 0, 2, nowhere (5 is no expert), 0 over 3 experts; expert 1 gets nothing.
    layout = grouped.group_rows(torch.tensor([2, 0, 2, 5, 0]), 3, exact=exact)
    assert layout.dest.tolist() == [128, 0, 129, 256, 1]   # in token order within an expert
    assert layout.rows == rows and layout.tile_group.tolist() == tile_group
    assert layout.block_start.tolist() == [0, 1, 1, 2]
    x = grouped.scatter_rows(torch.arange(5.0)[:, None] + 1, layout)
    assert x[[128, 0, 129, 256, 1], 0].tolist() == [1, 2, 3, 4, 5] and x.sum() == 15


def _experts(e=4, hidden=256, inter=192, seed=0) -> nn.Module:
    """transformers' fused experts shape: gate_up (E, 2I, H), down (E, H, I)."""
    g = torch.Generator().manual_seed(seed)
    m = nn.Module()
    m.num_experts = e
    m.gate_up_proj = nn.Parameter(torch.randn(e, 2 * inter, hidden, generator=g) / hidden ** 0.5)
    m.down_proj = nn.Parameter(torch.randn(e, hidden, inter, generator=g) / inter ** 0.5)
    m.act_fn = nn.SiLU()
    return m


def _routing(tokens=300, k=2, e=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=g).requires_grad_()
    return index, weights


def _loop(experts, x, index, weights, config=DEFAULT):
    """The old way: per expert, its tokens through two dense FP8 linears."""
    out = torch.zeros_like(x)
    for e in range(experts.num_experts):
        tok, pos = torch.where(index == e)
        if tok.numel() == 0:
            continue
        gate, up = fp8_linear(x[tok], experts.gate_up_proj[e], config=config).chunk(2, dim=-1)
        h = fp8_linear(experts.act_fn(gate) * up, experts.down_proj[e], config=config)
        out = out.index_add(0, tok, h * weights[tok, pos, None])
    return out


def _grads(fn, experts, x, index, weights):
    for t in (x, weights, experts.gate_up_proj, experts.down_proj):
        t.grad = None
    y = fn(x, index, weights)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(5)))
    return [y.detach()] + [t.grad.clone() for t in (x, weights, experts.gate_up_proj,
                                                    experts.down_proj)]


def test_grouped_references_equal_a_loop_over_experts():
    g = torch.Generator().manual_seed(3)
    layout = grouped.group_rows(torch.randint(0, 3, (400,), generator=g), 3, exact=True)
    x = grouped.scatter_rows(torch.randn(400, 300, generator=g), layout)
    dy = grouped.scatter_rows(torch.randn(400, 200, generator=g), layout)
    w = quantize(torch.randn(3, 200, 300, generator=g), WEIGHT_BLOCK, True)
    xq, xt, dyt = (quantize(t, TILE, True) for t in (x, x.t(), dy.t()))
    m = grouped.m_grouped_reference(xq, w, layout)
    k = grouped.k_grouped_reference(dyt, xt, layout)
    for e in range(3):
        rows = slice(int(layout.block_start[e]) * 128, int(layout.block_start[e + 1]) * 128)
        wq_e = quantize(w.dequantize()[e], WEIGHT_BLOCK, True)   # the expert's blocks alone
        want = gemm_reference(quantize(x[rows], TILE, True), wq_e)
        assert torch.allclose(m[rows], want, rtol=1e-5, atol=1e-5)
        want_w = gemm_reference(quantize(dy[rows].t(), TILE, True), quantize(x[rows].t(), TILE, True))
        assert torch.allclose(k[e], want_w, rtol=1e-5, atol=1e-5)


def test_fp8_experts_equal_the_per_expert_loop_forward_and_backward(monkeypatch):
    """Same quantized values as quantizing each expert's tokens on its own (the layout keeps
    every 1x128 and 128x1 tile inside one expert), so the results match up to FP32 summation
    order; with two grouped GEMMs a pass, however many experts."""
    experts = _experts()
    fp8 = FP8Experts(experts)
    x = torch.randn(300, 256, generator=torch.Generator().manual_seed(4)).requires_grad_()
    index, weights = _routing()
    calls = {"m": 0, "k": 0}
    m_real, k_real = grouped.m_grouped_gemm, grouped.k_grouped_gemm

    def count(kind, real):
        def wrapped(*args, **kwargs):
            calls[kind] += 1
            return real(*args, **kwargs)
        return wrapped
    monkeypatch.setattr(grouped, "m_grouped_gemm", count("m", m_real))
    monkeypatch.setattr(grouped, "k_grouped_gemm", count("k", k_real))
    got = _grads(fp8, experts, x, index, weights)
    assert calls == {"m": 4, "k": 2}    # Fprop x2, Dgrad x2, Wgrad x2
    want = _grads(lambda *a: _loop(experts, *a), experts, x, index, weights)
    for name, a, b in zip(["out", "dx", "dweights", "dgate_up", "ddown"], got, want):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), name
        assert a.abs().sum() > 0, name


def test_fp8_experts_track_fp32_and_route_nowhere_contributes_nothing():
    experts = _experts(seed=6)
    x = torch.randn(200, 256, generator=torch.Generator().manual_seed(7))
    index, weights = _routing(tokens=200)
    fp32 = _loop(experts, x, index, weights.detach(), FP8Config(fprop=False, dgrad=False,
                                                                 wgrad=False))
    got = FP8Experts(experts)(x, index, weights.detach())
    assert 0 < calc_diff(got, fp32) < 5e-3     # two E4M3 GEMMs in a row
    nowhere = index.clone()
    nowhere[:10, 1] = -1                 # second choice of the first 10 tokens: no expert
    dropped = FP8Experts(experts)(x, nowhere, weights.detach())
    want = _loop(experts, x, index.masked_fill(nowhere < 0, 99), weights.detach())
    assert torch.allclose(dropped, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("config", [
    FP8Config(fprop=False, dgrad=False, wgrad=False),
    FP8Config(dgrad=False),
    FP8Config(accumulator_bits=14),
    FP8Config(accumulator_bits=14, promote_every=None),
])
def test_fp8_experts_ablations_match_the_loop(config):
    """The paths a config keeps in high precision, or through the emulated accumulator, run the
    same tiles and equal the loop of dense layers under the same config."""
    experts = _experts(e=3, hidden=256, inter=128, seed=8)
    x = torch.randn(120, 256, generator=torch.Generator().manual_seed(9)).requires_grad_()
    index, weights = _routing(tokens=120, e=3, seed=10)
    fp8 = FP8Experts(experts, config)
    got = _grads(fp8, experts, x, index, weights)
    want = _grads(lambda *a: _loop(experts, *a, config=config), experts, x, index, weights)
    for name, a, b in zip(["out", "dx", "dweights", "dgate_up", "ddown"], got, want):
        assert calc_diff(a, b) < 1e-9, name
