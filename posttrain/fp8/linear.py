"""FP8 training layers: the three GEMMs of a Linear layer (Fprop, Dgrad, Wgrad) in E4M3 with
fine-grained scales, FP32 master weights, as in DeepSeek-V3 §3.3.

- Fprop  `y  = x · Wᵀ`   x in 1x128 tiles along K, W in 128x128 blocks.
- Dgrad  `dx = dy · W`   dy in 1x128 tiles along the output features, W's blocks transposed.
- Wgrad  `dW = dyᵀ · x`  both in 1x128 tiles along the tokens (the reduction dimension): Fprop
  caches x quantized once more, from high precision, in 128x1 tiles (Transformer Engine's
  column-wise copy), rather than re-tiling its 1x128 FP8 copy, which would round x twice; dy is
  quantized along the tokens too. This also covers o_proj's input, which the paper caches in
  E5M6: here it is E4M3 like every other cached activation, but rounded once (E5M6 is no torch
  dtype to emulate faithfully).

Scales are powers of two by default (`FP8Config.pow2_scales`, as in the paper and TE).

Operands are quantized by `cast.quantize_tiles` (one fused pass per operand on CUDA, the transposed
Wgrad copy included) and the weight once per optimizer step (posttrain.fp8.cache); the GEMMs run
on cuBLAS where it takes them (posttrain.fp8.gemm), any width: operands and scales are padded to
its rules (posttrain.fp8.layout). Under autocast the layer returns autocast's dtype (BF16).

`convert_to_fp8(model)` swaps the eligible Linear layers and the routed experts of a
DeepSeek-V3-style MoE (posttrain.fp8.experts: one grouped GEMM per projection for all experts);
the embedding, output head, MoE router, norms and the attention operator
itself stay in high precision, as in the paper. State-dict keys do not change, so the converted
model saves and loads as the original architecture. An `FP8Config` says which of the three GEMMs
run in FP8, which more layers stay in high precision, and whether the reference GEMM emulates a
limited-precision accumulator (the ablations of bench/fp8.py; a recipe's `fp8: {...}`).
"""

from __future__ import annotations

import torch
from torch import nn

from posttrain.fp8.cache import weight_blocks
from posttrain.fp8.cast import quantize_tiles
from posttrain.fp8.config import DEFAULT, KEEP_HIGH_PRECISION, FP8Config, output_dtype
from posttrain.fp8.experts import FP8Experts
from posttrain.fp8.gemm import fp8_gemm, limited_precision_dot
from posttrain.fp8.quantize import FP8Tensor, from_saved, to_saved

__all__ = ["DEFAULT", "KEEP_HIGH_PRECISION", "FP8Config", "FP8Experts", "FP8Linear",
           "convert_to_fp8", "fp8_linear"]


def gemm(a: FP8Tensor, b: FP8Tensor, out_dtype: torch.dtype, config: FP8Config, name: str = ""
         ) -> torch.Tensor:
    """FP8 `A @ Bᵀ`, through the emulated limited accumulator when the config asks for it."""
    if config.accumulator_bits is None:
        return fp8_gemm(a, b, out_dtype=out_dtype, name=name)
    # Dequantized operands multiply to the block-scaled products the accumulator sums.
    return limited_precision_dot(a.dequantize(), b.dequantize(), bits=config.accumulator_bits,
                                 promote_every=config.promote_every).to(out_dtype)


