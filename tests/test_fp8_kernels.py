"""The Triton kernels of the FP8 CUDA path (posttrain.fp8.kernels), run on CPU by Triton's
interpreter: quantization bit-equal to the reference, grouped GEMMs equal to the references.

Triton decides at import whether its functions are interpreted, so the kernels run in one child
process started with TRITON_INTERPRET=1 (`_RUN`); it saves inputs and outputs, and the tests
compare them here with the reference implementations.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from posttrain.fp8 import grouped
from posttrain.fp8.gemm import calc_diff
from posttrain.fp8.quantize import TILE, WEIGHT_BLOCK, FP8Tensor, quantize

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]

_RUN = r"""
import sys, torch
from posttrain.fp8 import grouped, kernels
from posttrain.fp8.quantize import TILE, WEIGHT_BLOCK, quantize

def fields(t):
    return None if t is None else (t.data, t.scale, t.shape, t.block)

g = torch.Generator().manual_seed(0)
# Columns from 1e-8 to 1e3 (subnormal E4M3 values, saturation), an all-zero row, an outlier.
x = torch.randn(200, 300, generator=g) * torch.logspace(-8, 3, 300)
x[5] = 0.0
x[7, 3] = 1e6
w = torch.randn(2, 200, 300, generator=g)
out = {"x": x, "w": w}
for pow2 in (True, False):
    out[("tiles", pow2)] = [fields(t) for t in kernels.quantize_tiles(x, pow2, True, True)]
    out[("cols_bf16", pow2)] = [fields(t) for t in kernels.quantize_tiles(
        x.to(torch.bfloat16), pow2, False, True)]
    out[("blocks", pow2)] = [fields(t) for t in kernels.quantize_blocks(w, pow2, True)]
    out[("block", pow2)] = [fields(t) for t in kernels.quantize_blocks(w[1], pow2, False)]
# Experts: 1 empty, an assignment routed nowhere (-1).
experts = torch.randint(0, 4, (300,), generator=g)
experts[experts == 1] = 0
experts[3] = -1
out["experts"] = experts
for exact in (True, False):
    layout = grouped.group_rows(experts, 4, exact=exact)
    xs = grouped.scatter_rows(torch.randn(300, 200, generator=g), layout)
    dys = grouped.scatter_rows(torch.randn(300, 130, generator=g), layout)
    wq = quantize(torch.randn(4, 130, 200, generator=g), WEIGHT_BLOCK, True)
    xq, xt = quantize(xs, TILE, True), quantize(xs.t(), TILE, True)
    dyt = quantize(dys.t(), TILE, True)
    out[("grouped", exact)] = dict(
        xq=fields(xq), xt=fields(xt), wq=fields(wq), dyt=fields(dyt),
        m=kernels.m_grouped_gemm(xq, wq, layout, torch.float32),
        k=kernels.k_grouped_gemm(dyt, xt, layout))
