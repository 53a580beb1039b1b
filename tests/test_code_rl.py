"""Code RL end to end on the real path: the full-size MBPP GRPO recipe on a tiny random-weight
Qwen2 around the real Qwen2.5 tokenizer, MBPP rows from $POSTTRAIN_DATA_DIR, then the MBPP eval
suite. A random model writes no working Python, so what is checked is the wiring: TRL calls the
code reward with the rows' tests, the sandbox scores, the figures reach the manifest."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from posttrain.cli import main as cli_main
from posttrain.evaluate import load_suite, score_code, task_prompts
from posttrain.manifest import Manifest
from posttrain.rollout.types import Completion

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT.parent / "shared" / "tokenizers" / "qwen2.5-instruct"
MBPP = Path(os.environ.get("POSTTRAIN_DATA_DIR", "")) / "mbpp" / "test.jsonl"


def _cli(*argv) -> None:
    assert cli_main([str(a) for a in argv]) == 0, argv


@pytest.fixture(scope="module")
def mbpp_rows():
    if not MBPP.exists() or not TOKENIZER.is_dir():
        pytest.skip("needs MBPP under $POSTTRAIN_DATA_DIR and the shared Qwen2.5 tokenizer")
    return [json.loads(line) for line in MBPP.read_text().splitlines()]


def test_mbpp_suite_prompts_show_tests_and_score_references(mbpp_rows):
    suite = load_suite(ROOT / "eval" / "mbpp.yaml")
    suite.tasks[0].n_prompts = 20
    rows = task_prompts(suite.tasks[0], suite)
    user = rows[0]["prompt"][-1]["content"]
    assert mbpp_rows[0]["test_list"][0] in user and "```python" in user
    right = [[Completion(f"<think>\nok\n</think>\n\n```python\n{r['code']}\n```", 10, "stop")]
             for r in mbpp_rows[:20]]
    wrong = [[Completion("<think>\nok\n</think>\n\n```python\ndef f():\n    pass\n```", 10, "stop")]
             for _ in mbpp_rows[:20]]
    assert score_code(rows, right) == [[1.0]] * 20
    assert score_code(rows, wrong) == [[0.0]] * 20


def test_grpo_with_the_code_reward_then_the_mbpp_suite(mbpp_rows, tmp_path, runs_root):
    init = tmp_path / "init"
    _cli("init-model", "--arch", "qwen2", "--tokenizer", TOKENIZER, "--out", init,
         "--num_attention_heads", "2", "--num_key_value_heads", "1", "--num_hidden_layers", "2")
    suite = tmp_path / "mbpp_smoke.yaml"
    spec = yaml.safe_load((ROOT / "eval" / "mbpp.yaml").read_text())
    spec.update(name="mbpp_smoke", n=2, k=2, max_new_tokens=16, backend="hf")
    spec["tasks"][0]["n_prompts"] = 2
    suite.write_text(yaml.safe_dump(spec))
    data = yaml.safe_dump([{"path": str(MBPP), "n": 8}], default_flow_style=True).strip()
    over = {"init_from": init, "prompt_data": data, "use_vllm": "false", "bf16": "false",
            "gradient_checkpointing": "false", "max_steps": "1", "num_generations": "4",
            "per_device_train_batch_size": "4", "gradient_accumulation_steps": "1",
            "max_completion_length": "16", "log_completions": "false", "save_steps": "1000",
            "eval_suite": suite, "dynamic_sampling": "false"}
    _cli("grpo", ROOT / "recipes" / "qwen2.5-1.5b" / "grpo_mbpp.yaml", "--run", "code-rl",
         *[x for k, v in over.items() for x in (f"--{k}", v)])
    stage = Manifest("code-rl").stage("grpo_mbpp")
    assert stage["status"] == "done"
    assert stage["plan"]["recipe"]["answer_format"] == "code"
    logs = [json.loads(line) for line in
            (Path(stage["output_dir"]).parent / "logs.jsonl").read_text().splitlines()]
    scored = [r for r in logs if "rewards/code/mean" in r]
    assert scored and 0.0 <= scored[0]["rewards/code/mean"] <= 1.0
    assert scored[0]["rewards/code/unscorable_frac"] == 0.0  # every MBPP row has tests
    figures = stage["eval"]["mbpp_smoke"]["mbpp"]
    assert figures["n_prompts"] == 2 and "maj@2" not in figures and 0 <= figures["pass@1"] <= 1
