"""HF `generate` backend: batched, all n samples of a prompt together, KV cache, left padding.

Works for every model transformers can load (the tiny DeepSeek-V3 MLA teacher included) on any
device. Prompts are sorted by length before batching so a batch carries little padding; results
come back in the caller's order. The seed is applied inside `torch.random.fork_rng`, so sampling
is reproducible for the same call and leaves the caller's RNG (e.g. a trainer's) untouched.
"""

from __future__ import annotations

from collections.abc import Callable

from posttrain.rollout.types import Completion, Sampling

# The last model loaded from a path, so an eval suite's tasks do not reload it.
_LOADED: dict[str, tuple] = {}


def load_cached(model_dir: str, fingerprint: str | None = None):
    """(model, tokenizer) for `model_dir`, reusing the last one loaded if it is the same."""
    from posttrain.models import load_model, shared_tokenizer

    key = f"{model_dir}|{fingerprint}"
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = (load_model(model_dir), shared_tokenizer(model_dir))
    return _LOADED[key]


def loaded() -> list[str]:
    """The model dirs whose model is cached here (at most one)."""
    return [key.split("|")[0] for key in _LOADED]


def release() -> None:
    """Drop the cached model (see `posttrain.rollout.release_engines`). Nothing cached, nothing
    to collect: a full collection takes most of a second in a process holding a large
    vocabulary's tokenizer, and a chain calls this after every stage and eval."""
    if not _LOADED:
        return
    _LOADED.clear()
    import gc
    gc.collect()
    import torch
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def decode(tokenizer, ids: list[int], finish_reason: str | None = None,
           stop_ids: list[int] | None = None) -> Completion:
    """One completion from generated ids: cut at the first stop id (every EOS id of the model;
    default: the tokenizer's EOS), drop padding, count the stop token as a token."""
    stops = set(stop_ids or [tokenizer.eos_token_id])
    cut = next((i for i, t in enumerate(ids) if t in stops), None)
    stop = cut is not None or finish_reason == "stop"
    pad = tokenizer.pad_token_id
    ids = ids[:cut] if cut is not None else [t for t in ids if t != pad]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return Completion(text, len(ids) + int(stop), "stop" if stop else (finish_reason or "length"))


def generate_hf(model, tokenizer, texts: list[str], sampling: Sampling, batch_size: int = 32,
                on_batch: Callable[[list[int], list[list[Completion]]], None] | None = None,
                shard: tuple[int, int] = (0, 1)) -> list[list[Completion] | None]:
    """`sampling.n` completions for each rendered prompt text.

    Each batch is seeded from (seed, batch index), so a batch's samples do not depend on which
    process generates it: with `shard=(rank, world)` a process generates batches rank, rank +
    world, ... of the same global batching (the others stay None), and the union over ranks
    equals what one process generates.

    Args:
        model: A causal LM.
        tokenizer: Its tokenizer (pad and EOS ids used to cut completions).
        texts: Prompts already rendered with the chat template.
        sampling: n, temperature (0: greedy), top_p, max new tokens, seed.
        batch_size: Sequences per `generate` call; whole prompts (all n samples) per batch.
        on_batch: Called with (prompt indices, their completions) after each batch — the disk
            cache writes through it, so an interrupted run keeps what it finished.
        shard: (rank, world size): which batches this process generates.
    """
    import torch

    from posttrain.models import stop_token_ids

    model.eval()
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    greedy = sampling.temperature <= 0
    reps = 1 if greedy else sampling.n
    per_batch = max(1, batch_size // reps)
    stops = stop_token_ids(model.generation_config, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    gen_kwargs = dict(max_new_tokens=sampling.max_new_tokens, do_sample=not greedy,
                      num_return_sequences=reps, pad_token_id=pad, eos_token_id=stops)
    if not greedy:
        gen_kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    results: list[list[Completion] | None] = [None] * len(texts)
    devices = [device] if device.type == "cuda" else []
    rank, world = shard
    with torch.random.fork_rng(devices=devices):
        for b, start in enumerate(range(0, len(order), per_batch)):
            if b % world != rank:
                continue
            torch.manual_seed(sampling.seed * 1_000_003 + b)
            idx = order[start:start + per_batch]
            enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
            with torch.no_grad():
                out = model.generate(**enc, **gen_kwargs)
            new = out[:, enc["input_ids"].shape[1]:].tolist()
            done = []
            for j, i in enumerate(idx):
                samples = [decode(tokenizer, new[j * reps + r], stop_ids=stops)
                           for r in range(reps)]
                # Greedy decoding gives the same answer n times: repeat instead of recomputing.
                results[i] = samples * (sampling.n if greedy else 1)
                done.append(results[i])
            if on_batch is not None:
                on_batch(idx, done)
    return results  # type: ignore[return-value]


def generate_ids(model, tokenizer, id_lists: list[list[int]], sampling: Sampling,
                 batch_size: int = 32, seed: int = 0) -> list[list[tuple[list[int], str]]]:
    """`sampling.n` continuations of each token-id prompt, as (new ids up to and including the
    stop token, finish reason): what a multi-turn loop needs to continue a sequence exactly,
    without decoding and re-encoding it. Seeded per batch from `seed`."""
    import torch

    from posttrain.models import stop_token_ids

    model.eval()
    device = next(model.parameters()).device
    greedy = sampling.temperature <= 0
    reps = 1 if greedy else sampling.n
    stops = stop_token_ids(model.generation_config, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    gen_kwargs = dict(max_new_tokens=sampling.max_new_tokens, do_sample=not greedy,
                      num_return_sequences=reps, pad_token_id=pad, eos_token_id=stops)
    if not greedy:
        gen_kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
    per_batch = max(1, batch_size // reps)
    order = sorted(range(len(id_lists)), key=lambda i: len(id_lists[i]))
    out: list[list[tuple[list[int], str]]] = [[] for _ in id_lists]
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        for b, start in enumerate(range(0, len(order), per_batch)):
            torch.manual_seed(seed * 1_000_003 + b)
            idx = order[start:start + per_batch]
            width = max(len(id_lists[i]) for i in idx)
            ids = torch.tensor([[pad] * (width - len(id_lists[i])) + id_lists[i] for i in idx],
                               device=device)
            mask = torch.tensor([[0] * (width - len(id_lists[i])) + [1] * len(id_lists[i])
                                 for i in idx], device=device)
            with torch.no_grad():
                gen = model.generate(input_ids=ids, attention_mask=mask, **gen_kwargs)
            new = gen[:, width:].tolist()
            for j, i in enumerate(idx):
                for r in range(reps):
                    seq = new[j * reps + r]
                    cut = next((k for k, t in enumerate(seq) if t in stops), None)
                    out[i].append((seq[:cut + 1], "stop") if cut is not None else
                                  ([t for t in seq if t != pad], "length"))
                out[i] = out[i] * (sampling.n if greedy else 1)
    return out
