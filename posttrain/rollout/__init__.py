"""Generation behind one call: `generate(model_ref, prompts, sampling, backend=...)`.

Every consumer of samples — eval suites, rejection sampling, distillation, DPO pairs — goes
through here, so they share the backend choice, the progress bar, the seed and the disk cache:

- backend `"hf"`: transformers `generate`, works for every model on any device.
- backend `"vllm"`: vLLM's offline engine (`posttrain.rollout.vllm_backend`, the one module that
  builds one). Where vLLM cannot run the model (not installed; the tiny MLA teacher), it says
  why and falls back to HF.
- backend `"auto"`: vLLM on a GPU where it can run the model, else HF. On CPU, HF: vLLM's 25-40 s
  engine start costs more than the tiny models' whole generation.

Completions are cached on disk per prompt, keyed by (model content hash, backend, rendered
prompt, sampling), under `<runs>/.rollout_cache` (or $POSTTRAIN_ROLLOUT_CACHE).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from posttrain import dist
from posttrain.errors import UserError
from posttrain.rollout.types import Completion, Sampling

__all__ = ["BACKENDS", "Completion", "Sampling", "generate", "live_engines", "pick_backend",
           "release_engines", "render_prompt"]

BACKENDS = ("auto", "hf", "vllm")


def render_prompt(tokenizer, prompt: list[dict[str, str]] | str) -> str:
    """The text the model sees: chat messages through the chat template, raw text as is."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def pick_backend(backend: str, model_ref: Any, quiet: bool = False) -> str:
    """The backend that will actually run: "hf" or "vllm" (with a message when falling back)."""
    if backend not in BACKENDS:
        raise UserError(f"rollout backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "hf":
        return "hf"
    from posttrain.rollout import vllm_backend
    if isinstance(model_ref, tuple):
        reason = "it needs a model dir, not an in-memory model"
    elif backend == "auto" and not vllm_backend.on_gpu():
        return "hf"
    else:
        reason = vllm_backend.unsupported_reason(str(model_ref))
    if reason is None:
        return "vllm"
    if backend == "vllm" and not quiet:
        print(f"[posttrain] rollout: vLLM cannot run {model_ref if not isinstance(model_ref, tuple) else 'this model'}"
              f": {reason}; using the HF backend", file=sys.stderr)
    return "hf"


def release_engines() -> None:
    """Free every cached generation model: the HF model kept for reuse and the vLLM engine process
    (its memory, and the GPU, go back, e.g. before a stage trains on the same device)."""
    from posttrain.rollout import hf, vllm_backend
    hf.release()
    vllm_backend.close_engines()


def live_engines() -> list[str]:
    """The generation engines holding memory now (`hf:<dir>`, `vllm:<dir>`); [] after
    `release_engines`."""
    from posttrain.rollout import hf, vllm_backend
    return [f"hf:{d}" for d in hf.loaded()] + [f"vllm:{d}" for d in vllm_backend.running()]


def _cache_root(cache: bool | str | Path) -> Path | None:
    if cache is False or cache is None:
        return None
    from posttrain.rollout.cache import default_cache_dir
    return default_cache_dir() if cache is True else Path(cache)


def generate(model_ref: str | Path | tuple[Any, Any], prompts: list[Any], sampling: Sampling,
             backend: str = "hf", batch_size: int = 32, progress: bool = True,
             cache: bool | str | Path = True, shard: bool = False,
             tokenizer_options: dict[str, Any] | None = None) -> list[list[Completion]]:
    """`sampling.n` completions per prompt.

    Args:
        model_ref: A model dir or hub id, or an in-memory (model, tokenizer) pair.
        prompts: Chat messages (rendered with the tokenizer's chat template) or raw text.
        sampling: n, temperature (0 = greedy), top_p, max new tokens, seed.
        backend: "hf", "vllm" or "auto" (see the module docstring).
        batch_size: Sequences per HF `generate` call (vLLM schedules its own batches).
        progress: Show a progress bar over prompts.
        cache: True for the default disk cache, a dir for another, False for none.
        shard: Under `accelerate launch`, split the work across the processes (every one of them
            must make this call): each generates its share, and all get every result back. The
            samples equal a single process's (per-batch / per-prompt seeds).
        tokenizer_options: How a model dir's tokenizer renders chat prompts
            (`posttrain.models.load_tokenizer`: chat_template, answer_format).

    Returns:
        One list of `sampling.n` completions per prompt, in order (prompts with the same
        rendered text share theirs).
    """
    from posttrain.rollout.cache import RolloutCache, model_fingerprint

    if not isinstance(model_ref, tuple):
        model_ref = str(model_ref)
    chosen = pick_backend(backend, model_ref)
    if isinstance(model_ref, tuple):
        tokenizer = model_ref[1]
    else:
        from posttrain.models import shared_tokenizer
        tokenizer = shared_tokenizer(model_ref, **(tokenizer_options or {}))
    rendered = [render_prompt(tokenizer, p) for p in prompts]
    # One set of samples per distinct prompt text: the cache keys by text, so duplicated prompts
    # must share samples on a cold run too, or a warm rerun would return different data.
    texts = list(dict.fromkeys(rendered))
    root = _cache_root(cache)
    fingerprint = model_fingerprint(model_ref, root) if root is not None else None
    store = RolloutCache(root, fingerprint, chosen, sampling) if root is not None else None
    rank, world = (dist.rank(), dist.world_size()) if shard else (0, 1)
    if world > 1:
        dist.barrier()  # every rank reads the cache before any rank writes to it
    results: list[list[Completion] | None] = [store.get(t) if store else None for t in texts]
    todo = [i for i, r in enumerate(results) if r is None]
    if world > 1:
        dist.barrier()
    bar = tqdm(total=len(texts), initial=len(texts) - len(todo), unit="prompt", leave=False,
               desc=f"generate ({chosen})", disable=not progress)

    def keep(indices: list[int], outs: list[list[Completion]]) -> None:
        for i, comps in zip(indices, outs):
            results[todo[i]] = comps
            if store is not None:
                store.put(texts[todo[i]], comps)
        if chosen == "hf":
            bar.update(len(indices))

    if todo and sampling.tools:
        _run_with_tools(chosen, model_ref, tokenizer, fingerprint, batch_size, prompts, rendered,
                        [texts[i] for i in todo], sampling, [j for j in range(len(todo))
                                                             if j % world == rank], keep, bar)
    elif todo:
        if chosen == "vllm":
            mine = [j for j in range(len(todo)) if j % world == rank]  # per-prompt seeds
            _run_vllm(model_ref, tokenizer, [texts[todo[j]] for j in mine], sampling,
                      lambda idx, outs: keep([mine[k] for k in idx], outs), bar)
        else:
            from posttrain.rollout.hf import generate_hf, load_cached
            model, tok = model_ref if isinstance(model_ref, tuple) else \
                load_cached(model_ref, fingerprint)
            generate_hf(model, tok, [texts[i] for i in todo], sampling, batch_size=batch_size,
                        on_batch=keep, shard=(rank, world))
    bar.close()
    if world > 1:  # every rank gets every rank's share
        for part in dist.all_gather_object([(i, results[i]) for i in todo
                                            if results[i] is not None]):
            for i, comps in part:
                results[i] = comps
    by_text = dict(zip(texts, results))
    return [by_text[t] for t in rendered]  # type: ignore[misc]


def _run_with_tools(backend: str, model_ref, tokenizer, fingerprint, batch_size: int, prompts,
                    rendered: list[str], todo_texts: list[str], sampling: Sampling,
                    mine: list[int], keep, bar, chunk: int = 64) -> None:
    """Tool-using generation (posttrain.rollout.multiturn) of this process's prompts, in chunks
    that land in the cache as they finish."""
    from posttrain.errors import UserError
    from posttrain.rollout.multiturn import generate_with_tools
    from posttrain.tools.chat import check_tool_template

    if not all(isinstance(p, list) for p in prompts):
        raise UserError("tools need chat prompts (messages), not raw text")
    check_tool_template(tokenizer, "tools")
    messages = dict(zip(reversed(rendered), reversed(prompts)))  # first prompt of each text
    raw = _raw_generator(backend, model_ref, tokenizer, fingerprint, batch_size)
    for start in range(0, len(mine), chunk):
        part = mine[start:start + chunk]
        outs = generate_with_tools(tokenizer, [messages[todo_texts[j]] for j in part], sampling,
                                   raw)
        keep(part, outs)
        if backend == "vllm":
            bar.update(len(part))


def _raw_generator(backend: str, model_ref, tokenizer, fingerprint, batch_size: int):
    """The backend's token-id generation: (id prompts, sampling, seed) -> per prompt `n`
    (new ids through the stop token, finish reason)."""
    from posttrain.models import saved_generation_config, stop_token_ids

    if backend == "hf":
        from posttrain.rollout.hf import generate_ids, load_cached
        model, tok = model_ref if isinstance(model_ref, tuple) else \
            load_cached(model_ref, fingerprint)
        return lambda ids, s, seed: generate_ids(model, tok, ids, s, batch_size, seed)

    from posttrain.rollout.vllm_backend import generate_vllm
    stop = stop_token_ids(saved_generation_config(model_ref), tokenizer)

    def vllm(ids: list[list[int]], s: Sampling, seed: int) -> list[list[tuple[list[int], str]]]:
        greedy = s.temperature <= 0
        asked = dataclasses.replace(s, n=1) if greedy else s
        seeds = [(seed * 1_000_003 + i) % 2**31 for i in range(len(ids))]
        outs = generate_vllm(model_ref, ids, seeds, asked, stop)
        return [[(t if reason != "stop" or (t and t[-1] in stop) else [*t, stop[0]], reason)
                 for t, reason in group] * (s.n if greedy else 1) for group in outs]
    return vllm


def _run_vllm(model_dir: str, tokenizer, texts: list[str], sampling: Sampling, keep, bar,
              chunk: int = 1024) -> None:
    """Generate with the vLLM worker in chunks (each chunk lands in the cache as it finishes)."""
    import hashlib

    from posttrain.models import saved_generation_config, stop_token_ids
    from posttrain.rollout.hf import decode
    from posttrain.rollout.vllm_backend import generate_vllm

    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    # One seed per prompt from (seed, prompt): a prompt's samples do not depend on its batch.
    seeds = [int(hashlib.sha256(f"{sampling.seed}\x00{t}".encode()).hexdigest()[:8], 16)
             for t in texts]
    stop = stop_token_ids(saved_generation_config(model_dir), tokenizer)
    greedy = sampling.temperature <= 0
    # vLLM refuses n > 1 for greedy decoding: decode once and repeat, as the HF backend does.
    asked = dataclasses.replace(sampling, n=1) if greedy else sampling
    for start in range(0, len(texts), chunk):
        part = range(start, min(len(texts), start + chunk))
        outs = generate_vllm(model_dir, [ids[i] for i in part], [seeds[i] for i in part],
                             asked, stop, bar)
        keep(list(part), [[decode(tokenizer, tok_ids, reason, stop) for tok_ids, reason in group]
                          * (sampling.n if greedy else 1) for group in outs])
