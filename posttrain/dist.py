"""Which process this is under `accelerate launch` / torchrun, read from the launcher's environment.

A leaf module: the library asks "am I the writer?" here, so nothing below the entry points has to
import the launcher. `barrier` and `all_gather_object` join the process group accelerate sets up
for the trainer (creating it on first use, as the trainer would).
"""

from __future__ import annotations

import os


def rank() -> int:
    """Global rank of this process (0 when not launched by accelerate/torchrun)."""
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def planned_world_size() -> int:
    """Processes the stage runs on: WORLD_SIZE inside a launched world, else the count
    `posttrain.launch` is about to start ($POSTTRAIN_NPROC, set while it checks the recipe)."""
    return int(os.environ.get("WORLD_SIZE") or os.environ.get("POSTTRAIN_NPROC") or 1)


def is_main_process() -> bool:
    """True on the one process that writes run state (manifest, final model, eval)."""
    return rank() == 0


def barrier() -> None:
    """Wait until every rank gets here; a no-op for a single process.

    Uses accelerate's PartialState, the same process group the trainer will use later.
    """
    if world_size() <= 1:
        return
    import torch
    from accelerate import PartialState

    PartialState(cpu=not torch.cuda.is_available()).wait_for_everyone()


def shutdown() -> None:
    """Let go of the process group once every rank has finished training; a no-op for one process.

    A rank that reaches interpreter exit with gloo's worker threads still up can abort
    ("terminate called without an active exception") while rank 0 is still writing.
    """
    if world_size() <= 1:
        return
    import torch.distributed as torch_dist

    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.barrier()
        torch_dist.destroy_process_group()


def all_gather_object(obj):
    """Every rank's `obj`, in rank order (just `[obj]` for a single process).

    Over the process group the trainer uses (accelerate's PartialState: gloo on CPU, NCCL on GPU).
    """
    if world_size() <= 1:
        return [obj]
    import torch
    import torch.distributed as torch_dist
    from accelerate import PartialState

    PartialState(cpu=not torch.cuda.is_available())
    out = [None] * world_size()
    torch_dist.all_gather_object(out, obj)
    return out
