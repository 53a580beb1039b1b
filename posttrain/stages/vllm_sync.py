"""vLLM colocated with the trainer, made trustworthy: weights that really sync, and a stop when
the rollouts and the trainer disagree.

**Weight sync.** TRL 1.16's colocate mode pushes new weights with vLLM's `model.load_weights`.
On vLLM's CPU backend that cannot work: loading ends by prepacking every linear weight into a
oneDNN handle and replacing `layer.weight` with an empty Parameter (no `weight_loader`, so the
next load fails), and a tied embedding / lm_head keeps a packed copy made at load time, so even a
load that went through would leave generation on stale weights. vLLM's own reload path
(`reload_weights` over `collective_rpc`) restores the original parameters and loaders, loads, and
packs again, on CPU and GPU alike. `use_reload_sync` swaps it in for TRL's `sync_weights`, on any
TRL trainer that generates with colocated vLLM (GRPO, RLOO, on-policy distillation). The weights
come from TRL's own iterator, so LoRA adapters are merged (vLLM gets the merged weights) and
FSDP / ZeRO-3 shards gathered as TRL does. Each sync's seconds are logged (`vllm/sync_s`).

**Engine settings.** TRL builds the colocated engine with no dtype and no eager switch. vLLM's
"auto" dtype downcasts a float32 checkpoint to bfloat16, and on CPU, where posttrain trains in
float32, that alone puts a 0.1 log-prob gap between sampler and trainer; and vLLM's CPU graph
compilation costs minutes per start. `colocated_engine` makes the engine TRL builds run in the
trainer's dtype and, on CPU, eagerly (on a GPU the trainer's bf16 is what "auto" picks anyway),
with top-p that does not sort the vocabulary (posttrain.rollout.vllm_top_p).

**Rollout check.** With vLLM generating, TRL measures the mean gap between the log-probs vLLM
reported for its sampled tokens and the trainer's for the same tokens
(`sampling/sampling_logp_difference/mean`). Same weights, same dtype, same sampling: it is near
0. `RolloutCheck` stops the stage, with one line naming the likely causes, when it exceeds the
recipe's `rollout_logprob_gap`, instead of training on silently wrong importance ratios.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Iterator
from typing import Any

from transformers import TrainerCallback

from posttrain import runtime
from posttrain.errors import UserError
from posttrain.rollout import vllm_top_p

GAP_METRIC = "sampling/sampling_logp_difference/mean"


@contextlib.contextmanager
def colocated_engine(model: Any, use_vllm: bool) -> Iterator[None]:
    """While a TRL trainer is built: its colocated vLLM engine runs in `model`'s dtype, eagerly
    on CPU, with the CPU KV cache the vLLM worker uses (1 GiB unless set)."""
    import torch
    if not use_vllm or torch.cuda.is_available():
        yield
        return
    from trl.generation import vllm_generation

    runtime.vllm_cpu_env(os.environ)
    vllm_top_p.install()
    real = vllm_generation.LLM
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.") \
        if hasattr(model, "parameters") else "float32"
    vllm_generation.LLM = functools.partial(real, dtype=dtype, enforce_eager=True)
    launch_env = {key: os.environ.get(key) for key in _LAUNCH_ENV}
    try:
        yield
    finally:
        vllm_generation.LLM = real
        _restore_env(launch_env)


# TRL sets these for vLLM's process group when it builds a colocated engine; left behind, a
# later `accelerate launch` from this process would inherit a rank and a taken port.
_LAUNCH_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _restore_env(saved: dict[str, str | None]) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def use_reload_sync(trainer: Any) -> bool:
    """Make `trainer`'s colocated vLLM take new weights through vLLM's reload path; False when
    the trainer has no colocated vLLM engine (HF generation, or server mode, whose server
    reloads on its side)."""
    gen = getattr(trainer, "vllm_generation", None)
    if gen is None or getattr(gen, "mode", None) != "colocate":
        return False

    def sync_weights() -> None:
        start = time.monotonic()
        gen.llm.collective_rpc("reload_weights", kwargs={
            "weights_iterator": checkpoint_weights(gen, trainer.model),
            "is_checkpoint_format": True})
        gen.llm.reset_prefix_cache()
        metrics = getattr(trainer, "_metrics", None)
        if metrics is not None:
            metrics["train"]["vllm/sync_s"].append(time.monotonic() - start)

    gen.sync_weights = sync_weights
    return True


def checkpoint_weights(gen: Any, model: Any) -> Iterator[tuple[str, Any]]:
    """The trained weights under their checkpoint names: TRL's own iterator (LoRA merged, FSDP /
    ZeRO-3 gathered), plus a tied output layer, which is no parameter of its own in transformers
    but which vLLM's reload must be given to repack its own copy (without it, generation stays on
    the old output layer)."""
    names = set()
    for name, tensor in gen._iter_named_params():
        names.add(name)
        yield name, tensor.detach().clone()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") \
        else base.config
    head = base.get_output_embeddings()
    if head is None or not getattr(config, "tie_word_embeddings", False):
        return
    head_name = next((n for n, m in base.named_modules() if m is head), None)
    if head_name and f"{head_name}.weight" not in names:
        yield f"{head_name}.weight", head.weight.detach().clone()


class RolloutCheck(TrainerCallback):
    """Stop training when vLLM's sampled-token log-probs and the trainer's differ by more than
    `max_gap` on average (read from TRL's logged gap, at every logging step that has it).

    With `drop_below` and a `trainer` whose colocated engine takes the weights every step, the
    first gap below `drop_below` switches TRL's importance-sampling correction off for the rest
    of the stage: the sampler then is the policy being trained, and the correction's forward
    pass over every completion (~15% of a SmolLM2 GRPO step on CPU) buys nothing. No gap is
    measured after that; `dropped_at` records the step."""

    def __init__(self, max_gap: float | None, drop_below: float | None = None):
        self.max_gap = max_gap
        self.drop_below = drop_below
        self.trainer: Any = None
        self.dropped_at: int | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        gap = (logs or {}).get(GAP_METRIC)
        if gap is None:
            return
        if self.max_gap is not None and gap > self.max_gap:
            raise UserError(
                f"step {state.global_step}: vLLM's log-probs for its sampled tokens differ from "
                f"the trainer's by {gap:.3f} on average (rollout_logprob_gap: {self.max_gap}); "
                f"likely causes: stale weights in vLLM (the weight sync), a dtype mismatch "
                f"between vLLM and the trainer, or sampling settings one side does not apply "
                f"(top_k, min_p, repetition_penalty)")
        if (self.trainer is not None and self.drop_below is not None and gap < self.drop_below
                and self.dropped_at is None):
            self.trainer.vllm_importance_sampling_correction = False
            self.dropped_at = state.global_step
            print(f"[grpo] step {state.global_step}: vLLM and the trainer agree (log-prob gap "
                  f"{gap:.1e} < {self.drop_below:g}); importance-sampling correction off from here",
                  flush=True)


def on_policy_every_step(args: Any) -> bool:
    """With a colocated engine on the reload sync (`use_reload_sync`): True when each generation
    is sampled by the weights it trains — one optimizer step per generation, and no loss that
    reads the importance ratios (VESPO, an off-policy mask)."""
    return (args.num_iterations == 1
            and args.steps_per_generation == args.gradient_accumulation_steps
            and args.loss_type != "vespo"
            and getattr(args, "off_policy_mask_threshold", None) is None)
