"""Which implementation runs an FP8 op here, and the record of every fallback.

On a CPU the reference implementations run (posttrain.fp8.quantize, .gemm, .grouped): that is the
design, not a fallback. On a CUDA device the fast paths run: cuBLAS blockwise `scaled_mm` for the
dense GEMMs (SM90), Triton kernels for quantization and the grouped expert GEMMs. Each kind is
probed once per process against the reference on awkward shapes (rows not a multiple of 16, a
K-block count not a multiple of 4). A kind that is missing, fails or disagrees runs the reference
instead, and that is never silent: `fallback` warns once per op and layer shape and records it in
`FALLBACKS`, which bench/gpu_check.py fails on. `reset()` forgets probes and the record.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

# What fell back to the reference on a CUDA device: "op: shape" -> why. Read by gpu_check.
FALLBACKS: dict[str, str] = {}
_probes: dict[tuple, str | None] = {}   # kind -> None (runs) or why not
# kind -> its probe: None if the kernel runs and agrees, else why not. Each kernel's own module
# registers its probe (gemm: "cublas", cast: "quantize", grouped: "grouped"), so this module
# imports none of them.
PROBES: dict[str, object] = {}


@dataclass(frozen=True)
class Choice:
    """Attributes:
        fast: The CUDA kernel runs.
        why: Why it does not, on a CUDA device; empty where the reference is the intended path
            (a CPU).
    """

    fast: bool
    why: str = ""


def reset() -> None:
    """Forget the probes' verdicts and the recorded fallbacks (tests; a new device)."""
    FALLBACKS.clear()
    _probes.clear()


def fallback(op: str, shape: str, why: str) -> None:
    """Record that `op` on `shape` ran the reference on a CUDA device; warn the first time."""
    key = f"{op}: {shape}"
    if key not in FALLBACKS:
        FALLBACKS[key] = why
        warnings.warn(f"fp8: {op} of {shape} runs the reference implementation on CUDA, not the "
                      f"FP8 kernel: {why}", RuntimeWarning, stacklevel=3)


def choose_gemm(a_block: tuple[int, int], b_block: tuple[int, int], device: torch.device
                ) -> Choice:
    """cuBLAS blockwise scaled_mm for this block pair on `device`, or why not."""
    if device.type != "cuda":
        return Choice(False)
    why = _probed(("cublas", a_block, b_block), lambda: PROBES["cublas"](a_block, b_block))
    return Choice(why is None, why or "")


def choose_triton(device: torch.device, kind: str) -> Choice:
    """The Triton kernels of `kind` ("quantize" or "grouped") on `device`, or why not."""
    if device.type != "cuda":
        return Choice(False)
    why = _probed(("triton", kind), PROBES[kind])
    return Choice(why is None, why or "")


def refuse(kind: tuple, why: str) -> None:
    """Stop using a kind that failed at run time (a shape its probe did not cover)."""
    _probes[kind] = why


def _probed(kind: tuple, probe) -> str | None:
    if kind not in _probes:
        try:
            _probes[kind] = probe()
        except Exception as e:  # noqa: BLE001 - any failure of an optional kernel means: don't use it
            _probes[kind] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return _probes[kind]


def probe_inputs(*shapes: tuple[int, ...]) -> list[torch.Tensor]:
    """Gaussian test inputs on the GPU with a few large entries (outlier tiles), for the probes."""
    g = torch.Generator(device="cuda").manual_seed(0)
    out = []
    for shape in shapes:
        x = torch.randn(*shape, device="cuda", generator=g)
        x.view(-1)[:: 997] *= 50.0
        out.append(x)
    return out
