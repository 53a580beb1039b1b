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

`convert_to_fp8(model)` swaps the eligible Linear layers and the routed experts of a
DeepSeek-V3-style MoE; the embedding, output head, MoE router, norms and the attention operator
itself stay in high precision, as in the paper. State-dict keys do not change, so the converted
model saves and loads as the original architecture. An `FP8Config` says which of the three GEMMs
run in FP8, which more layers stay in high precision, and whether the reference GEMM emulates a
limited-precision accumulator (the ablations of bench/fp8.py; a recipe's `fp8: {...}`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from posttrain.errors import UserError
from posttrain.fp8.gemm import fp8_gemm, limited_precision_dot
from posttrain.fp8.quantize import TILE, FP8Tensor, quantize, quantize_weight

# Module names kept in high precision (the output head, routers, value/score heads).
KEEP_HIGH_PRECISION = ("lm_head", "mlp.gate", "score", "v_head")


@dataclasses.dataclass(frozen=True)
class FP8Config:
    """What trains in FP8 (default: DeepSeek-V3's choice, all three GEMMs of every eligible layer).

    Attributes:
        fprop: `y = x·Wᵀ` in FP8 (else FP32).
        dgrad: `dx = dy·W` in FP8.
        wgrad: `dW = dyᵀ·x` in FP8.
        keep: More module names (or name suffixes, e.g. `self_attn.q_proj`, or a part such as
            `self_attn`) kept in high precision, on top of the head, routers and score heads.
        accumulator_bits: Emulate a tensor-core accumulator that keeps this many significant
            bits (about 14 on H800) in the reference GEMM; null: exact FP32 sums per 128-block.
        promote_every: With `accumulator_bits`: flush the limited accumulator into FP32 every
            this many K (DeepSeek-V3's N_C = 128); null: never (the whole K accumulates limited).
        pow2_scales: Round every scale up to a power of two (the paper's and TE's default);
            false: amax / 448.
    """

    fprop: bool = True
    dgrad: bool = True
    wgrad: bool = True
    keep: tuple[str, ...] = ()
    accumulator_bits: int | None = None
    promote_every: int | None = 128
    pow2_scales: bool = True

    @classmethod
    def parse(cls, value: Any) -> FP8Config:
        """From a recipe's `fp8:` (true, or a mapping of these fields); UserError otherwise."""
        if value is True:
            return cls()
        if not isinstance(value, dict):
            raise UserError(f"fp8: expected true, false or a mapping, got {value!r}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - fields)
        if unknown:
            raise UserError(f"fp8: unknown key {', '.join(unknown)} (known: {', '.join(sorted(fields))})")
        out = cls(**{**value, "keep": tuple(value.get("keep", ()))})
        if out.accumulator_bits is not None and not 2 <= out.accumulator_bits <= 24:
            raise UserError(f"fp8: accumulator_bits must be in [2, 24], got {out.accumulator_bits}")
        if out.promote_every is not None and (out.promote_every <= 0 or out.promote_every % 32):
            raise UserError(f"fp8: promote_every must be a positive multiple of 32, got "
                            f"{out.promote_every}")
        return out


def _gemm(a: FP8Tensor, b: FP8Tensor, out_dtype: torch.dtype, config: FP8Config) -> torch.Tensor:
    """FP8 `A @ Bᵀ`, through the emulated limited accumulator when the config asks for it."""
    if config.accumulator_bits is None:
        return fp8_gemm(a, b, out_dtype=out_dtype)
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
        wq = quantize_weight(weight, pow2)
        if config.fprop:
            y = _gemm(quantize(x2, TILE, pow2), wq, x.dtype, config)
        else:
            y = (x2.float() @ weight.float().t()).to(x.dtype)
        ctx.config = config
        # Backward reads FP8 copies, as the paper caches them: x in 128x1 tiles along the tokens
        # (quantized once, from high precision) for Wgrad, the weight's blocks for Dgrad; a GEMM
        # left in high precision keeps its operand in high precision instead.
        if config.wgrad:
            xt = quantize(x2.t(), TILE, pow2)
            keep_x, xt_data, xt_scale, xt_shape = torch.empty(0), xt.data, xt.scale, xt.shape
        else:
            keep_x, xt_data, xt_scale, xt_shape = x2, torch.empty(0), torch.empty(0), None
        keep_w = weight if not config.dgrad else torch.empty(0)
        ctx.save_for_backward(xt_data, xt_scale, wq.data, wq.scale, keep_x, keep_w)
        ctx.meta = (xt_shape, wq.shape, x.dtype, weight.dtype, shape)
        return y.view(*shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        from posttrain.fp8.quantize import WEIGHT_BLOCK

        xt_data, xt_scale, w_data, w_scale, x_hp, w_hp = ctx.saved_tensors
        xt_shape, w_shape, x_dtype, w_dtype, shape = ctx.meta
        config = ctx.config
        pow2 = config.pow2_scales
        wq = FP8Tensor(w_data, w_scale, w_shape, WEIGHT_BLOCK)
        gy = grad_out.reshape(-1, w_shape[0])
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            if config.dgrad:
                grad_x = _gemm(quantize(gy, TILE, pow2), wq.t(), x_dtype, config)
            else:
                grad_x = (gy.float() @ w_hp.float()).to(x_dtype)
            grad_x = grad_x.view(shape)
        if ctx.needs_input_grad[1]:
            if config.wgrad:
                gy_t = quantize(gy.t(), TILE, pow2)      # dy in 128x1 tiles (1x128 of dyᵀ)
                xt = FP8Tensor(xt_data, xt_scale, xt_shape, TILE)
                grad_w = _gemm(gy_t, xt, torch.float32, config).to(w_dtype)
            else:
                grad_w = (gy.float().t() @ x_hp.float()).to(w_dtype)
        return grad_x, grad_w, None


DEFAULT = FP8Config()


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               config: FP8Config = DEFAULT) -> torch.Tensor:
    """Functional FP8 `F.linear`."""
    y = _FP8LinearFn.apply(x, weight, config)
    return y + bias if bias is not None else y


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


class FP8Experts(nn.Module):
    """Routed experts of a DeepSeek-V3-style MoE (3-D `gate_up_proj`/`down_proj` parameters, as
    transformers stores them) with each expert's two GEMMs in FP8.

    Mirrors transformers' eager experts loop; the parameters are the original ones, so keys,
    checkpoints and the optimizer see no change.
    """

    linear_fn = staticmethod(fp8_linear)  # as FP8Linear's

    def __init__(self, experts: nn.Module, config: FP8Config = DEFAULT):
        super().__init__()
        self.fp8_config = config
        self.num_experts = experts.num_experts
        self.gate_up_proj = experts.gate_up_proj
        self.down_proj = experts.down_proj
        self.act_fn = experts.act_fn

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            # One extra class, as transformers does, for the -1 of tokens routed nowhere.
            mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1)
            mask = mask.permute(2, 1, 0)
            hit = (mask.sum(dim=(-1, -2)) > 0).nonzero().flatten().tolist()
        for e in hit:
            if e == self.num_experts:
                continue
            pos, tok = torch.where(mask[e])
            gate, up = self.linear_fn(hidden_states[tok], self.gate_up_proj[e],
                                      config=self.fp8_config).chunk(2, dim=-1)
            h = self.linear_fn(self.act_fn(gate) * up, self.down_proj[e], config=self.fp8_config)
            out.index_add_(0, tok, (h * top_k_weights[tok, pos, None]).to(out.dtype))
        return out


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
