"""Multi-process stages through `accelerate launch`, and which process of them writes.

    python -m posttrain.launch CONFIG NPROC STAGE RECIPE.yaml --run NAME [--key value ...]
    make sft ACCELERATE=ddp NPROC=2          (the same, through the Makefile)

CONFIG is a name under `recipes/accelerate/` (`ddp`, `fsdp`, `zero2`, `zero3`) or a path to an
accelerate config YAML; NPROC is the number of processes (0: one per GPU). The recipe is checked
once here, so a bad recipe gives one clean error instead of one per rank, and then this process
replaces itself with

    accelerate launch --config_file CONFIG --num_processes NPROC -m posttrain.cli STAGE RECIPE ...

Inside the launched world every rank validates its inputs and trains; only the main process
(global rank 0, `posttrain.dist`) writes the manifest, the plan, the final model and the eval.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from posttrain.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "recipes" / "accelerate"
# Configs that shard parameters or optimizer state. accelerate 1.15 turns FSDP on only for GPU-like
# process groups: on CPU (gloo) the fsdp config silently trains as plain DDP, and DeepSpeed needs
# CUDA. So they are refused on CPU rather than run as something else.
GPU_ONLY = {"fsdp", "zero2", "zero3"}


def config_path(name: str) -> Path:
    """`ddp` → recipes/accelerate/ddp.yaml; an existing YAML path as is; UserError otherwise."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise UserError(f"accelerate config {path} not found")
        return path
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise UserError(f"unknown accelerate config {name!r}; use one of {known} or a YAML path")
    return path


def command(config: str, nproc: int, stage_argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """The `accelerate launch` command line and the environment for it.

    On CPU the processes share the machine's cores, so POSTTRAIN_THREADS is split between them
    (oversubscribed torch threads slowed training 15-250x on a shared machine).
    """
    import torch

    path = config_path(config)
    gpus = torch.cuda.device_count()
    if nproc < 0:
        raise UserError(f"NPROC must be >= 1 (or 0 for one process per GPU), got {nproc}")
    if nproc == 0:
        nproc = gpus or 2
    if not gpus and path.stem in GPU_ONLY:
        raise UserError(f"accelerate config {path.stem!r} needs CUDA GPUs (on CPU accelerate would "
                        f"run it as plain DDP); use ACCELERATE=ddp here")
    env = dict(os.environ)
    if not gpus:
        threads = int(env.get("POSTTRAIN_THREADS", 0)) or (os.cpu_count() or 1)
        per_proc = str(max(1, threads // nproc))
        env.update(POSTTRAIN_THREADS=per_proc, OMP_NUM_THREADS=per_proc)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(path),
           "--num_processes", str(nproc)]
    if "MASTER_PORT" not in env:  # two launches on one machine must not fight over port 29500
        cmd += ["--main_process_port", str(_free_port())]
    return [*cmd, "-m", "posttrain.cli", *stage_argv], env


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    """Check the stage's inputs once, then exec `accelerate launch`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 3 or argv[0] in ("-h", "--help"):
        print(__doc__.split("\n\n")[1])
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    config, nproc_text, stage_argv = argv[0], argv[1], argv[2:]
    try:
        from posttrain import runtime
        from posttrain.cli import stage_args
        from posttrain.runner import prepare
        from posttrain.stages import STAGES

        runtime.quiet()
        try:
            nproc = int(nproc_text or 0)
        except ValueError:
            raise UserError(f"NPROC must be an integer, got {nproc_text!r}") from None
        kind = stage_argv[0]
        if kind not in STAGES:
            raise UserError(f"unknown stage {kind!r}; stages: {', '.join(STAGES)}")
        args, overrides = stage_args(kind, stage_argv[1:])
        cmd, env = command(config, nproc, stage_argv)
        # The checks that depend on the process count (dynamic sampling) see the launch's.
        os.environ["POSTTRAIN_NPROC"] = cmd[cmd.index("--num_processes") + 1]
        try:
            prepare(kind, args.recipe, args.run, overrides, force=args.force)
        finally:
            os.environ.pop("POSTTRAIN_NPROC", None)
    except UserError as e:
        print(f"posttrain: error: {e}", file=sys.stderr)
        return 2
    print(f"[posttrain] {' '.join(cmd)}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(cmd[0], cmd, env)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
