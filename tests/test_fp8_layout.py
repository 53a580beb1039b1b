"""The padding and scale-layout rules of the cuBLAS FP8 path (posttrain.fp8.layout), on CPU:
against a hand-made table for every width we train, against torch's own shape checks (its meta
kernel of scaled_mm), and for not changing a value; and that a GEMM falling back to the reference
on a CUDA device says so once per layer shape."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from posttrain.fp8 import backend
from posttrain.fp8.gemm import fp8_gemm, gemm_reference, prepare_scaled_mm, scaled_mm_reference
from posttrain.fp8.layout import TILE, WEIGHT_BLOCK, linear_layouts
from posttrain.fp8.quantize import quantize

# width -> (padded to 128, its 128-blocks, the blocks rounded up to a multiple of 4), by hand.
WIDTHS = {
    256: (256, 2, 4), 512: (512, 4, 4), 576: (640, 5, 8), 1024: (1024, 8, 8),
    1536: (1536, 12, 12), 2048: (2048, 16, 16), 4096: (4096, 32, 32), 7168: (7168, 56, 56),
    8192: (8192, 64, 64), 8960: (8960, 70, 72), 11008: (11008, 86, 88),
    14336: (14336, 112, 112), 16384: (16384, 128, 128), 18432: (18432, 144, 144),
    24576: (24576, 192, 192), 32768: (32768, 256, 256),
}
# (model, layer, in, out): the Linear shapes of the full-size recipes and of DeepSeek-V3.
LAYERS = [
    ("qwen2.5-1.5b", "q/o_proj", 1536, 1536), ("qwen2.5-1.5b", "k/v_proj", 1536, 256),
    ("qwen2.5-1.5b", "gate/up_proj", 1536, 8960), ("qwen2.5-1.5b", "down_proj", 8960, 1536),
    ("llama-3.2-1b", "q/o_proj", 2048, 2048), ("llama-3.2-1b", "k/v_proj", 2048, 512),
    ("llama-3.2-1b", "gate/up_proj", 2048, 8192), ("llama-3.2-1b", "down_proj", 8192, 2048),
    ("llama-2-7b", "up_proj", 4096, 11008), ("llama-2-7b", "down_proj", 11008, 4096),
    ("llama-3-8b", "up_proj", 4096, 14336), ("llama-3-8b", "down_proj", 14336, 4096),
    ("llama-3-8b", "k/v_proj", 4096, 1024),
    ("deepseek-v3", "q_a_proj", 7168, 1536), ("deepseek-v3", "q_b_proj", 1536, 24576),
    ("deepseek-v3", "kv_a_proj_with_mqa", 7168, 576), ("deepseek-v3", "kv_b_proj", 512, 32768),
    ("deepseek-v3", "o_proj", 16384, 7168), ("deepseek-v3", "dense up_proj", 7168, 18432),
    ("deepseek-v3", "dense down_proj", 18432, 7168), ("deepseek-v3", "expert up", 7168, 2048),
    ("deepseek-v3", "expert down", 2048, 7168),
]
TOKENS = {8192: (8192, 64), 1000: (1008, 8)}   # tokens -> (rows padded to 16, 128-blocks)


@pytest.mark.parametrize("tokens", sorted(TOKENS))
@pytest.mark.parametrize("model, layer, d_in, d_out", LAYERS)
def test_layouts_of_every_width_follow_the_rule_table(model, layer, d_in, d_out, tokens):
    lay = linear_layouts(tokens, d_in, d_out)
    rows, token_blocks = TOKENS[tokens]
    pad_in, kb_in, l4_in = WIDTHS[d_in]
    pad_out, kb_out, l4_out = WIDTHS[d_out]
    fprop, dgrad, wgrad = lay["fprop"], lay["dgrad"], lay["wgrad"]
    assert (fprop.m, fprop.n, fprop.k) == (rows, pad_out, pad_in)
    assert fprop.scale_a.shape == (rows, kb_in) and fprop.scale_a.stride == (1, rows)
    assert fprop.scale_b.shape == (l4_in, pad_out // 128) and fprop.scale_b.stride == (1, l4_in)
    assert (dgrad.m, dgrad.n, dgrad.k) == (rows, pad_in, pad_out)
    assert dgrad.scale_b.shape == (l4_out, pad_in // 128) and dgrad.scale_b.stride == (1, l4_out)
    # Wgrad: both operands in tiles along the tokens; rows are feature counts, padded to 16.
    assert (wgrad.m, wgrad.n, wgrad.k) == (d_out, d_in, token_blocks * 128)
    assert wgrad.scale_a.shape == (d_out, token_blocks) and wgrad.scale_a.stride == (1, d_out)
    assert wgrad.scale_b.shape == (d_in, token_blocks) and wgrad.scale_b.stride == (1, d_in)


def _meta_scaled_mm(lay, scale_a_stride=None, scale_b_shape=None):
    """torch's own checks of scaled_mm (its meta kernel) on tensors of layout `lay`."""
    from torch.nn.functional import ScalingType as S

    def tensor(shape, stride, dtype=torch.float32):
        return torch.empty_strided(shape, stride, dtype=dtype, device="meta")

    a = tensor((lay.m, lay.k), (lay.k, 1), torch.float8_e4m3fn)
    b = tensor((lay.k, lay.n), (1, lay.k), torch.float8_e4m3fn)
    sa = tensor(lay.scale_a.shape, scale_a_stride or lay.scale_a.stride)
    shape_b = scale_b_shape or lay.scale_b.shape
    sb = tensor(shape_b, (1, shape_b[0]))
    recipe_b = S.BlockWise128x128 if lay.b_block == WEIGHT_BLOCK else S.BlockWise1x128
    return F.scaled_mm(a, b, sa, S.BlockWise1x128, sb, recipe_b, output_dtype=torch.float32)


