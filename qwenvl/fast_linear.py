"""Float linears whose decode GEMV runs on the compiled kernel, as a module swap (checkpoint keys unchanged).

Decoding multiplies one activation row by every weight, so it is bound by reading the weights. On the 2-core
AVX-512 machine torch's GEMV reads float32 weights at ~19-22 GB/s but bfloat16 ones at only ~8-11 GB/s, which makes
a bf16 model decode *slower* than the same model in fp32 although it reads half the bytes. `FastLinear` keeps the
weight as it is and sends a few rows (decoding) to `quant_kernels.dense_linear`, which reads bf16 at ~20 GB/s
(float32 sums of the exact products, as torch's matmul), and everything else (prefill, training) to F.linear. On
an AMD EPYC (Zen 4) torch's float32 GEMV reads 12-15 GB/s, the kernel 25-38 GB/s, so float32 weights go to the
kernel too. It holds the very `weight` / `bias` Parameters of the nn.Linear it replaces.

    use_fast_linears(model)        # every LLM block linear and lm_head (Qwen-VL or Qwen2-VL); returns the count
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from . import quant_kernels
from .quantize import swap_linears


class FastLinear(nn.Module):
    """nn.Linear's parameters and result; the decode GEMV (bf16 or float32 weights) on the compiled kernel."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight                     # the same Parameter (a tied lm_head stays tied)
        self.bias = linear.bias

    def forward(self, x: Tensor) -> Tensor:
        y = quant_kernels.dense_linear(x, self.weight, self.bias)                 # None: not a decode GEMV
        return F.linear(x, self.weight, self.bias) if y is None else y

    def decode_kernel(self) -> quant_kernels.KernelLinear | None:
        """This layer for qwen2_vl_fast's whole-step kernel (None where forward would not run the dense kernel)."""
        return quant_kernels.dense_kernel(self.weight, self.bias)


def use_fast_linears(model: nn.Module) -> int:
    """Swap the float LLM linears (and lm_head) of a Qwen-VL or Qwen2-VL model for FastLinear, in place."""
    return swap_linears(model, lambda m: FastLinear(m) if type(m) is nn.Linear else m, lm_head=True)