sys.path.insert(0, "tests")
from test_fp8_kernels import layer_steps
out["layers"] = layer_steps(fast=True)
torch.save(out, sys.argv[1])
"""

def layer_steps(fast: bool) -> list[torch.Tensor]:
    """An FP8Linear and FP8Experts step (outputs and grads), on the CUDA path's plumbing (`fast`)
    or the CPU's. The fast one takes the kernels for quantization and grouped GEMMs, and the
    arguments the cuBLAS call would get (prepare_scaled_mm) computed by the reference that
    reads them as cuBLAS does. The child process runs it fast."""
    from torch import nn

    from posttrain.fp8 import FP8Experts, FP8Linear, backend, cache, gemm
    if fast:
        backend.choose_triton = lambda device, kind: backend.Choice(True)
        backend.choose_gemm = lambda a, b, device: backend.Choice(True)
        gemm._gemm_cuda = lambda a, b, dtype: gemm.scaled_mm_reference(
            gemm.prepare_scaled_mm(a, b))[: a.shape[0], : b.shape[0]].to(dtype)
    cache.clear()
    torch.manual_seed(0)
    linear = FP8Linear.from_linear(nn.Linear(200, 90))
    x = torch.randn(37, 200, requires_grad=True)
    y = linear(x)
    y.backward(torch.randn(y.shape))
    experts = nn.Module()
    experts.num_experts = 3
    experts.gate_up_proj = nn.Parameter(torch.randn(3, 256, 200) / 15)
    experts.down_proj = nn.Parameter(torch.randn(3, 200, 128) / 12)
    experts.act_fn = nn.SiLU()
    h = torch.randn(50, 200, requires_grad=True)
    index = torch.stack([torch.randperm(3)[:2] for _ in range(50)])
    z = FP8Experts(experts)(h, index, torch.rand(50, 2))
    z.backward(torch.randn(z.shape))
    return [t.detach() for t in (y, x.grad, linear.weight.grad, linear.bias.grad, z, h.grad,
                                 experts.gate_up_proj.grad, experts.down_proj.grad)]


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    path = tmp_path_factory.mktemp("kernels") / "out.pt"
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _RUN, str(path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(path, weights_only=False)


def _tensor(fields) -> FP8Tensor | None:
    return None if fields is None else FP8Tensor(*fields)


def _assert_same(got: FP8Tensor, want: FP8Tensor):
    """Same E4M3 bytes and scales on the reference's rows; the kernel's extra rows are zeros."""
    rows = want.data.shape[-2]
    assert got.shape == want.shape and got.block == want.block
    assert torch.equal(got.data[..., :rows, :].view(torch.uint8), want.data.view(torch.uint8))
    assert torch.equal(got.scale[..., :rows, :], want.scale)
    assert torch.all(got.data[..., rows:, :].float() == 0)


@pytest.mark.parametrize("pow2", [True, False])
def test_tile_quantize_kernel_is_the_reference_bit_for_bit(ran, pow2):
    x = ran["x"]
    rows, cols = map(_tensor, ran[("tiles", pow2)])
    _assert_same(rows, quantize(x, TILE, pow2))
    _assert_same(cols, quantize(x.t(), TILE, pow2))
    # Rows padded to 16 and scales outer-dim-major: the layout cuBLAS reads (fp8.layout).
    assert rows.data.shape == (208, 384) and rows.scale.stride() == (1, 208)
    none, cols_bf16 = map(_tensor, ran[("cols_bf16", pow2)])
    assert none is None
    _assert_same(cols_bf16, quantize(x.to(torch.bfloat16).t(), TILE, pow2))


@pytest.mark.parametrize("pow2", [True, False])
def test_block_quantize_kernel_is_the_reference_bit_for_bit(ran, pow2):
    w = ran["w"]
    blocks, blocks_t = map(_tensor, ran[("blocks", pow2)])
    want = quantize(w, WEIGHT_BLOCK, pow2)
    _assert_same(blocks, want)
    _assert_same(blocks_t, want.t())
    single, none = map(_tensor, ran[("block", pow2)])
    assert none is None
    _assert_same(single, quantize(w[1], WEIGHT_BLOCK, pow2))


@pytest.mark.parametrize("exact", [True, False])
def test_grouped_gemm_kernels_match_the_references(ran, exact):
    layout = grouped.group_rows(ran["experts"], 4, exact=exact)
    case = ran[("grouped", exact)]
    xq, xt, wq, dyt = (_tensor(case[k]) for k in ("xq", "xt", "wq", "dyt"))
    want = grouped.m_grouped_reference(xq, wq, layout)
    assert case["m"].shape == want.shape == (layout.rows, 130)
    assert calc_diff(case["m"], want) < 1e-10 and want.abs().sum() > 0
    no_expert = layout.tile_group.repeat_interleave(128) < 0
    assert no_expert.any() and torch.all(case["m"][no_expert] == 0)   # written as zeros
    want_w = grouped.k_grouped_reference(dyt, xt, layout)
    assert case["k"].shape == want_w.shape == (4, 130, 200)
    assert calc_diff(case["k"], want_w) < 1e-10
    assert torch.all(case["k"][1] == 0) and want_w[0].abs().sum() > 0   # the empty expert


def test_cuda_path_plumbing_equals_the_cpu_path(ran):
    """Kernel-quantized operands (rows padded, scales strided) through prepare_scaled_mm and the
    grouped kernels give the CPU path's results: nothing lost between quantize and GEMM."""
    want = layer_steps(fast=False)
    names = ["y", "dx", "dW", "db", "experts out", "experts dx", "dgate_up", "ddown"]
    for name, got, ref in zip(names, ran["layers"], want):
        assert got.shape == ref.shape, name
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6), name
        assert ref.abs().sum() > 0, name
