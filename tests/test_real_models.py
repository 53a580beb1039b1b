"""Real tokenizers, real chat templates, the full-size recipes: the path a user takes with a hub
model, on CPU.

`posttrain init-model` builds a tiny random-weight model of the real architecture around the real
Qwen2.5 / Llama-3.2 tokenizer in ../shared/tokenizers; the chain's recipes under
recipes/qwen2.5-1.5b/ and recipes/llama-3.2-1b/ then run through the CLI — sft → grpo → rejection
→ dpo → distill (traces) → eval for Qwen; a short sft → grpo for Llama (its template through
training and RL; the data stages run the same code on another template, and its sampling is in
the on-policy distillation and in `test_generation_stops_on_every_eos_of_the_model`) — and one
logit-level distillation a family, changed only by overrides that shrink steps, lengths, batch
sizes and data (small local files in the exact format of the hub sets the recipes name), that
turn off what needs a GPU (bf16, colocated vLLM, padding-free packing), and one that is not a
shrink: the cold start's optimizer (learning rate, Adam's beta2), so that random weights learn
their one R1-format answer for certain in a few dozen steps and the data stages have verified
samples to keep. DPO trains on set pairs from a preference file in the hub's format (a pair drawn
from the model's own samples needs a right and a wrong sample of one prompt, which a cold start
that has learned its answer does not give for certain; that route runs in tests/test_dpo.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from posttrain.answer_format import is_well_formed
from posttrain.cli import main as cli_main
from posttrain.data import prompt_messages
from posttrain.manifest import Manifest
from posttrain.rewards import REWARDS
from posttrain.rollout import Sampling, generate

ROOT = Path(__file__).resolve().parents[1]
TOKENIZERS = ROOT.parent / "shared" / "tokenizers"
FAMILIES = {"qwen2.5-1.5b": ("qwen2", "qwen2.5-instruct"),
            "llama-3.2-1b": ("llama", "llama-3.2-instruct")}
# Besides distilling traces, each family runs one logit-level method on its real tokenizer: Qwen's
# the logit match (its model vocab is wider than its tokenizer), Llama's on-policy distillation.
LOGIT_METHOD = {"qwen2.5-1.5b": "logits", "llama-3.2-1b": "on_policy"}
# The family that runs DPO and trace distillation too (the other's template is already through
# training, RL and sampling by then; those stages add no template-specific path).
FULL_CHAIN = "qwen2.5-1.5b"
# One question: a random-weight model learns its R1-format answer in a few dozen steps, so the
# data stages have verified samples to keep.
QUESTIONS = [("What is 1 plus 1?", "2")]


def _flow(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()


def _need(path: Path) -> Path:
    if not path.is_dir():
        pytest.skip(f"{path} not present (the shared tokenizers sit beside the checkout)")
    return path


def _trace(question: str, answer: str) -> str:
    return f"<think>\n{answer}\n</think>\n\n$\\boxed{{{answer}}}$"


def hub_format_files(root: Path) -> dict[str, Path]:
    """Local files shaped like the hub sets the recipes name: OpenR1-Math-220k (default config)
    and trl-lib/DeepMath-103K."""
    root.mkdir(parents=True, exist_ok=True)
    openr1, deepmath = root / "openr1.jsonl", root / "deepmath.jsonl"
    rows = [(q, a) for q, a in QUESTIONS for _ in range(8)]
    openr1.write_text("".join(json.dumps({
        "problem": q, "solution": f"1 + 1 = {a}. $\\boxed{{{a}}}$", "answer": a,
        "problem_type": "Algebra", "question_type": "math-word-problem", "source": "smoke",
        "uuid": f"{i:04d}", "is_reasoning_complete": [True], "generations": [_trace(q, a)],
        "correctness_math_verify": [True], "correctness_llama": None, "finish_reasons": None,
        "correctness_count": 1,
        "messages": [{"content": q, "role": "user"}, {"content": _trace(q, a), "role": "assistant"}],
    }) + "\n" for i, (q, a) in enumerate(rows)))
    deepmath.write_text("".join(json.dumps({"prompt": [{"content": q, "role": "user"}],
                                            "solution": a}) + "\n" for q, a in rows))
    # Preference pairs as trl-lib's preference sets hold them (prompt, chosen, rejected): the
    # right trace against a wrong answer, or against one that never closes its think block.
    prefs = root / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({
        "prompt": q, "chosen": _trace(q, a),
        "rejected": _trace(q, str(int(a) + 1)) if i % 2 else f"<think>\n{a}\n",
    }) + "\n" for i, (q, a) in enumerate(rows)))
    return {"openr1": openr1, "deepmath": deepmath, "prefs": prefs}


def _suite(path: Path) -> Path:
    """GSM8K from $POSTTRAIN_DATA_DIR (R1 prompting), a few prompts, short budget."""
    path.write_text(yaml.safe_dump({
        "name": "smoke", "answer_format": "boxed", "n": 2, "k": 2, "temperature": 0.6,
        "top_p": 0.95, "max_new_tokens": 16, "backend": "hf",
        "tasks": [{"name": "gsm8k", "path": "gsm8k/test.jsonl", "hub": "openai/gsm8k",
                   "config": "main", "split": "test", "prompt_column": "question",
                   "answer_column": "answer", "n_prompts": 2}]}))
    return path


def _cli(*argv: str) -> None:
    assert cli_main([str(a) for a in argv]) == 0, argv


def shrink(files: dict[str, Path], suite: Path) -> dict[str, dict[str, str]]:
    """Per stage: the overrides (steps, lengths, batch, data; GPU-only settings off)."""
    # The cold start evaluates after its stage (the hook every stage shares); the chain's end is
    # evaluated by `posttrain eval`.
    common = {"bf16": "false", "save_steps": "1000", "logging_steps": "1",
              "eval_suite": "null", "gradient_accumulation_steps": "1"}
    # Padding-free packing needs flash-attention kernels (GPU); on CPU it mixes examples.
    unpacked = {"packing": "false"}
    # The data stages sample cooler than the recipes' 0.6: the prompts share one text, so they
    # share one set of samples, 32 of them, which a cold start that has learned its answer gets
    # right (all 32, at T=0.3 up to 0.8). Sampled cool, they need no nucleus cut (HF's top-p
    # sorts the whole 128k-152k vocabulary at every token: most of the sampling time).
    sample = {"max_new_tokens": "24", "max_tokens": "24", "rollout_backend": "hf",
              "samples_per_prompt": "32", "temperature": "0.3", "top_p": "1.0"}
    openr1 = _flow([{"path": str(files["openr1"])}])
    prompts = _flow([{"path": str(files["openr1"]), "n": 4}])  # the sampling stages: 4 prompts
    return {
        # The rows are one example repeated: batch 1 learns what batch 4 would, at a quarter of
        # the cost (the 128k-152k vocab's logits are most of a step). Adam at lr 0.005 with
        # beta2 0.95 learns the answer with room to spare: over init seeds 0-4 every token was
        # right (greedy) from step 20-27 on (40 steps leave half that again), and by step 60 the
        # loss was 0.0007-0.0013. At lr 0.01 and beta2 0.999 (0.02 was worse) that took until
        # step 51 (seed 0) or 54 (seed 2), and seed 1 was not there by step 60 (loss 0.15): a
        # machine's float rounding could decide whether the data stages had anything to keep.
        "sft": {**common, **unpacked, "eval_suite": str(suite), "train_data": openr1,
                "max_steps": "40", "learning_rate": "0.005", "adam_beta2": "0.95",
                "lr_scheduler_type": "constant", "per_device_train_batch_size": "1",
                "max_length": "128", "dataset_num_proc": "null", "warmup_steps": "0",
                "num_train_epochs": "1"},
        "grpo": {**common, "prompt_data": openr1, "use_vllm": "false", "max_steps": "1",
                 "per_device_train_batch_size": "4", "num_generations": "4",
                 "max_completion_length": "24", "log_completions": "false"},
        "rejection": {"prompt_data": prompts, **sample},
        "dpo": {**common, "prompt_data": "[]", "train_data": _flow([{"path": str(files["prefs"])}]),
                "max_steps": "1", "per_device_train_batch_size": "2",
                "max_length": "128", "precompute_ref_batch_size": "2"},
        "distill": {**common, **unpacked, "teacher": "grpo", "prompt_data": prompts, **sample,
                    "max_steps": "2", "per_device_train_batch_size": "2", "max_length": "128"},
        # The student generates itself (no packing, no max_length in TRL's DistillationConfig).
        "distill_on_policy": {**common, "teacher": "grpo", "prompt_data": prompts,
                              "max_new_tokens": "24", "use_vllm": "false", "max_steps": "2",
                              "per_device_train_batch_size": "2"},
    }


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_full_size_recipes_end_to_end(family, tmp_path, runs_root):
    arch, tok_name = FAMILIES[family]
    tokenizer = _need(TOKENIZERS / tok_name)
    init = tmp_path / "init"
    _cli("init-model", "--arch", arch, "--tokenizer", tokenizer, "--out", init,
         "--num_attention_heads", "2", "--num_key_value_heads", "1", "--num_hidden_layers", "2")
    files = hub_format_files(tmp_path / "data")
    over = shrink(files, _suite(tmp_path / "suite.yaml"))
    run = f"real-{arch}"
    recipes = ROOT / "recipes" / family

    def stage(kind: str, recipe: str, shrunk: str | None = None, **extra: str) -> dict:
        args = {**over[shrunk or kind], **extra}
        t = time.time()
        _cli(kind, recipes / recipe, "--run", run,
             *[x for k, v in args.items() for x in (f"--{k}", v)])
        print(f"\n{family} {kind}: {time.time() - t:.0f}s")
        return Manifest(run).stage(yaml.safe_load((recipes / recipe).read_text())
                                   .get("name", kind))

    full = family == FULL_CHAIN
    # Only the full chain needs a cold start that has learned its answer (rejection and trace
    # distillation keep verified samples); elsewhere a few steps put the template through
    # training.
    sft = stage("sft", "sft.yaml", init_from=str(init), **({} if full else {"max_steps": "8"}))
    assert sft["status"] == "done" and sft["plan"]["recipe"]["answer_format"] == "boxed"
    assert sft["plan"]["recipe"]["system_prompt"] is None  # R1 prompting: no system turn
    assert "smoke" in sft["eval"]
    if full:  # what the data stages rest on: its greedy answer is the trace it trained on
        (greedy,), = generate(sft["output_dir"], [prompt_messages(QUESTIONS[0][0], None, "boxed")],
                              Sampling(n=1, temperature=0, max_new_tokens=24), cache=False,
                              progress=False, tokenizer_options={"answer_format": "boxed"})
        assert greedy.text == _trace(*QUESTIONS[0]), greedy.text
    grpo = stage("grpo", "grpo.yaml")
    assert grpo["status"] == "done" and grpo["plan"]["refs"]["init"]["stage"] == "sft"
    if full:
        rejection = stage("rejection", "rejection.yaml")
        assert rejection["metrics"]["n_kept"] > 0
        kept = [json.loads(line) for line in
                (Path(rejection["output_dir"]) / "train.jsonl").read_text().splitlines()]
        assert all(is_well_formed(r["messages"][-1]["content"], "boxed") for r in kept)
        assert all(REWARDS["accuracy"]([r["messages"][-1]["content"]], answer=[r["answer"]],
                                       answer_format=["boxed"]) == [1.0] for r in kept)
        assert kept[0]["messages"][0]["content"].endswith("within \\boxed{}.")  # R1's instruction
        dpo = stage("dpo", "dpo.yaml")
        pairs = len(files["prefs"].read_text().splitlines())
        assert dpo["status"] == "done" and dpo["metrics"]["pairs"] == pairs
        distill = stage("distill", "distill.yaml", init_from=str(init))
        assert distill["status"] == "done" \
            and distill["plan"]["refs"]["teacher"]["stage"] == "grpo"
        name = distill["plan"]["name"]
        _cli("eval", "--run", run, "--stage", name, "--suite", tmp_path / "suite.yaml")
        figures = Manifest(run).stage(name)["eval"]["smoke"]["gsm8k"]
        assert figures["n_prompts"] == 2 and 0 <= figures["pass@1"] <= 1
    # A logit method on the real tokenizer (teacher and student share the family's tokenizer):
    # the teacher scores every token of the traces, or of the student's own samples.
    if LOGIT_METHOD[family] == "logits":
        logits = stage("distill", "distill_logits.yaml", init_from=str(init))
        assert logits["status"] == "done" and logits["metrics"]["budget"]["teacher_scored"] == 4
    else:
        on_policy = stage("distill", "distill_on_policy.yaml", "distill_on_policy",
                          init_from=str(init))
        assert on_policy["status"] == "done"
        assert on_policy["metrics"]["budget"]["teacher_samples"] == 0
        assert on_policy["metrics"]["budget"]["student_generated_tokens"] > 0


R1_TEMPLATE = (  # as DeepSeek-R1-Distill templates do: the generation prompt opens the think block
    "{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<｜Assistant｜>{{ m['content'] }}<｜end▁of▁sentence｜>"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}")


def test_template_that_opens_think_gets_full_rewards():
    """A completion that starts inside the template-opened think block is well formed and right."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(_need(TOKENIZERS / "qwen2.5-instruct"))
    tok.chat_template = R1_TEMPLATE
    from posttrain.rollout import render_prompt
    prompt = render_prompt(tok, prompt_messages("What is 2 plus 3?", None, "boxed"))
    assert prompt.endswith("<think>\n") and "\\boxed{}" in prompt
    completion = "2 plus 3 is 5.\n</think>\n\nThe answer is $\\boxed{5}$."
    cols = {"answer": ["5"], "answer_format": ["boxed"]}
    assert REWARDS["format"]([completion], **cols) == [1.0]
    assert REWARDS["tag_count"]([completion], **cols) == [1.0]
    assert REWARDS["accuracy"]([completion], **cols) == [1.0]
    assert REWARDS["format"](["2 plus 3 is 5.\n</think>\n\nThe answer is 5."], **cols) == [0.0]


