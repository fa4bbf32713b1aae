"""Float linears whose decode GEMV runs on the compiled kernel, as a module swap (checkpoint keys unchanged).

Decoding multiplies one activation row by every weight, so it is bound by reading the weights. On the 2-core
AVX-512 machine torch's GEMV reads float32 weights at ~19-22 GB/s but bfloat16 ones at only ~8-11 GB/s, which makes
a bf16 model decode *slower* than the same model in fp32 although it reads half the bytes. `FastLinear` keeps the
weight as it is and sends a few rows (decoding) to `quant_kernels.dense_linear`, which reads bf16 at ~20 GB/s
(float32 sums of the exact products, as torch's matmul), and everything else (prefill, training) to F.linear. On
an AMD EPYC (Zen 4) torch's float32 GEMV reads 12-15 GB/s, the kernel 25-38 GB/s, so float32 weights go to the
kernel too. It holds the very `weight` / `bias` Parameters of the nn.Linear it replaces.

Many rows (a prefill, an image encode) of a bf16 layer on a CPU without bf16 matmul instructions (AVX2 x86:
`quant_kernels.linear`) run in float32 on a float32 copy of the weight made for the call, rounded to
bf16 at the end: torch emulates bf16 there at a sixth of its float32 speed, and the copy costs one read and write of
the weight, small beside quant_kernels.UPCAST_MIN_ROWS or more rows of multiply-adds. The products are the same exact bf16
products, summed in float32 as oneDNN's bf16 kernel sums them (in another order).

    use_fast_linears(model)        # every LLM block linear and lm_head (Qwen-VL or Qwen2-VL); returns the count
    use_fast_vision_linears(model) # the other linears (vision tower, adapter / merger): only the bf16 upcast applies
"""
from __future__ import annotations

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
        return quant_kernels.linear(x, self.weight, self.bias) if y is None else y

    def decode_kernel(self) -> quant_kernels.KernelLinear | None:
        """This layer for qwen2_vl_fast's whole-step kernel (None where forward would not run the dense kernel)."""
        return quant_kernels.dense_kernel(self.weight, self.bias)


def use_fast_linears(model: nn.Module) -> int:
    """Swap the float LLM linears (and lm_head) of a Qwen-VL or Qwen2-VL model for FastLinear, in place."""
    return swap_linears(model, lambda m: FastLinear(m) if type(m) is nn.Linear else m, lm_head=True)


def use_fast_vision_linears(model: nn.Module) -> int:
    """Swap every nn.Linear left in the model (the vision tower, the adapter or merger) for FastLinear, in place;
    the count. Call after use_fast_linears."""
    found = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if type(child) is nn.Linear]
    for parent, name, child in found:
        setattr(parent, name, FastLinear(child))
    return len(found)
