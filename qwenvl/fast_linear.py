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

The vision tower's linears only ever see many rows (an image encode), never a decode GEMV. Where torch's bf16 matmul
runs on bf16 instructions (AMX / AVX512-BF16), F.linear reorders the weight into oneDNN's blocked layout on every
call, which costs one read and write of the weight per call. `PackedLinear` holds the weight in that layout instead
(the plain one is freed: no extra byte) and multiplies without the reorder, with the same bits (tested). Measured on
the Intel Xeon with AMX (2 threads, Qwen2-VL-2B's ViT, one 448 px image): encode 1.38 -> 1.24 s; [310 x 1536] by
[8960 x 1536] 1323 -> 2040 GFLOP/s. The LLM keeps plain weights: its decode kernels read them row by row, and a
second, packed copy for the prefill would cost the LLM's bytes again.

    use_fast_linears(model)        # every LLM block linear and lm_head (Qwen-VL or Qwen2-VL); returns the count
    use_fast_vision_linears(model) # the other linears (vision tower, adapter / merger): packed (bf16 on bf16
                                   # hardware), else FastLinear (the bf16 upcast on CPUs without bf16 instructions)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import quant_kernels
from .heap import release_free_pages
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


class PackedLinear(nn.Module):
    """nn.Linear's result for many rows of bf16 input, its weight held in oneDNN's blocked layout (inference only).

    `weight` is a plain copy made on access, and state_dict() holds it under the same key; load_state_dict packs
    what it is given. Anything but bf16 input without gradients runs F.linear on that copy (the reference path)."""

    def __init__(self, linear: nn.Module, rows_hint: int = 1024):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.rows_hint = rows_hint                   # oneDNN picks the blocking for about this many rows
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows_hint)   # opaque
        self.bias = linear.bias

    @property
    def packed_nbytes(self) -> int:
        """The bf16 weight's bytes (the packed tensor is opaque: parameters() and nbytes do not see it)."""
        return self.in_features * self.out_features * 2

    @property
    def weight(self) -> Tensor:
        return self.packed.to_dense()                # [out, in]: the same bits as the weight packed

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype != torch.bfloat16 or (torch.is_grad_enabled() and x.requires_grad):
            return F.linear(x, self.weight, self.bias)
        rows = x.reshape(-1, self.in_features)                                         # [M, in]
        y = torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, "none", [], "")
        return y.view(*x.shape[:-1], self.out_features)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight                                    # nn.Linear's order
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        weight = state_dict.get(prefix + "weight")
        if weight is None:
            missing_keys.append(prefix + "weight")
        elif weight.shape != (self.out_features, self.in_features):
            error_msgs.append(f"size mismatch for {prefix}weight: {tuple(weight.shape)} in the state dict, "
                              f"{(self.out_features, self.in_features)} here")
        else:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(torch.bfloat16), self.rows_hint)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if prefix + "weight" in unexpected_keys:     # nn.Module's check knows only `bias`; the weight was taken above
            unexpected_keys.remove(prefix + "weight")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def packable(linear: nn.Module) -> bool:
    """Whether PackedLinear applies: a bf16 weight, and torch's matmul on bf16 instructions with oneDNN here."""
    return (linear.weight.dtype == torch.bfloat16 and linear.weight.device.type == "cpu"
            and torch.backends.mkldnn.is_available() and quant_kernels.bf16_is_native()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def use_fast_vision_linears(model: nn.Module) -> int:
    """Swap every nn.Linear left in the model (the vision tower, the adapter or merger) for PackedLinear where it
    applies, else FastLinear, in place; the count. Call after use_fast_linears."""
    found = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
             if type(child) is nn.Linear]
    for parent, name in found:                       # one at a time: each plain weight is freed as it is packed
        if _swap_vision_linear(parent, name):
            release_free_pages()                     # its pages: the packed copies do not reuse them
    return len(found)


def _swap_vision_linear(parent: nn.Module, name: str) -> bool:
    """Swap one; whether it was packed (its plain weight freed)."""
    child = getattr(parent, name)
    packed = packable(child)
    setattr(parent, name, PackedLinear(child) if packed else FastLinear(child))
    return packed
