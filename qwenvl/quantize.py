"""Weight-only quantization as module swaps on the LLM's linears (the ViT and adapter stay in float).

`GPTQLinear` holds a linear in the layout of the official Qwen-VL-Chat-Int4 checkpoints (AutoGPTQ, 4 bits,
group size 128, "zero - 1" offset format) under the checkpoint's own buffer names, so such a checkpoint
loads as a plain state dict, without AutoGPTQ or CUDA:

    qweight int32 [in/8, out]   8 input codes per word, input 8r+j in bits 4j..4j+3 (least significant first)
    qzeros  int32 [G, out/8]    8 output zero points per word, stored as zero - 1
    scales  fp16  [G, out]      step per group and output
    g_idx   int32 [in]          group of each input (i // group_size without act-order)
    bias    fp16  [out]         always present (zeros where the float model has none)
    W[o, i] = scales[g_idx[i], o] * (q[i, o] - zero[g_idx[i], o])
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The linears of each decoder block that the official Int4 checkpoints quantize (lm_head and wte are not).
LLM_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj")


def unpack_int4(words: Tensor, dim: int) -> Tensor:
    """Unpack int32 words [R, C] into 8 unsigned 4-bit codes each along `dim` (0 or 1), low nibble first.

    Example: the word 0x76543210 unpacks to [0, 1, 2, 3, 4, 5, 6, 7]. Negative words (top nibble >= 8)
    are fine: the shift is arithmetic, but the mask keeps only the nibble.
    """
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=words.device)       # [8]
    r, c = words.shape
    if dim == 0:
        codes = (words[:, None, :] >> shifts[None, :, None]) & 0xF                  # [R, 8, C]
        return codes.reshape(r * 8, c).to(torch.uint8)
    if dim == 1:
        codes = (words[:, :, None] >> shifts[None, None, :]) & 0xF                  # [R, C, 8]
        return codes.reshape(r, c * 8).to(torch.uint8)
    raise ValueError(f"{dim=} must be 0 or 1")


class GPTQLinear(nn.Module):
    """A 4-bit GPTQ linear (official Int4 layout), dequantized on the fly (reference path)."""

    def __init__(self, in_features: int, out_features: int, group_size: int = 128, bits: int = 4):
        super().__init__()
        if bits != 4:
            raise ValueError(f"only 4-bit GPTQ checkpoints are supported, got {bits=}")
        if in_features % group_size or in_features % 8 or out_features % 8:
            raise ValueError(f"GPTQ needs {in_features=} divisible by {group_size=} and by 8, {out_features=} by 8")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(in_features // 8, out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(groups, out_features // 8, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16))

    def codes(self) -> tuple[Tensor, Tensor]:
        """(q [in, out] uint8 codes, zero [G, out] uint8 zero points after the +1)."""
        q = unpack_int4(self.qweight, dim=0)                                          # [in, out]
        zero = (unpack_int4(self.qzeros, dim=1).int() + 1) & 0xF                      # [G, out]
        return q, zero.to(torch.uint8)

    def dequantize(self) -> Tensor:
        """The float32 weight [out, in], exactly scale * (q - zero) (the product is exact in float32)."""
        q, zero = self.codes()
        g = self.g_idx.long()
        w_t = self.scales.float()[g] * (q.float() - zero.float()[g])                  # [in, out]
        return w_t.t().contiguous()

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.dequantize().to(x.dtype), self.bias.to(x.dtype))


def swap_linears(model: nn.Module, make: callable) -> int:
    """Replace each LLM block linear (LLM_LINEARS in `transformer.h.*`) by `make(linear)`; returns the count."""
    count = 0
    for block in model.transformer.h:
        for path in LLM_LINEARS:
            parent_name, name = path.split(".")
            parent = getattr(block, parent_name)
            setattr(parent, name, make(getattr(parent, name)))
            count += 1
    return count


def gptq_swap(model: nn.Module, quantization_config: dict) -> None:
    """Turn the model's LLM linears into GPTQLinear shells (meta or real) matching `quantization_config`."""
    cfg = quantization_config
    if cfg.get("quant_method", "gptq") != "gptq":
        raise ValueError(f"unsupported quant_method {cfg.get('quant_method')!r}")
    if cfg.get("desc_act"):
        raise ValueError("GPTQ checkpoints with desc_act=true (act-order) are not supported yet")
    group = int(cfg.get("group_size", 128))

    def make(linear: nn.Linear) -> GPTQLinear:
        device = linear.weight.device
        with torch.device(device):
            return GPTQLinear(linear.in_features, linear.out_features, group, int(cfg.get("bits", 4)))

    swap_linears(model, make)
