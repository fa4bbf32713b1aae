"""Random-weight models for the benchmarks, built straight in their final dtype / quantized form (no float copy).

Imported by bench_quant.py and bench_inference.py (run as scripts, so this folder is on sys.path).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from qwenvl.quantize import GPTQLinear, Int4Linear, Int8Linear


def fill_quantized(model: nn.Module, generator: torch.Generator) -> None:
    """Random codes with the scale of a N(0, 0.02) weight (a real model's decode reads the same bytes)."""
    for m in model.modules():
        if isinstance(m, Int8Linear):
            m.weight.random_(-127, 128, generator=generator)
            m.scales.fill_(0.02 * math.sqrt(3) / 127)
        elif isinstance(m, Int4Linear):
            m.qweight.random_(0, 256, generator=generator)
            m.scales.fill_(0.02 * math.sqrt(3) / 8)
            m.zeros.fill_(8)
        elif isinstance(m, GPTQLinear):
            m.qweight.random_(-2**31, 2**31, generator=generator)
            m.qzeros.fill_(0x77777777)                   # zero point 8 in every nibble (stored as zero - 1)
            m.scales.fill_(0.02 * math.sqrt(3) / 8)
            m.g_idx.copy_(torch.arange(m.in_features) // m.group_size)
        if isinstance(m, (Int8Linear, Int4Linear, GPTQLinear)) and m.bias is not None:
            m.bias.zero_()


def materialise(model: nn.Module, float_dtype: torch.dtype, generator: torch.Generator) -> nn.Module:
    """A meta-device model on the CPU: float parameters allocated directly in float_dtype, random weights."""
    for p in model.parameters():
        p.data = p.data.to(float_dtype)           # on meta: free; the float32 model is never allocated
    model.to_empty(device="cpu")
    model.init_weights(generator)                 # float parameters (v1: the ViT's own init too)
    fill_quantized(model, generator)
    return model.eval()