@pytest.mark.parametrize("tok_name", ["qwen2.5-instruct", "llama-3.2-instruct"])
def test_generation_stops_on_every_eos_of_the_model(tok_name, tmp_path):
    """Llama-3 stops on three ids (generation_config.json) and has no pad token; both backends
    cut a completion at any of them."""
    from posttrain.models import (
        init_model,
        load_model,
        load_tokenizer,
        saved_generation_config,
        stop_token_ids,
    )
    from posttrain.rollout.hf import decode
    out = init_model("llama" if "llama" in tok_name else "qwen2", _need(TOKENIZERS / tok_name),
                     tmp_path / "m", num_hidden_layers=1)
    tok = load_tokenizer(out)
    assert tok.pad_token_id is not None  # falls back to EOS where the tokenizer has none
    stops = stop_token_ids(saved_generation_config(out), tok)
    assert stops == stop_token_ids(load_model(out).generation_config, tok)
    if "llama" in tok_name:
        assert set(stops) == {128001, 128008, 128009}
    hello = tok("hello", add_special_tokens=False)["input_ids"]
    for stop in stops:
        c = decode(tok, [*hello, stop, *hello], stop_ids=stops)
        assert c.text == "hello" and c.finish_reason == "stop" and c.tokens == len(hello) + 1
