"""FP8 quantization, blockwise GEMM and FP8 training layers (posttrain.fp8) on CPU; the CUDA path
when a Hopper GPU is present."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from posttrain.fp8 import FP8Experts, FP8Linear, calc_diff, convert_to_fp8, fp8_gemm, quantize
from posttrain.fp8.gemm import gemm_reference, limited_precision_dot, round_mantissa
from posttrain.fp8.quantize import AMAX_FLOOR, E4M3_MAX, TILE, WEIGHT_BLOCK, retile_columns, to_e4m3


@pytest.mark.parametrize("value, expected", [
    (1.0, 1.0),
    (1.0625, 1.0),        # halfway between 1 and 1.125: ties to even (1.0)
    (1.1875, 1.25),       # halfway between 1.125 and 1.25: ties to even (1.25)
    (3.3, 3.25),          # 3 bits of mantissa: steps of 0.25 in [2, 4)
    (-3.3, -3.25),
    (448.0, 448.0),       # largest finite E4M3
    (500.0, 448.0),       # saturates instead of NaN
    (-1e6, -448.0),
    (2.0 ** -9, 2.0 ** -9),          # smallest subnormal
    (2.0 ** -11, 0.0),               # below half the smallest subnormal: zero
    (0.0, 0.0),
])
def test_e4m3_rounding(value, expected):
    assert to_e4m3(torch.tensor([value])).float().item() == expected


def test_tiles_scale_by_amax_and_pad():
    x = torch.randn(5, 300) * torch.logspace(-3, 3, 300)   # columns of very different range
    x[2, 128:256] = 0.0                                     # an all-zero tile
    q = quantize(x, TILE)
    assert q.data.dtype == torch.float8_e4m3fn and q.data.shape == (5, 384)   # 300 → 3 x 128
    assert q.scale.shape == (5, 3)
    assert torch.allclose(q.scale[0, 0], x[0, :128].abs().max() / E4M3_MAX)
    assert q.scale[2, 1] == AMAX_FLOOR / E4M3_MAX                 # floored, zeros stay zeros
    assert torch.all(q.data[:, 300:].float() == 0)                # padding is exact zero
    back = q.dequantize()
    assert back.shape == x.shape and torch.all(back[2, 128:256] == 0)
    # Per tile, the error is at most half an E4M3 step at the tile's max: amax * 2^-4.
    tile_amax = x.abs().view(5, -1).new_zeros(5, 3)
    for j in range(3):
        tile_amax[:, j] = x[:, j * 128:(j + 1) * 128].abs().amax(dim=1)
    err = (back - x).abs()
    for j in range(3):
        assert torch.all(err[:, j * 128:(j + 1) * 128] <= tile_amax[:, j:j + 1] * 2 ** -4 + 1e-12)


def test_gradient_sized_tiles_keep_full_precision():
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(0))
    unit = calc_diff(quantize(x).dequantize(), x)
    for magnitude in (1e-6, 1e-9, 1e-10):   # gradient tiles late in training
        small = x * magnitude
        assert calc_diff(quantize(small).dequantize(), small) == pytest.approx(unit, rel=0.05)


def test_weight_blocks_transpose_exactly():
    w = torch.randn(200, 130)
    q = quantize(w, WEIGHT_BLOCK)
    assert q.data.shape == (256, 256) and q.scale.shape == (2, 2)
    assert torch.equal(q.t().dequantize(), q.dequantize().t())


def test_gemm_meets_deepgemm_accuracy_on_gaussian_inputs():
    torch.manual_seed(0)
    x, w = torch.randn(256, 4096), torch.randn(256, 4096)
    out = fp8_gemm(quantize(x, TILE), quantize(w, WEIGHT_BLOCK))
    assert calc_diff(out, x @ w.t()) < 1e-3


@pytest.mark.parametrize("m, n, k", [(1, 1, 1), (37, 90, 200), (130, 129, 257)])
def test_gemm_is_exact_blockwise_arithmetic(m, n, k):
    """The reference equals a float64 matmul of the dequantized operands: the only rounding is
    E4M3 (in quantize) and FP32 summation."""
    a, b = quantize(torch.randn(m, k), TILE), quantize(torch.randn(n, k), WEIGHT_BLOCK)
    ref = a.dequantize(torch.float64) @ b.dequantize(torch.float64).t()
    out = gemm_reference(a, b)
    assert out.shape == (m, n)
    assert torch.allclose(out.double(), ref, rtol=1e-5, atol=1e-4)


def test_promotion_every_128_bounds_the_accumulation_error():
    torch.manual_seed(0)
    k = 4096
    a, b = quantize(torch.randn(32, k)).dequantize(), quantize(torch.randn(32, k)).dequantize()
    ref = a.double() @ b.double().t()

    def err(c):
        return float((c.double() - ref).norm() / ref.norm())

    limited = err(limited_precision_dot(a, b, bits=14))
    promoted = err(limited_precision_dot(a, b, bits=14, promote_every=128))
    assert limited > 10 * promoted
    assert round_mantissa(torch.tensor([1.0 + 2 ** -20]), 14).item() == 1.0


def test_fp8_linear_all_three_gemms_track_fp32():
    torch.manual_seed(0)
    ref = nn.Linear(200, 90)
    fp8 = FP8Linear.from_linear(ref)
    assert fp8.weight is ref.weight                       # master weight shared, FP32
    x = torch.randn(3, 50, 200, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    g = torch.randn(3, 50, 90)
    y = fp8(x)
    y.backward(g)
    w_grad, b_grad = ref.weight.grad.clone(), ref.bias.grad.clone()
    ref.zero_grad()
    y_ref = ref(x_ref)
    y_ref.backward(g)
    assert calc_diff(y, y_ref) < 2e-3                      # Fprop
    assert calc_diff(x.grad, x_ref.grad) < 2e-3            # Dgrad
    assert calc_diff(w_grad, ref.weight.grad) < 2e-3       # Wgrad (column-tiled activations)
    assert torch.allclose(b_grad, ref.bias.grad)
    assert w_grad.dtype == torch.float32


def _sqnr_db(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (x - ref).pow(2).sum()))


def test_fp8_linear_signal_to_noise_meets_torchao_bar():
    """torchao's bar for the same blockwise recipe, measured its way (a Linear of realistic
    width, Gaussian tokens, the output's sum backpropagated): >= 25 dB on the output, >= 30 dB
    on the gradients (here the weight's gradient too, which torchao's test leaves out)."""
    torch.manual_seed(0)
    ref = nn.Linear(1024, 1024, bias=False)
    fp8 = FP8Linear.from_linear(nn.Linear(1024, 1024, bias=False))
    fp8.weight = nn.Parameter(ref.weight.detach().clone())
    x = torch.randn(2, 256, 1024, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = fp8(x), ref(x_ref)
    y.sum().backward()
    y_ref.sum().backward()
    assert _sqnr_db(y.detach(), y_ref.detach()) >= 25
    assert _sqnr_db(x.grad, x_ref.grad) >= 30
    assert _sqnr_db(fp8.weight.grad, ref.weight.grad) >= 30


def test_power_of_two_scales_retile_without_a_second_rounding():
    """DeepSeek-V3 §3.3.3: with power-of-two scales, re-tiling FP8 values along the other axis
    adds no error (each value's exponent shifts, its mantissa stays); with amax/448 scales it
    rounds them again."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 384, generator=g) * torch.rand(256, 1, generator=g).add(0.5)
    change = {}
    for pow2 in (True, False):
        q = quantize(x, TILE, pow2)
        moved = retile_columns(q, pow2).dequantize() - q.dequantize().t()
        change[pow2] = (float(moved.norm() / x.norm()), float((moved != 0).float().mean()))
        # Quantizing FP8 values again with the same tiles changes nothing either way.
        assert torch.equal(quantize(q.dequantize(), TILE, pow2).dequantize(), q.dequantize())
    # Power of two: only the few values the new tile's larger scale pushes below E4M3's normal
    # range move, by a subnormal step; amax/448: nearly every value is rounded a second time.
    assert change[True][0] < 1e-6 and change[True][1] < 1e-3
    assert change[False][0] > 1e-2 and change[False][1] > 0.5


def test_wgrad_operands_are_quantized_once():
    """Wgrad multiplies dyᵀ and xᵀ each quantized once, from high precision, along the tokens:
    its result is exactly the reference GEMM of those two single quantizations, and x's error
    there is a single quantization's, not a re-tiling's of the Fprop copy."""
    from posttrain.fp8.linear import FP8Config, _FP8LinearFn

    torch.manual_seed(2)
    x = torch.randn(256, 512) * torch.rand(256, 1).add(0.1)
    w = torch.randn(384, 512, requires_grad=True)
    g = torch.randn(256, 384) * 1e-3
    _FP8LinearFn.apply(x, w, FP8Config()).backward(g)
    once = quantize(x.t(), TILE, True)
    want = gemm_reference(quantize(g.t(), TILE, True), once)
    assert torch.equal(w.grad, want)
    err = lambda q: float((q.dequantize() - x.t()).norm() / x.norm())  # noqa: E731
    assert err(once) < err(retile_columns(quantize(x, TILE, False), False))


def test_retile_columns_gives_token_axis_tiles():
    x = quantize(torch.randn(300, 64), TILE)
    xt = retile_columns(x)
    assert xt.shape == (64, 300) and xt.scale.shape == (64, 3)
    assert calc_diff(xt.dequantize(), x.dequantize().t()) < 1e-3


def _tiny_moe():
    from transformers import AutoConfig, AutoModelForCausalLM

    from posttrain.models import TINY_CONFIGS
    cfg = AutoConfig.for_model("deepseek_v3", vocab_size=64, **TINY_CONFIGS["deepseek_v3"])
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def test_convert_to_fp8_swaps_only_eligible_layers():
    model = _tiny_moe()
    ids = torch.randint(0, 64, (2, 24))
    with torch.no_grad():
        before = model(ids).logits
    keys = list(model.state_dict())
    counts = convert_to_fp8(model)
    assert counts == {"linear": 4 * 3 + 3 + 3 * 2, "experts": 2}   # attn, dense MLP, shared
    assert list(model.state_dict()) == keys                         # checkpoints unchanged
    assert type(model.lm_head) is nn.Linear
    assert type(model.model.embed_tokens) is nn.Embedding
    moe = model.model.layers[1].mlp
    assert isinstance(moe.experts, FP8Experts) and not isinstance(moe.gate, FP8Linear)
    assert isinstance(model.model.layers[0].self_attn.q_proj, FP8Linear)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad():
        after = model(ids).logits
    assert 0 < calc_diff(after, before) < 5e-3
    model(ids, labels=ids).loss.backward()
    assert moe.experts.gate_up_proj.grad is not None and moe.experts.gate_up_proj.grad.abs().sum() > 0


@pytest.mark.skipif(not torch.cuda.is_available()
                    or torch.cuda.get_device_capability() < (9, 0),
                    reason="needs an NVIDIA GPU with FP8 tensor cores (Hopper or newer); the CPU "
                           "reference path is what the other tests check")
@pytest.mark.parametrize("a_block, b_block", [(TILE, WEIGHT_BLOCK), (TILE, TILE)])
def test_cuda_blockwise_path_matches_reference(a_block, b_block):
    torch.manual_seed(0)
    a = quantize(torch.randn(200, 1000, device="cuda"), a_block)
    b = quantize(torch.randn(384, 1000, device="cuda"), b_block)
    from posttrain.fp8 import backend
    assert backend.choose_gemm(a_block, b_block, a.data.device).fast, \
        f"cuBLAS blockwise scaled_mm refused: {backend.FALLBACKS or backend._probes}"
    assert calc_diff(fp8_gemm(a, b), gemm_reference(a, b)) < 1e-5


@pytest.mark.parametrize("gemm", ["fprop", "dgrad", "wgrad"])
def test_fp8_config_puts_only_the_chosen_gemm_in_fp8(gemm):
    from posttrain.fp8 import FP8Config
    torch.manual_seed(0)
    ref = nn.Linear(256, 256, bias=False)
    only = FP8Linear.from_linear(ref, FP8Config(**{g: g == gemm for g in ("fprop", "dgrad", "wgrad")}))
    x = torch.randn(64, 256, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    g = torch.randn(64, 256)
    y = only(x)
    y.backward(g)
    w_grad = ref.weight.grad.clone()
    ref.zero_grad()
    y_ref = ref(x_ref)
    y_ref.backward(g)
    got = {"fprop": calc_diff(y, y_ref), "dgrad": calc_diff(x.grad, x_ref.grad),
           "wgrad": calc_diff(w_grad, ref.weight.grad)}
    assert 0 < got[gemm] < 2e-3                                  # the FP8 one: quantized
    assert all(v < 1e-10 for k, v in got.items() if k != gemm)   # the others: FP32


def test_emulated_accumulator_in_training_and_promotion_bound_it():
    from posttrain.fp8 import FP8Config
    torch.manual_seed(0)
    ref = nn.Linear(4096, 64, bias=False)
    x = torch.randn(32, 4096)
    # Against the same FP8 operands summed exactly (FP32 per 128-block): the accumulator's error.
    exact = FP8Linear.from_linear(ref, FP8Config())(x).detach().double()
    errors = {}
    for name, cfg in {"promoted": FP8Config(accumulator_bits=14),
                      "unpromoted": FP8Config(accumulator_bits=14, promote_every=None)}.items():
        y = FP8Linear.from_linear(ref, cfg)(x)
        errors[name] = float((y.detach().double() - exact).norm() / exact.norm())
    assert 0 < errors["promoted"] < 1e-3
    assert errors["unpromoted"] > 5 * errors["promoted"]


def test_fp8_config_keeps_named_layers_and_rejects_bad_keys():
    from posttrain.errors import UserError
    from posttrain.fp8 import FP8Config
    model = _tiny_moe()
    counts = convert_to_fp8(model, FP8Config.parse({"keep": ["self_attn"]}))
    assert counts == {"linear": 3 + 3 * 2, "experts": 2}
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    for bad, message in [({"fprop": True, "bogus": 1}, "unknown key bogus"),
                         ({"accumulator_bits": 40}, "accumulator_bits must be in"),
                         ({"promote_every": 100}, "multiple of 32"), ("yes", "expected true")]:
        with pytest.raises(UserError, match=message):
            FP8Config.parse(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_gpu_check_says_so_in_one_line_without_cuda():
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert proc.stdout.strip().splitlines() == [
        "gpu-check: no CUDA device on this machine; nothing to check here (run it on a GPU)"]


def test_recipe_fp8_mapping_is_checked_and_an_empty_one_means_on():
    from posttrain.errors import UserError
    from posttrain.recipe import load_recipe
    from posttrain.stages.sft import Recipe
    assert load_recipe(Recipe, "recipes/tiny/sft.yaml", {"fp8": "{}"}).fp8 is True
    assert load_recipe(Recipe, "recipes/tiny/sft.yaml", {"fp8": "{wgrad: false}"}).fp8 == {"wgrad": False}
    with pytest.raises(UserError, match="fp8: unknown key wgard"):
        load_recipe(Recipe, "recipes/tiny/sft.yaml", {"fp8": "{wgard: false}"})


def test_gpu_check_names_carried_packages_dill_would_pickle_by_value(tmp_path, monkeypatch):
    """On an offline GPU image the carried wheels must sit under a `site-packages` path; the
    check names any that do not (dill pickles those by value and datasets' map breaks)."""
    import importlib.util
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", script)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    assert gpu_check.pickled_by_value() == []          # this venv: all in site-packages
    for folder in ("carried", "lib/site-packages"):
        pkg = tmp_path / folder / "fake_carried_pkg"
        pkg.mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
    monkeypatch.setattr(gpu_check, "CARRIED", ("fake_carried_pkg",))
    for folder, flagged in (("carried", True), ("lib/site-packages", False)):
        monkeypatch.syspath_prepend(str(tmp_path / folder))
        sys.modules.pop("fake_carried_pkg", None)
        assert bool(gpu_check.pickled_by_value()) is flagged, folder
    sys.modules.pop("fake_carried_pkg", None)


def test_fp8_linear_returns_autocasts_dtype_and_fp32_master_grads():
    """Under BF16 autocast an FP8 layer hands on BF16 activations (bias included), as nn.Linear
    does, while its FP32 master weight gets an FP32 gradient."""
    torch.manual_seed(0)
    layer = FP8Linear.from_linear(nn.Linear(256, 128))
    x = torch.randn(16, 256, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32
    assert layer.weight.dtype == torch.float32
