"""Quantization as the training layers run it: one fused Triton pass per operand on a CUDA
device (posttrain.fp8.kernels: amax per tile, power-of-2 scale, cast, and the transposed copy
Wgrad reads, from one read of the input), the reference (posttrain.fp8.quantize) elsewhere.

Why Triton of our own: torchao's blockwise FP8 training kernels are a prototype whose scales
are not the paper's power-of-two ones and which has no 128x1 copy from one read; Transformer
Engine is a multi-GB CUDA build. The kernels are checked bit for bit against the reference, on
CPU by Triton's interpreter (tests/test_fp8_kernels.py) and on the GPU by the probe below; a
kernel that is refused runs the reference with a warned, recorded fallback (posttrain.fp8.backend).
"""

from __future__ import annotations

import torch

from posttrain.fp8 import backend
from posttrain.fp8.quantize import TILE, WEIGHT_BLOCK, FP8Tensor, quantize


def quantize_tiles(x: torch.Tensor, pow2: bool, rows: bool = True, transpose: bool = False
                   ) -> tuple[FP8Tensor | None, FP8Tensor | None]:
    """`x` (m, k) in 1x128 tiles along k (if `rows`) and `xᵀ` in 1x128 tiles along m, i.e. 128x1
    tiles of x (if `transpose`: the Wgrad operand, quantized once from high precision).

    On a CUDA device one fused pass reads x once and writes both; elsewhere, or where the kernel
    is refused (a warned fallback), the reference, which gives the same values.
    """
    choice = backend.choose_triton(x.device, "quantize")
    if choice.fast:
        from posttrain.fp8 import kernels
        return kernels.quantize_tiles(x, pow2, rows, transpose)
    if choice.why:
        backend.fallback("quantize", f"1x128 tiles of a {tuple(x.shape)} tensor", choice.why)
    return (quantize(x, TILE, pow2) if rows else None,
            quantize(x.t(), TILE, pow2) if transpose else None)


def quantize_blocks(w: torch.Tensor, pow2: bool, transpose: bool = False
                    ) -> tuple[FP8Tensor, FP8Tensor | None]:
    """A weight (out, in), or a stack (E, out, in), in 128x128 blocks, and (if `transpose`) the
    blocks of its transpose, Dgrad's operand, from the same pass."""
    choice = backend.choose_triton(w.device, "quantize")
    if choice.fast:
        from posttrain.fp8 import kernels
        return kernels.quantize_blocks(w, pow2, transpose)
    if choice.why:
        backend.fallback("quantize", f"128x128 blocks of a {tuple(w.shape)} weight", choice.why)
    q = quantize(w, WEIGHT_BLOCK, pow2)
    return q, (q.t() if transpose else None)


def _probe_quantize() -> str | None:
    """None if the kernels equal the reference bit for bit (both scale rules), else why not."""
    from posttrain.fp8 import kernels

    x, w = backend.probe_inputs((200, 300), (2, 200, 300))
    for pow2 in (True, False):
        rows, cols = kernels.quantize_tiles(x, pow2, True, True)
        for got, want in ((rows, quantize(x, TILE, pow2)), (cols, quantize(x.t(), TILE, pow2))):
            if not _same(got, want):
                return f"1x128 quantize kernel differs from the reference (pow2={pow2})"
        blocks, blocks_t = kernels.quantize_blocks(w, pow2, True)
        want = quantize(w, WEIGHT_BLOCK, pow2)
        if not (_same(blocks, want) and _same(blocks_t, want.t())):
            return f"128x128 quantize kernel differs from the reference (pow2={pow2})"
    return None


def _same(got: FP8Tensor, want: FP8Tensor) -> bool:
    """Bit-equal values on the unpadded part (the kernel may pad rows further)."""
    r, c = want.shape
    return (torch.equal(got.dequantize(), want.dequantize())
            and torch.equal(got.data[..., :r, :c].view(torch.uint8),
                            want.data[..., :r, :c].view(torch.uint8)))


backend.PROBES["quantize"] = _probe_quantize