@pytest.mark.skipif(not hasattr(F, "scaled_mm"), reason="torch has no F.scaled_mm")
@pytest.mark.parametrize("model, layer, d_in, d_out", LAYERS)
def test_layouts_pass_torchs_own_scaled_mm_checks(model, layer, d_in, d_out):
    for name, lay in linear_layouts(8192, d_in, d_out).items():
        assert _meta_scaled_mm(lay).shape == (lay.m, lay.n), name


@pytest.mark.skipif(not hasattr(F, "scaled_mm"), reason="torch has no F.scaled_mm")
def test_torch_rejects_the_layouts_that_failed_on_the_h200():
    """The checks above can fail: the unpadded K-blocks of an 11008-wide Dgrad and Wgrad's
    transposed B scales are what cuBLAS rejected on the H200 run."""
    lay = linear_layouts(8192, 4096, 11008)
    with pytest.raises(RuntimeError, match=r"scale b must have shape \[88"):
        _meta_scaled_mm(lay["dgrad"], scale_b_shape=(86, 32))
    wgrad = lay["wgrad"]
    with pytest.raises(RuntimeError, match="1x128 x 1x128"):
        _meta_scaled_mm(wgrad, scale_a_stride=(wgrad.scale_a.shape[1], 1))


# (m, k, n): rows not a multiple of 16, K-blocks not a multiple of 4, B rows not of 128 / 16.
AWKWARD = [(200, 640, 300), (37, 130, 90), (1, 128, 1), (256, 1024, 384)]


@pytest.mark.parametrize("m, k, n", AWKWARD)
@pytest.mark.parametrize("b_block", [WEIGHT_BLOCK, TILE])
def test_padding_and_layout_change_no_value(m, k, n, b_block):
    """What the CUDA path passes to scaled_mm, computed by the reference GEMM reading the scales
    as cuBLAS does, equals the unpadded reference GEMM exactly."""
    g = torch.Generator().manual_seed(m + n)
    a = quantize(torch.randn(m, k, generator=g) * 3, TILE, True)
    b = quantize(torch.randn(n, k, generator=g), b_block, True)
    args = prepare_scaled_mm(a, b)
    assert args.mat_a.shape == (args.layout.m, args.layout.k) and args.layout.m % 16 == 0
    assert args.mat_b.stride()[0] == 1    # column-major
    assert tuple(args.scale_b.shape) == args.layout.scale_b.shape
    padded = scaled_mm_reference(args)
    assert torch.equal(padded[:m, :n], gemm_reference(a, b))
    assert torch.all(padded[m:] == 0)


def test_a_gemm_that_falls_back_on_cuda_says_so_once_per_shape(monkeypatch):
    """Forced decision (the CPU has no cuBLAS path to refuse): the GEMM still computes the
    reference result, warns once naming the layer and shape, and records it for gpu_check."""
    backend.reset()
    monkeypatch.setattr(backend, "choose_gemm",
                        lambda a, b, device: backend.Choice(False, "forced for the test"))
    a = quantize(torch.randn(200, 640), TILE, True)
    b = quantize(torch.randn(300, 640), WEIGHT_BLOCK, True)
    with pytest.warns(RuntimeWarning, match=r"Linear 640->300 Fprop \(200x640 · \(300x640\)ᵀ"):
        out = fp8_gemm(a, b, name="Linear 640->300 Fprop")
    assert torch.equal(out, gemm_reference(a, b))
    with warnings.catch_warnings():
        warnings.simplefilter("error")        # the same shape again: recorded, not re-warned
        fp8_gemm(a, b, name="Linear 640->300 Fprop")
    assert list(backend.FALLBACKS.values()) == ["forced for the test"]
    backend.reset()


def test_the_cpu_reference_path_is_not_a_fallback():
    """On a CPU the reference is the design: a training step warns nothing, records nothing."""
    from posttrain.fp8 import FP8Linear
    backend.reset()
    layer = FP8Linear.from_linear(torch.nn.Linear(200, 90))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(torch.randn(3, 7, 200)).sum().backward()
    assert backend.FALLBACKS == {} and layer.weight.grad is not None


def test_every_gemm_of_a_layer_names_itself_when_it_falls_back(monkeypatch):
    from posttrain.fp8 import FP8Linear
    backend.reset()
    monkeypatch.setattr(backend, "choose_gemm",
                        lambda a, b, device: backend.Choice(False, "forced for the test"))
    layer = FP8Linear.from_linear(torch.nn.Linear(200, 90))
    with pytest.warns(RuntimeWarning) as record:
        for _ in range(2):
            layer(torch.randn(50, 200, requires_grad=True)).sum().backward()
    names = sorted(str(w.message).split(" of ")[1].split(" (")[0] for w in record)
    assert names == ["Linear 200->90 Dgrad", "Linear 200->90 Fprop", "Linear 200->90 Wgrad"]
    backend.reset()
