"""SFT tokens/s: padding-free packing vs padded batches, side by side on variable-length CoT data.

One epoch over the same chat-formatted CoT set, same model init, same tokens, three ways through
TRL's SFTTrainer:
  padded           per_device_train_batch_size sequences per batch, each padded to the longest
                   (TRL's default: random order)
  padded+grouped   the same, batches grouped by length (`train_sampling_strategy: group_by_length`)
  packed           `packing=True` (best-fit-decreasing, padding-free): sequences are laid end to
                   end in rows of `max_length` tokens, position ids restart per sequence, no pads
The data has the long tail real CoT sets have: mostly short arithmetic/countdown traces and a few
long multi-digit ones, so a random batch is often padded to one long trace. Every sequence fits in
`max_length`, so all three train on exactly the same tokens; tokens/s = real (non-pad) tokens /
TRL's `train_runtime`. Rounds alternate the variants so machine-load drift hits all; the figure
per variant is the median over rounds.

On CPU the packed row's attention is a dense L x L masked SDPA (no variable-length kernel), so
this understates what packing gains on GPU with flash-attention's varlen kernel. The packed
forward is also checked against the unpacked one (same logits per sequence), so the speedup is
not bought with cross-sequence attention.

Run: `python bench/sft_packing.py [--rounds 2] [--hidden 128] [--layers 2]`. Last line:
`{"packing_speedup": ...}` (packed vs padded tokens/s; goal >= 1.5).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Long-tailed lengths: ~80% short traces, a few long ones (12 tokens per digit of the sum).
DATA = [
    {"task": "arithmetic", "n": 110, "digits": [1, 4]},
    {"task": "countdown", "n": 50, "count": [2, 5]},
    {"task": "arithmetic", "n": 30, "digits": [5, 14]},
    {"task": "arithmetic", "n": 10, "digits": [15, 36]},
]


def build(work: Path, hidden: int, layers: int):
    """Tokenizer, chat-formatted SFT dataset and a tiny Llama saved to `work/model`."""
    from posttrain.answer_format import TAGS_SYSTEM_PROMPT as DEFAULT_SYSTEM_PROMPT
    from posttrain.data import load_sources, to_sft
    from posttrain.models import build_tiny_model, train_tokenizer

    ds = to_sft(load_sources(DATA, seed=0, where="bench"), DEFAULT_SYSTEM_PROMPT)
    corpus = [m["content"] for row in ds for m in row["messages"]]
    tok = train_tokenizer(corpus, work / "model")
    model = build_tiny_model("llama", tok, seed=0, hidden_size=hidden,
                             intermediate_size=3 * hidden, num_hidden_layers=layers,
                             num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                             max_position_embeddings=2048)
    model.save_pretrained(work / "model")
    lengths = [len(tok.apply_chat_template(row["messages"], tokenize=True)["input_ids"])
               for row in ds]
    return ds, lengths


def train_once(variant: str, ds, work: Path, batch_size: int, max_length: int) -> dict:
    """One epoch of one variant; TRL's runtime and the real tokens it trained on."""
    from transformers import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    from posttrain.models import load_model, load_tokenizer

    tok = load_tokenizer(work / "model")
    tok.padding_side = "right"
    model = load_model(work / "model")
    extra = {
        "padded": {"per_device_train_batch_size": batch_size},
        "padded+grouped": {"per_device_train_batch_size": batch_size,
                           "train_sampling_strategy": "group_by_length"},
        # One packed row holds about as many real tokens as a padded batch does.
        "packed": {"per_device_train_batch_size": 1, "packing": True},
    }[variant]
    args = SFTConfig(output_dir=str(work / variant), max_length=max_length, num_train_epochs=1,
                     learning_rate=1e-3, lr_scheduler_type="constant", assistant_only_loss=True,
                     report_to="none", save_strategy="no", logging_steps=1000, seed=0,
                     use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, **extra)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    trainer.remove_callback(PrinterCallback)  # keep stdout for the table
    tokens = sum(len(x) for x in trainer.train_dataset["input_ids"])
    out = trainer.train()
    return {"seconds": out.metrics["train_runtime"], "tokens": tokens, "steps": out.global_step,
            "loss": out.training_loss}


def packed_matches_unpacked(work: Path, ds) -> float:
    """Max |logit difference| between sequences run alone and the same sequences packed in one row."""
    import torch

    from posttrain.models import load_model, load_tokenizer

    tok, model = load_tokenizer(work / "model"), load_model(work / "model").eval()
    seqs = [tok.apply_chat_template(ds[i]["messages"], tokenize=True)["input_ids"] for i in range(4)]
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([s]), use_cache=False).logits[0] for s in seqs]
        row = torch.tensor([sum(seqs, [])])
        pos = torch.cat([torch.arange(len(s)) for s in seqs])[None]
        # As in training (TRL passes use_cache=False): with a cache, transformers does not read
        # sequence boundaries from position_ids and the sequences would attend to each other.
        packed = model(input_ids=row, position_ids=pos, use_cache=False).logits[0]
    return float((torch.cat(alone) - packed).abs().max())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=1024)
    args = p.parse_args()

    from posttrain import runtime
    threads = runtime.configure()
    runtime.quiet()
    variants = ["padded", "padded+grouped", "packed"]
    with tempfile.TemporaryDirectory(prefix="bench-sft-packing-") as tmp:
        work = Path(tmp)
        ds, lengths = build(work, args.hidden, args.layers)
        if max(lengths) > args.max_length:
            sys.exit(f"--max-length {args.max_length} < longest sequence {max(lengths)}")
        drift = packed_matches_unpacked(work, ds)
        runs: dict[str, list[dict]] = {v: [] for v in variants}
        for r in range(args.rounds):
            order = variants if r % 2 == 0 else variants[::-1]
            for v in order:
                runs[v].append(train_once(v, ds, work, args.batch_size, args.max_length))
                print(f"round {r + 1} {v}: {runs[v][-1]['seconds']:.1f} s", file=sys.stderr)

    tps = {v: statistics.median(x["tokens"] / x["seconds"] for x in runs[v]) for v in variants}
    print(f"data: {len(lengths)} sequences, tokens/seq mean {statistics.mean(lengths):.0f}, "
          f"median {statistics.median(lengths):.0f}, max {max(lengths)}; llama hidden "
          f"{args.hidden} x {args.layers} layers; {threads} thread(s); {args.rounds} rounds")
    print(f"packed vs unpacked logits: max |diff| {drift:.2e}")
    header = f"{'variant':<16}{'steps':>7}{'tokens':>9}{'seconds':>9}{'tokens/s':>10}{'loss':>8}{'speedup':>9}"
    print(header)
    print("-" * len(header))
    for v in variants:
        last = runs[v][-1]
        secs = statistics.median(x["seconds"] for x in runs[v])
        print(f"{v:<16}{last['steps']:>7}{last['tokens']:>9}{secs:>9.1f}{tps[v]:>10.0f}"
              f"{last['loss']:>8.3f}{tps[v] / tps['padded']:>9.2f}")
    print(json.dumps({
        "packing_speedup": round(tps["packed"] / tps["padded"], 3),
        "packing_speedup_vs_grouped": round(tps["packed"] / tps["padded+grouped"], 3),
        "tokens_per_s_padded": round(tps["padded"], 1),
        "tokens_per_s_grouped": round(tps["padded+grouped"], 1),
        "tokens_per_s_packed": round(tps["packed"], 1),
        "packed_logits_max_diff": drift,
    }))


if __name__ == "__main__":
    main()