class _FP8LinearFn(torch.autograd.Function):
    """`x @ wᵀ` with the config's GEMMs in FP8; returns grads in the dtypes of x and w."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, config: FP8Config) -> torch.Tensor:
        shape = x.shape
        pow2 = config.pow2_scales
        x2 = x.reshape(-1, shape[-1])
        name = f"Linear {weight.shape[1]}->{weight.shape[0]}"
        out_dtype = output_dtype(x)
        # One pass over x: its 1x128 tiles for Fprop and, for Wgrad, x quantized once more from
        # high precision in 128x1 tiles (Transformer Engine's column-wise copy), cached for
        # backward as the paper caches its FP8 activations.
        xq, xt = quantize_tiles(x2, pow2, rows=config.fprop, transpose=config.wgrad)
        wq, wt = (weight_blocks(weight, pow2, transpose=config.dgrad)
                  if config.fprop or config.dgrad else (None, None))
        if config.fprop:
            y = gemm(xq, wq, out_dtype, config, f"{name} Fprop")
        else:
            y = (x2.float() @ weight.float().t()).to(out_dtype)
        ctx.config, ctx.name = config, name
        (xt_tensors, xt_meta), (wt_tensors, wt_meta) = to_saved(xt), to_saved(wt)
        ctx.meta = (x.dtype, weight.dtype, shape, weight.shape, xt_meta, wt_meta)
        # The operands backward reads: FP8 copies, or high precision for a GEMM not in FP8.
        ctx.save_for_backward(x2 if not config.wgrad else None,
                              weight if not config.dgrad else None, *xt_tensors, *wt_tensors)
        return y.reshape(*shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x_hp, w_hp, *saved = ctx.saved_tensors
        x_dtype, w_dtype, shape, w_shape, xt_meta, wt_meta = ctx.meta
        xt, wt = from_saved(saved[:2], xt_meta), from_saved(saved[2:], wt_meta)
        config = ctx.config
        gy = grad_out.reshape(-1, w_shape[0])
        want_x, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # One pass over dy: 1x128 tiles for Dgrad, 128x1 tiles (along the tokens) for Wgrad.
        gq, gt = quantize_tiles(gy, config.pow2_scales, rows=want_x and config.dgrad,
                                transpose=want_w and config.wgrad)
        grad_x = grad_w = None
        if want_x:
            if config.dgrad:
                grad_x = gemm(gq, wt, x_dtype, config, f"{ctx.name} Dgrad")
            else:
                grad_x = (gy.float() @ w_hp.float()).to(x_dtype)
            grad_x = grad_x.reshape(shape)
        if want_w:
            if config.wgrad:
                grad_w = gemm(gt, xt, torch.float32, config, f"{ctx.name} Wgrad").to(w_dtype)
            else:
                grad_w = (gy.float().t() @ x_hp.float()).to(w_dtype)
        return grad_x, grad_w, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               config: FP8Config = DEFAULT) -> torch.Tensor:
    """Functional FP8 `F.linear`."""
    y = _FP8LinearFn.apply(x, weight, config)
    # In y's dtype, as nn.Linear under autocast: an FP32 bias would promote a BF16 output.
    return y + bias.to(y.dtype) if bias is not None else y


class FP8Linear(nn.Linear):
    """`nn.Linear` whose GEMMs run in FP8; the weight stays an FP32 (master) parameter.
    `linear_fn` is the GEMM it calls (a benchmark puts another precision's on the same layers)."""

    fp8_config: FP8Config = DEFAULT
    linear_fn = staticmethod(fp8_linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fn(x, self.weight, self.bias, self.fp8_config)

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: FP8Config = DEFAULT) -> FP8Linear:
        """Same parameters (shared, not copied) behind an FP8 forward."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.bias = linear.bias
        new.fp8_config = config
        return new


def _keep(name: str, extra: tuple[str, ...] = ()) -> bool:
    """Kept in high precision: a listed name, a name ending in one, or a module inside one."""
    return any(name == k or name.endswith("." + k) or f".{k}." in f".{name}."
               for k in (*KEEP_HIGH_PRECISION, *extra))


def _is_fused_experts(module: nn.Module) -> bool:
    """transformers' fused experts without biases (DeepSeek-V3, Qwen-MoE style)."""
    w = getattr(module, "gate_up_proj", None)
    return (isinstance(w, nn.Parameter) and w.dim() == 3
            and isinstance(getattr(module, "down_proj", None), nn.Parameter)
            and getattr(module, "gate_up_proj_bias", None) is None)


def convert_to_fp8(model: nn.Module, config: FP8Config = DEFAULT) -> dict[str, int]:
    """Swap eligible layers of `model` in place; returns counts of what was swapped."""
    counts = {"linear": 0, "experts": 0}
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if _keep(full, config.keep) or isinstance(child, (FP8Linear, FP8Experts)):
                continue
            if type(child) is nn.Linear:
                setattr(module, child_name, FP8Linear.from_linear(child, config))
                counts["linear"] += 1
            elif _is_fused_experts(child):
                setattr(module, child_name, FP8Experts(child, config))
                counts["experts"] += 1
    return counts
