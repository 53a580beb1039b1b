"""SFT: the stage learns, its loss is on the completion only (for any template), overlong
examples are dropped or truncated and counted, and LoRA adapters are merged into a plain model."""

from __future__ import annotations

import datasets
import pytest
import torch

from posttrain.errors import UserError
from posttrain.manifest import Manifest
from posttrain.plots import read_log
from posttrain.stages.sft_data import fit_to_length, to_prompt_completion, token_lengths


def _losses(run: str, name: str) -> list[float]:
    return [r["loss"] for r in read_log(Manifest(run).stage_dir(name) / "logs.jsonl")
            if "loss" in r]


def test_base_and_cold_start_sft_lower_their_loss(tiny_run):
    """The session's tiny run (40 steps each): both training stages learned."""
    for name in ("base", "sft"):
        losses = _losses(tiny_run, name)
        assert len(losses) >= 3, name
        assert losses[-1] < 0.7 * losses[0], (name, losses)


def _chat(n: int, words: int = 3) -> datasets.Dataset:
    return datasets.Dataset.from_list([{"messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": f"What is {i}+{i}?"},
        {"role": "assistant", "content": " ".join(["thinking"] * words) + f" {2 * i}"}]}
        for i in range(n)])


def test_the_last_assistant_turn_becomes_the_completion():
    rows = to_prompt_completion(_chat(2))
    assert rows[0]["prompt"][-1] == {"role": "user", "content": "What is 0+0?"}
    assert [m["role"] for m in rows[0]["prompt"]] == ["system", "user"]
    assert rows[1]["completion"] == [{"role": "assistant", "content": "thinking thinking thinking 2"}]
    bad = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(UserError, match="does not end with an assistant turn"):
        to_prompt_completion(bad)


def test_overlong_examples_are_dropped_or_truncated_and_counted(tiny_run):
    from posttrain.models import load_tokenizer
    tok = load_tokenizer(Manifest(tiny_run).resolve("sft"))
    rows = to_prompt_completion(datasets.concatenate_datasets([_chat(3), _chat(2, words=60)]))
    lengths = token_lengths(rows, tok)
    cap = max(lengths[:3])  # the short rows fit exactly, the long ones do not
    kept, figures = fit_to_length(rows, tok, cap, "drop")
    assert len(kept) == 3 and figures["examples_over_max_length"] == 2
    assert figures["examples_dropped"] == 2 and figures["max_example_tokens"] == max(lengths)
    kept, figures = fit_to_length(rows, tok, cap, "truncate")
    assert len(kept) == 5 and figures["examples_dropped"] == 0
    with pytest.raises(UserError, match="every example is longer"):
        fit_to_length(rows, tok, 3, "drop")


def test_loss_covers_the_completion_only(tiny_run, tmp_path):
    """What TRL's SFTTrainer trains on for our prompt/completion rows: labels are the assistant
    reply and its end-of-turn token; the system and user turns (the prompt) are masked."""
    from trl import SFTConfig, SFTTrainer

    from posttrain.models import load_model, load_tokenizer
    sft = Manifest(tiny_run).resolve("sft")
    tok, model = load_tokenizer(sft), load_model(sft)
    tok.padding_side = "right"
    rows = to_prompt_completion(_chat(4))
    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=4,
                     report_to="none", max_steps=1)
    trainer = SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))  # all 4 rows, in shuffled order
    trained = sorted(tok.decode(labels[labels != -100]) for labels in batch["labels"])
    assert trained == sorted(r["completion"][0]["content"] + tok.eos_token for r in rows)
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        # Everything before the first trained token is the rendered prompt, and it is masked.
        first = int((labels != -100).nonzero()[0])
        prompt = tok.decode(ids[:first])
        assert prompt.endswith("<|assistant|>") and "What is" in prompt
        assert (labels[:first] == -100).all()


def test_merge_lora_folds_the_adapters_into_a_plain_model(tiny_run):
    """A merged model computes what the adapted one computed, with no peft module left."""
    from peft import get_peft_model

    from posttrain.models import load_model
    from posttrain.stages.lora import LoraFields, lora_config, merge_lora
    fields = LoraFields(lora=True, lora_r=4, lora_alpha=8)
    base = load_model(Manifest(tiny_run).resolve("sft"))
    adapted = get_peft_model(base, lora_config(fields))
    torch.manual_seed(0)
    for name, p in adapted.named_parameters():
        if "lora_B" in name:  # B starts at zero: give the adapters something to merge
            p.data.normal_(0, 0.02)
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    with torch.no_grad():
        expected = adapted(ids).logits
    merged = merge_lora(adapted, fields)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, expected, atol=1e-5)
    assert merge_lora(base, LoraFields(lora=False)) is base
