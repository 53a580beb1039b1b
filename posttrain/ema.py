"""EMA of the trainable weights in CPU memory, updated in the background (DeepSeek-V3 §3.2.3).

After every `every` optimizer steps the loop only snapshots the weights into a preallocated CPU
buffer (a copy, non-blocking from a GPU into pinned memory, ordered by a CUDA event) and hands it to
a worker thread, which folds it into the FP32 EMA: `ema ← decay · ema + (1 − decay) · θ`, on one
core. The loop waits only if the worker is two snapshots behind. The EMA costs no GPU memory and
is saved at the end as its own HF checkpoint, which `save_final` moves to `<model_dir>/ema/`
(evaluate it with `posttrain eval ... --weights ema`).

Recipe: `ema: {decay: 0.999, every: 1}`. Starts from the weights at the start of training; a
resumed run starts a new EMA from the resumed weights.

Written by hand: torch's `AveragedModel` keeps the average on the model's device and updates it
synchronously in the loop, the two things this callback exists to avoid.
"""

from __future__ import annotations

import queue
import shutil
import threading
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


# torch runs an elementwise op on one thread below this many elements (at::internal::GRAIN_SIZE).
GRAIN = 32768


def fold(avg: torch.Tensor, new: torch.Tensor, weight: float) -> None:
    """`avg ← avg + weight · (new − avg)` in slices under torch's parallel grain, so the worker
    uses one core: torch's intra-op thread count is process-wide, and a worker running on all of
    them would take the training loop's cores (measured: bench/ema.py)."""
    flat_avg, flat_new = avg.view(-1), new.reshape(-1)
    for i in range(0, flat_avg.numel(), GRAIN):
        flat_avg[i:i + GRAIN].lerp_(flat_new[i:i + GRAIN].float(), weight)


class EMACallback(TrainerCallback):
    """Keeps the EMA and writes it as an HF checkpoint to `out_dir` when training ends."""

    def __init__(self, config: EMAConfig, out_dir: Path, slots: int = 2):
        self.config = config
        self.out_dir = Path(out_dir)
        self.slots = slots
        self.updates = 0
        self.ema: dict[str, torch.Tensor] = {}
        self._params: dict[str, torch.nn.Parameter] = {}
        self._worker: threading.Thread | None = None
        self._error: BaseException | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if hasattr(model, "peft_config"):
            raise UserError("ema with LoRA is not supported; train full weights or drop `ema:`")
        self._params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.ema = {n: p.detach().to("cpu", torch.float32, copy=True)
                    for n, p in self._params.items()}
        pin = torch.cuda.is_available() and any(p.is_cuda for p in self._params.values())
        self._free: queue.Queue = queue.Queue()
        for _ in range(self.slots):
            self._free.put({n: torch.empty(p.shape, dtype=p.dtype, pin_memory=pin)
                            for n, p in self._params.items()})
        self._todo: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=self._work, name="ema", daemon=True)
        self._worker.start()
        if self.out_dir.exists():   # left by an earlier attempt
            shutil.rmtree(self.out_dir)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.config.every == 0:
            self.snapshot()

    def snapshot(self) -> None:
        """Copy the current weights into a free buffer and queue it for the worker."""
        if self._error is not None:
            raise RuntimeError("EMA worker failed") from self._error
        buf = self._free.get()     # blocks only if the worker is `slots` updates behind
        with torch.no_grad():      # one fused copy for all tensors: per-tensor calls cost more
            torch._foreach_copy_(list(buf.values()), [p.detach() for p in self._params.values()],
                                 non_blocking=True)
        event = None
        if any(p.is_cuda for p in self._params.values()):
            event = torch.cuda.Event()
            event.record()
        self._todo.put((buf, event))

    def _work(self) -> None:
        weight = 1.0 - self.config.decay
        while True:
            item = self._todo.get()
            if item is None:
                return
            buf, event = item
            try:
                if event is not None:
                    event.synchronize()
                with torch.no_grad():
                    for name, avg in self.ema.items():
                        fold(avg, buf[name], weight)
                self.updates += 1
            except BaseException as e:  # noqa: BLE001 - re-raised in the training thread
                self._error = e
            finally:
                self._free.put(buf)

    def wait(self) -> None:
        """Block until every queued snapshot is folded in, then stop the worker."""
        if self._worker is not None:
            self._todo.put(None)
            self._worker.join()
            self._worker = None
        if self._error is not None:
            raise RuntimeError("EMA worker failed") from self._error

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
