"""The FP8 weight cache (posttrain.fp8.cache): a weight is quantized once per optimizer step,
not once per forward or micro-batch, and never used stale."""

from __future__ import annotations

import pytest
import torch

from posttrain.fp8 import FP8Linear, cache


def _layer() -> FP8Linear:
    torch.manual_seed(0)
    return FP8Linear.from_linear(torch.nn.Linear(256, 384, bias=False))


def _fresh_output(layer: FP8Linear, x: torch.Tensor) -> torch.Tensor:
    """The layer's output with nothing cached."""
    cache.clear()
    return layer(x).detach()


@pytest.mark.parametrize("optim", [
    lambda p: torch.optim.AdamW(p, lr=1e-2, foreach=True),
    lambda p: torch.optim.AdamW(p, lr=1e-2, fused=True),   # does not bump the version counter
    lambda p: torch.optim.SGD(p, lr=1e-1),
])
def test_weight_is_quantized_once_per_optimizer_step(optim):
    layer = _layer()
    opt = optim(layer.parameters())
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    cache.clear()
    before = cache.STATS["quantized"]
    for _ in range(3):                                 # three micro-batches: one quantization
        layer(x).pow(2).mean().backward()
    assert cache.STATS["quantized"] - before == 1
    opt.step()
    opt.zero_grad()
    stepped = layer(x).detach()                        # a step: quantized again, not stale
    assert cache.STATS["quantized"] - before == 2
    assert torch.equal(stepped, _fresh_output(layer, x))


def test_an_in_place_write_to_the_weight_requantizes():
    layer = _layer()
    x = torch.randn(8, 256)
    old = layer(x).detach()
    with torch.no_grad():
        layer.weight.mul_(2.0)                         # e.g. load_state_dict, a manual edit
    new = layer(x).detach()
    assert torch.allclose(new, 2 * old, rtol=1e-6) and torch.equal(new, _fresh_output(layer, x))
