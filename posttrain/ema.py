"""EMA of the trainable weights in CPU memory, updated in the background (DeepSeek-V3 §3.2.3).

After every `every` optimizer steps the loop takes a snapshot of the weights into a preallocated
CPU buffer, and a worker thread folds it into the FP32 EMA: `ema ← d · ema + (1 − d) · θ`. The
loop never waits for the EMA:

- The copy overlaps the next forward and backward. On a GPU it runs on a side CUDA stream into
  pinned memory, and the next optimizer step (the first thing that changes the weights) waits for
  it on the device, not on the host. On a CPU the worker copies, and the next optimizer step
  finishes whatever part of the copy is left.
- The fold uses the cores the loop leaves free: beside a GPU loop, this process's share of the
  node's cores less the loop's; beside a CPU loop (which keeps its cores), one core at the lowest
  priority.
- When the worker cannot keep up, snapshots are skipped instead of queued: the next one is folded
  with `d ** k` (k: the updates due since the last fold), so the EMA keeps its time constant. The
  stage's manifest entry records the updates, the skips and the effective interval (`ema`).

The EMA costs no GPU memory and is saved at the end, the weights of the last step folded in, as
its own HF checkpoint, which `save_final` moves to `<model_dir>/ema/` (evaluate it with
`posttrain eval ... --weights ema`).

Recipe: `ema: {decay: 0.999, every: 1}`. Starts from the weights at the start of training; a
resumed run starts a new EMA from the resumed weights.

Written by hand: torch's `AveragedModel` keeps the average on the model's device and updates it
synchronously in the loop, the two things this callback exists to avoid.
"""

from __future__ import annotations

import os
import queue
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from posttrain.errors import UserError

EMA_DIR = "ema"


