"""DeepSeek-V3-style fine-grained FP8: quantization (quantize, the reference; cast, what the layers run: fused kernels on CUDA in
kernels),
blockwise GEMM (gemm, padded to cuBLAS's rules in layout), grouped expert GEMMs (grouped),
training layers (linear, experts; weights quantized once per step in cache), the backend choice
and fallback record (backend) and the FP8 checkpoint format (checkpoint).

`fp8: true` (or `fp8: {...}`, an `FP8Config`) in a recipe calls `convert_to_fp8` on the stage's
model (posttrain.stages.training), which loads it with FP32 master weights.
"""

from posttrain.fp8.config import FP8Config
from posttrain.fp8.experts import FP8Experts
from posttrain.fp8.gemm import calc_diff, fp8_gemm, gemm_reference, limited_precision_dot
from posttrain.fp8.linear import FP8Linear, convert_to_fp8, fp8_linear
from posttrain.fp8.quantize import FP8Tensor, quantize, quantize_weight

__all__ = ["FP8Config", "FP8Experts", "FP8Linear", "FP8Tensor", "calc_diff", "convert_to_fp8", "fp8_gemm",
           "fp8_linear", "gemm_reference", "limited_precision_dot", "quantize", "quantize_weight"]
