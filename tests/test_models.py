"""The tiny local world's tokenizer and models, and loading errors."""

from __future__ import annotations

import pytest
import torch

from posttrain.answer_format import completion as format_completion
from posttrain.data import prompt_messages
from posttrain.errors import UserError
from posttrain.models import (
    TAG_TOKENS,
    TINY_CONFIGS,
    build_tiny_model,
    load_model,
    load_tokenizer,
    shared_tokenizer,
    train_tokenizer,
)
from posttrain.tasks import TASKS


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    corpus = [f"{r.prompt} {r.answer} {r.trace}" for name in TASKS
              for r in TASKS[name].generate("train", 300, seed=0)]
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(corpus, out, vocab_size=320)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


def test_shared_tokenizer_loads_once_until_the_dir_changes(tok_dir, tmp_path):
    import shutil
    own = tmp_path / "tok"
    shutil.copytree(tok_dir, own)
    first = shared_tokenizer(own)
    assert shared_tokenizer(own) is first  # readers share one load
    assert shared_tokenizer(own, chat_template="r1_zero") is not first  # other options, other key
    assert load_tokenizer(own) is not first  # a trainer's own, free to change
    first.save_pretrained(own)  # the dir rewritten (as a stage rewrites its output)
    again = shared_tokenizer(own)
    assert again is not first and again.get_vocab() == first.get_vocab()


@pytest.mark.parametrize("text", [
    "What is 056+504?",
    "<think>6+4+0=10 c1|5+0+1=6 c0</think><answer>560</answer>",
    "Use 2 3 5 to make 10. (2+3)*2 × ÷",
    "unseen words, émigré, 数学, emoji 🙂, tabs\tand\nnewlines",
])
def test_tokenizer_round_trip(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == text  # tags are kept: rewards need them


def test_tags_are_single_tokens(tok):
    for tag in TAG_TOKENS:
        ids = tok.encode(tag, add_special_tokens=False)
        assert len(ids) == 1, tag
        # ...also glued to neighbouring text.
        assert ids[0] in tok.encode(f"x5{tag}7y", add_special_tokens=False)


def test_digits_are_one_token_each(tok):
    assert len(tok.encode("1234567", add_special_tokens=False)) == 7


def test_special_tokens_and_padding(tok):
    assert tok.pad_token and tok.eos_token and tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "left"  # generation pads on the left


def test_chat_template_and_assistant_mask(tok):
    answer = format_completion("2+2+0=4 c0", "4")
    msgs = prompt_messages("What is 2+2?", "Be brief.") + [{"role": "assistant", "content": answer}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == ("<|system|>Be brief.<|end|><|user|>What is 2+2?<|end|>"
                    f"<|assistant|>{answer}<|end|>")
    prompt = tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>") and text.startswith(prompt)
    enc = tok.apply_chat_template(msgs, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    assert len(ids) == len(mask) and 0 < sum(mask) < len(mask)
    # Loss falls on exactly the assistant's reply and its end token, nothing of the prompt.
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == answer + "<|end|>"
    assert tok.decode([i for i, m in zip(ids, mask) if not m]) == prompt


def test_reasoning_content_becomes_the_think_block(tok):
    msgs = [{"role": "user", "content": "q"},
            {"role": "assistant", "reasoning_content": "step", "content": "<answer>1</answer>"}]
    assert tok.apply_chat_template(msgs, tokenize=False).endswith(
        "<|assistant|><think>step</think><answer>1</answer><|end|>")


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_tiny_arch_builds_and_runs(tok, arch, tmp_path):
    model = build_tiny_model(arch, tok, seed=0)
    assert model.config.model_type == arch
    batch = tok(["What is 1+2?", "Use 2 3 to make 5."], return_tensors="pt", padding=True)
    out = model(**batch, labels=batch["input_ids"])
    assert out.logits.shape == (*batch["input_ids"].shape, len(tok))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in model.get_input_embeddings().parameters())
    model.save_pretrained(tmp_path)
    again = load_model(tmp_path)
    with torch.no_grad():
        assert torch.allclose(again(**batch).logits, model(**batch).logits, atol=1e-5)
    # The saved tokenizer reloads as itself whatever the model type (a qwen2 dir must not
    # turn it into a Qwen2Tokenizer with an extra <|endoftext|>).
    tok.save_pretrained(tmp_path)
    reloaded = load_tokenizer(tmp_path)
    assert len(reloaded) == len(tok) == model.config.vocab_size
    assert reloaded("<think>12</think>")["input_ids"] == tok("<think>12</think>")["input_ids"]


def test_deepseek_v3_is_a_moe_with_shared_expert(tok):
    model = build_tiny_model("deepseek_v3", tok, num_hidden_layers=2)
    cfg = model.config
    assert cfg.n_routed_experts == 8 and cfg.n_shared_experts == 1 and cfg.num_experts_per_tok == 2
    moe = model.model.layers[1].mlp  # first_k_dense_replace=1: layer 0 is dense
    assert hasattr(moe, "experts") and hasattr(moe, "shared_experts") and hasattr(moe, "gate")


def test_unknown_tiny_arch(tok):
    with pytest.raises(UserError, match="unknown tiny arch 'gpt2'"):
        build_tiny_model("gpt2", tok)


@pytest.mark.parametrize("ref", ["/nonexistent/model/dir", "nonexistent-org/nonexistent-model"])
def test_missing_model_is_user_error(ref):
    with pytest.raises(UserError):
        load_model(ref)
    with pytest.raises(UserError):
        load_tokenizer(ref)


def test_base_checkpoint_is_prompted_with_r1_zero_template(tok, tmp_path, capsys):
    """No chat template (a base checkpoint): R1-Zero's prompt, in the answer format asked, with a
    one-line notice; a recipe's `chat_template` wins over the tokenizer's own."""
    tok.save_pretrained(tmp_path)
    cfg = tmp_path / "tokenizer_config.json"
    cfg.write_text(cfg.read_text().replace('"chat_template"', '"_no_chat_template"'))
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    base = load_tokenizer(tmp_path, answer_format="boxed")
    notice = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(notice) == 1 and "R1-Zero" in notice[0]
    question = [{"role": "user", "content": "What is 2+3?"}]
    prompt = base.apply_chat_template(question, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("A conversation between User and Assistant.")
    assert prompt.endswith("User: What is 2+3?. Assistant: <think>") and "\\boxed{}" in prompt
    reply = question + [{"role": "assistant", "content": "<think>2+3=5</think> \\boxed{5}"}]
    full = base.apply_chat_template(reply, tokenize=False)
    assert full.startswith(prompt) and full == prompt + "2+3=5</think> \\boxed{5}" + base.eos_token
    chat = load_tokenizer(tmp_path, chat_template="r1_zero")  # tags: the paper's own wording
    assert "<answer> answer here </answer>" in chat.apply_chat_template(
        question, tokenize=False, add_generation_prompt=True)