@dataclass(frozen=True)
class EMAConfig:
    """Attributes:
        decay: Weight of the old average per update, in (0, 1).
        every: Update after every this many optimizer steps.
    """

    decay: float = 0.999
    every: int = 1

    @classmethod
    def parse(cls, value: dict[str, Any] | None) -> EMAConfig | None:
        """The recipe's `ema:` mapping, checked; None when EMA is off."""
        if value is None:
            return None
        unknown = set(value) - {"decay", "every"}
        if unknown:
            raise UserError(f"ema: unknown key(s) {sorted(unknown)}; known: decay, every")
        decay, every = value.get("decay", cls.decay), value.get("every", cls.every)
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay < 1:
            raise UserError(f"ema.decay must be a number in (0, 1), got {decay!r}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise UserError(f"ema.every must be an integer >= 1, got {every!r}")
        return cls(float(decay), every)


# torch runs an elementwise op on one thread below this many elements (at::internal::GRAIN_SIZE):
# the copy and the fold go in pieces of this size, so each thread that takes one uses one core
# (torch's intra-op thread count is process-wide; a worker running on all of them would take the
# training loop's cores: bench/ema.py).
GRAIN = 32768


def pieces(tensors: dict[str, torch.Tensor]) -> list[tuple[str, int, int]]:
    """(name, start, end) of every GRAIN-sized piece of the flattened tensors."""
    return [(name, i, min(i + GRAIN, t.numel()))
            for name, t in tensors.items() for i in range(0, t.numel(), GRAIN)]


class SharedWork:
    """One job in pieces that any thread may take: the fold's threads, or the training loop
    finishing a copy that its next optimizer step must not overtake."""

    def __init__(self, count: int, do_piece):
        self._count, self._do = count, do_piece
        self._next = self._done_count = 0
        self._lock = threading.Lock()
        self._done = threading.Event()
        self.error: BaseException | None = None
        if count == 0:
            self._done.set()

    def run(self) -> None:
        """Take pieces until none is left."""
        while True:
            with self._lock:
                i = self._next
                if i >= self._count or self.error is not None:
                    return
                self._next += 1
            try:
                self._do(i)
            except BaseException as e:  # noqa: BLE001 - raised by wait() in the waiting thread
                self.error = e
            with self._lock:
                self._done_count += 1
                if self._done_count == self._count or self.error is not None:
                    self._done.set()

    def wait(self) -> None:
        """Help until every piece is taken, then wait for those still being done."""
        self.run()
        self._done.wait()
        if self.error is not None:
            raise self.error


def fold_threads(on_gpu: bool) -> int:
    """Threads for the fold: beside a GPU loop, every core of this process's share of the node
    (its cores over the processes launched on it) but the loop's; beside a CPU loop, which keeps
    its cores, one."""
    if not on_gpu:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(1, (cores or 1) // max(1, local_processes) - 1)


def lowest_priority() -> None:
    """Make the calling thread yield its core to any other (Linux: threads are tasks with their
    own nice value); elsewhere a no-op."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass


class EMACallback(TrainerCallback):
    """Keeps the EMA and writes it as an HF checkpoint to `out_dir` when training ends.

    Attributes:
        folds: (optimizer step of the snapshot, updates it stands for) of every fold, in order.
        skipped: Snapshots not taken because the worker was still busy.
        fold_seconds: Wall time of each snapshot in the worker, copy included.
    """

    def __init__(self, config: EMAConfig, out_dir: Path, slots: int | None = None,
                 threads: int | None = None):
        self.config = config
        self.out_dir = Path(out_dir)
        self.slots = slots        # snapshot buffers (default: 2 beside a GPU loop, 1 on a CPU)
        self.threads = threads    # fold threads (default: fold_threads)
        self.folds: list[tuple[int, int]] = []
        self.skipped = 0
        self.fold_seconds: list[float] = []
        self.ema: dict[str, torch.Tensor] = {}
        self._params: dict[str, torch.nn.Parameter] = {}
        self._worker: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._error: BaseException | None = None
        self._due = 0              # updates due since the last snapshot taken
        self._due_step = 0         # the optimizer step at which the last one fell due
        self._copy: SharedWork | None = None        # CPU: the copy the next step must wait for
        self._copied: torch.cuda.Event | None = None  # GPU: the same, as a device event
        self._stream = None

    @property
    def updates(self) -> int:
        """Folds done (a fold after skips stands for several due updates)."""
        return len(self.folds)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if hasattr(model, "peft_config"):
            raise UserError("ema with LoRA is not supported; train full weights or drop `ema:`")
        self._params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.ema = {n: p.detach().to("cpu", torch.float32, copy=True)
                    for n, p in self._params.items()}
        self._pieces = pieces(self.ema)
        self._on_gpu = any(p.is_cuda for p in self._params.values())
        self._stream = torch.cuda.Stream() if self._on_gpu else None
        slots = self.slots or (2 if self._on_gpu else 1)
        self._free: queue.Queue = queue.Queue()
        for _ in range(slots):
            self._free.put({n: torch.empty(p.shape, dtype=p.dtype, pin_memory=self._on_gpu)
                            for n, p in self._params.items()})
        self._threads = self.threads or fold_threads(self._on_gpu)
        if self._threads > 1:
            self._pool = ThreadPoolExecutor(self._threads - 1, thread_name_prefix="ema-fold")
        self._todo: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=self._work, name="ema", daemon=True)
        self._worker.start()
        if self.out_dir.exists():   # left by an earlier attempt
            shutil.rmtree(self.out_dir)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.config.every == 0:
            self._due += 1
            self._due_step = state.global_step
            self.snapshot(state.global_step, block=False)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        """The weights are about to change: the snapshot's copy must be complete."""
        self._copy_done()

    def _copy_done(self) -> None:
        if self._copied is not None:   # the device waits, the host goes on
            torch.cuda.current_stream().wait_event(self._copied)
            self._copied = None
        if self._copy is not None:     # the loop takes the pieces the worker has not
            copy, self._copy = self._copy, None
            copy.wait()

    def snapshot(self, step: int, block: bool = False) -> bool:
        """Start copying the weights into a free buffer and queue it for the fold; without a free
        buffer (the worker is behind), skip unless `block`. Returns whether it was taken."""
        if self._error is not None:
            raise RuntimeError("EMA worker failed") from self._error
        try:
            buf = self._free.get(block=block)
        except queue.Empty:
            self.skipped += 1
            return False
        src = {n: p.detach() for n, p in self._params.items()}
        event = copy = None
        if self._on_gpu:
            self._stream.wait_stream(torch.cuda.current_stream())  # after the optimizer step
            with torch.cuda.stream(self._stream), torch.no_grad():
                torch._foreach_copy_(list(buf.values()), list(src.values()), non_blocking=True)
                event = torch.cuda.Event()
                event.record(self._stream)
            self._copied = event
        else:
            flat_src = {n: t.reshape(-1) for n, t in src.items()}
            flat_buf = {n: t.view(-1) for n, t in buf.items()}

            def copy_piece(i: int) -> None:
                name, a, b = self._pieces[i]
                flat_buf[name][a:b].copy_(flat_src[name][a:b])

            copy = self._copy = SharedWork(len(self._pieces), copy_piece)
        self._todo.put((buf, copy, event, self._due, step))
        self._due = 0
        return True

    def _work(self) -> None:
        if not self._on_gpu:
            lowest_priority()
        while True:
            item = self._todo.get()
            if item is None:
                return
            buf, copy, event, due, step = item
            start = time.perf_counter()
            try:
                if copy is not None:
                    copy.wait()
                if event is not None:
                    event.synchronize()
                self._fold(buf, 1.0 - self.config.decay ** due)
                self.folds.append((step, due))
                self.fold_seconds.append(time.perf_counter() - start)
            except BaseException as e:  # noqa: BLE001 - re-raised in the training thread
                self._error = e
            finally:
                self._free.put(buf)

    def _fold(self, buf: dict[str, torch.Tensor], weight: float) -> None:
        """`ema ← ema + weight · (buf − ema)` on the fold's threads, the worker one of them."""
        flat_avg = {n: t.view(-1) for n, t in self.ema.items()}
        flat_new = {n: t.view(-1) for n, t in buf.items()}

        def fold_piece(i: int) -> None:
            name, a, b = self._pieces[i]
            flat_avg[name][a:b].lerp_(flat_new[name][a:b].float(), weight)

        work = SharedWork(len(self._pieces), fold_piece)
        with torch.no_grad():
            helpers = [self._pool.submit(work.run) for _ in range(self._threads - 1)] \
                if self._pool is not None else []
            work.wait()
            for h in helpers:
                h.result()

    def wait(self) -> None:
        """Take the snapshot still due (the last steps' weights), fold everything queued, and
        stop the worker."""
        if self._worker is not None:
            if self._due and self._error is None:
                self.snapshot(self._due_step, block=True)
            self._copy_done()
            self._todo.put(None)
            self._worker.join()
            self._worker = None
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None
        if self._error is not None:
            raise RuntimeError("EMA worker failed") from self._error

    def stats(self) -> dict[str, Any]:
        """For the manifest: folds done, snapshots skipped, and the optimizer steps between folds
        on average (`every` when the worker kept up)."""
        covered = sum(due for _, due in self.folds) * self.config.every
        return {"updates": self.updates, "skipped": self.skipped, "every": self.config.every,
                "effective_interval": covered / self.updates if self.updates else None,
                "fold_threads": getattr(self, "_threads", self.threads)}

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        self.wait()
        if state.is_world_process_zero:
            self.save(model, processing_class)

    def state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The model's state dict with every trainable weight (and its tied aliases) replaced by
        its EMA, in the weight's own dtype."""
        by_id = {id(p): self.ema[n] for n, p in self._params.items()}
        out = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            if id(p) in by_id:
                out[name] = by_id[id(p)].to(p.dtype)
        for name, t in model.state_dict().items():
            out.setdefault(name, t.detach().cpu())
        return out

    def save(self, model: torch.nn.Module, tokenizer=None) -> Path:
        """Write the EMA weights as an HF checkpoint (config, weights, tokenizer) to out_dir."""
        tmp = self.out_dir.with_name(self.out_dir.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        model.save_pretrained(tmp, state_dict=self.state_dict(model))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        tmp.rename(self.out_dir)
        return self.out_dir
