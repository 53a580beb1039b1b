"""Process-wide runtime settings: torch threads, offline hub, quiet warnings.

Oversubscribed threads slowed torch 15-250x on a shared 2-core machine, so the thread count is set
deliberately: the recipe's `threads`, else $POSTTRAIN_THREADS, else all cores up to 8.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping


def configure(threads: int | None = None) -> int:
    """Set torch's intra-op threads (and one inter-op thread); returns the count used."""
    import torch

    n = threads or int(os.environ.get("POSTTRAIN_THREADS", 0)) or min(os.cpu_count() or 1, 8)
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set once in this process
        pass
    return n


def vllm_cpu_env(env: MutableMapping[str, str]) -> None:
    """The settings a vLLM-CPU engine needs in `env` (a child's env, or os.environ for an engine
    in this process): a 1 GiB KV cache (vLLM's default of 4 is too much here) and, when a thread
    budget is set, that budget without core pinning (vLLM-CPU otherwise pins one thread to every
    physical core, oversubscribing a shared machine). Values already set win."""
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if os.environ.get("POSTTRAIN_THREADS"):
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        env.setdefault("OMP_NUM_THREADS", os.environ["POSTTRAIN_THREADS"])


def quiet() -> None:
    """Silence library chatter that is not the user's business (keep our progress bars)."""
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    # datasets logs its own error line (e.g. "Failed to load JSON ... ArrowInvalid") before it
    # raises; we turn the exception into our one-line error, so its line would be a second one.
    import datasets
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
