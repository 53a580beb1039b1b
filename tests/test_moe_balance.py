"""Auxiliary-loss-free MoE balancing (posttrain.moe_balance) on a tiny DeepSeek-V3 model: the
bias moves overloaded experts down and underloaded ones up, the sequence-wise loss reaches the
router through autograd, and config errors are one line."""

from __future__ import annotations

import pytest
import torch

from posttrain.errors import UserError
from posttrain.moe_balance import BalanceConfig, MoEBalanceCallback, routers, sequence_balance_loss


def _tiny_moe():
    from transformers import AutoConfig, AutoModelForCausalLM

    from posttrain.models import TINY_CONFIGS
    cfg = AutoConfig.for_model("deepseek_v3", vocab_size=64, **TINY_CONFIGS["deepseek_v3"])
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


@pytest.mark.parametrize("value, message", [
    ({"gamma": -0.1}, "moe_balance.gamma must be a number >= 0"),
    ({"alpha": "big"}, "moe_balance.alpha must be a number >= 0"),
    ({"gama": 0.1}, r"moe_balance: unknown key\(s\) \['gama'\]"),
])
def test_config_errors(value, message):
    with pytest.raises(UserError, match=message):
        BalanceConfig.parse(value)


def test_recipe_rejects_bad_backend_settings():
    from posttrain.recipe import build_recipe
    from posttrain.stages.sft import Recipe
    base = {"stage": "sft", "init_from": "x", "train_data": [{"task": "arithmetic", "n": 4}]}
    assert build_recipe(Recipe, {**base, "fp8": True, "ema": {"decay": 0.99},
                                 "moe_balance": {"gamma": 0.001}}).fp8 is True
    with pytest.raises(UserError, match="ema.decay"):
        build_recipe(Recipe, {**base, "ema": {"decay": 2}})
    with pytest.raises(UserError, match="fp8: expected true/false or a mapping"):
        build_recipe(Recipe, {**base, "fp8": "yes"})


def test_bias_update_moves_load_towards_balance():
    model = _tiny_moe()
    found = routers(model)
    assert list(found) == ["model.layers.1.mlp.gate", "model.layers.2.mlp.gate"]
    cb = MoEBalanceCallback(BalanceConfig(gamma=0.01, alpha=0.0))
    cb.attach(model)
    model.train()
    with torch.no_grad():
        model(torch.randint(0, 64, (4, 32)))
    counts = {n: c.clone() for n, c in cb._counts.items()}
    assert all(c.sum() == 4 * 32 * 2 for c in counts.values())       # top-2 of every token
    ratios = cb.update(step=1)
    for (name, router), ratio in zip(found.items(), ratios):
        c, bias = counts[name], router.e_score_correction_bias
        assert ratio == pytest.approx(float(c.max() / c.mean()))
        assert torch.all(bias[c > c.mean()] == -0.01) and torch.all(bias[c < c.mean()] == 0.01)
        assert cb._counts[name].sum() == 0                           # reset for the next step
    model.eval()
    with torch.no_grad():                                            # eval passes do not count
        model(torch.randint(0, 64, (2, 8)))
    assert all(c.sum() == 0 for c in cb._counts.values())
    cb.detach()


def test_sequence_loss_gradient_reaches_the_router():
    model = _tiny_moe()
    router = model.model.layers[1].mlp.gate
    cb = MoEBalanceCallback(BalanceConfig(gamma=0.0, alpha=0.5))
    cb.attach(model)
    cb._handles.pop().remove()      # only layer 1 adds its loss: its router gets one extra term
    model.train()
    ids = torch.randint(0, 64, (3, 16))
    captured = {}
    handle = router.register_forward_hook(
        lambda m, i, o: captured.update(hidden=i[0].detach(), idx=o[2].detach()))
    model(ids).logits.sum().backward()
    with_aux = router.weight.grad.clone()
    handle.remove()
    cb.detach()
    model.zero_grad()
    model(ids).logits.sum().backward()
    without = router.weight.grad.clone()
    # The difference is exactly the gradient of α · L_Bal of that layer's routing.
    w = router.weight.detach().clone().requires_grad_()
    logits = captured["hidden"].view(-1, w.shape[1]) @ w.t()
    (0.5 * sequence_balance_loss(logits, captured["idx"], 3, router.top_k)).backward()
    assert torch.allclose(with_aux - without, w.grad, atol=1e-6)
    assert w.grad.abs().sum() > 0


def test_balance_loss_is_minimal_when_balanced():
    n_exp, top_k, tokens = 4, 2, 8
    logits = torch.zeros(tokens, n_exp)                       # equal affinities
    balanced = torch.tensor([[0, 1], [2, 3]] * 4)
    skewed = torch.tensor([[0, 1]] * tokens)
    assert sequence_balance_loss(logits, balanced, 1, top_k).item() == pytest.approx(1.0)
    assert sequence_balance_loss(logits, skewed, 1, top_k).item() == pytest.approx(1.0)
    peaked = torch.tensor([[3.0, 3.0, -3.0, -3.0]]).repeat(tokens, 1)
    assert sequence_balance_loss(peaked, skewed, 1, top_k) > sequence_balance_loss(
        peaked, balanced, 1, top_k)
