"""The fast inference paths, switched on in one place for the loaders that serve users: the chat API
(`QWenVL.from_pretrained`), `qwenvl chat` and `qwenvl serve` (both through `families.load_family`).

    model = use_fast_paths(model)      # in place, right after loading for inference; returns the model
    step = fast_step(model)            # the attached decode step (Qwen2-VL: generate's `step=`; Qwen-VL: may
                                       # return None, then run the forward), else None

What it switches on, each held against its reference path by tests/test_fast_decode.py and tests/test_fast_paths.py:
    * FastLinear for the LLM block linears and lm_head (Qwen-VL and Qwen2-VL): bf16 and float32 decode GEMVs run on
      the compiled kernel; prefill rows and anything needing gradients still go to F.linear. Every other linear
      (vision tower, adapter / merger) becomes a PackedLinear where torch's bf16 matmul has bf16 instructions (its
      bf16 weight held in oneDNN's blocked layout: no reorder per call, the same bits), else a FastLinear (many bf16
      rows on a CPU without bf16 instructions run in float32); the patch embedding and the resampler's packed
      projections run quant_kernels.linear through their `project` hooks.
    * Qwen2-VL in float32 / bfloat16: FastDecoder's decode step (q/k/v and gate/up fused as views of the same weights).
    * Qwen2-VL's image encode and prefill: the rotary of q and k and the vision MLP's QuickGELU each in one pass
      over many rows (quant_kernels.rows_rope / rows_quick_gelu_: row_kernels.cpp) instead of 3-8 framework ops.
    * Qwen-VL: the attention of a decode step (one query per row) on the compiled kernel (quant_kernels.
      decode_attention: 13x SDPA's CPU kernel in bf16 at 300 cached tokens, 32 heads); prefills keep SDPA.
    * Qwen-VL in float32 / bfloat16 with fusable MLPs: FastDecoderV1's whole decode step (qwen_vl_fast.py), which
      returns None where it declines (the caller then runs the forward above).
Checkpoint keys and `save_checkpoint`'s output are unchanged. Training and fine-tuning load with the plain
`weights.load_model` and never come here. Turn it off with QWENVL_FAST=0 in the environment, or `fast=False`.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from . import quant_kernels
from .fast_linear import use_fast_linears, use_fast_vision_linears
from .fused_projections import decoder_layers, fusable
from .model import QWenLMHeadModel
from .qwen2_vl import PatchEmbed, Qwen2Attention, Qwen2VL, VisionAttention, VisionMLP
from .qwen2_vl import quick_gelu as reference_quick_gelu
from .qwen2_vl_fast import FastDecoder
from .qwen_vl_fast import FastDecoderV1
from .text import QWenAttention, apply_rope
from .vision import ResamplerAttention, VisionTransformer

ENV = "QWENVL_FAST"
_OFF, _ON = ("0", "false", "no", "off"), ("", "1", "true", "yes", "on")
_DECODER_DTYPES = (torch.float32, torch.bfloat16)       # the dtypes tests/test_fast_decode.py holds the step to
_ATTACHED = "_fast_decoder"                             # model.__dict__ key: (FastDecoder, the modules it fused)


def fast_enabled(fast: bool | None = None) -> bool:
    """`fast` when given, else the QWENVL_FAST environment variable: on unless it is 0 / false / no / off."""
    if fast is not None:
        return bool(fast)
    value = os.environ.get(ENV, "1").strip().lower()
    if value not in _OFF + _ON:
        raise ValueError(f"{ENV}={value!r}: use 1 (fast inference paths, the default) or 0 (the reference paths)")
    return value in _ON


def use_fast_paths(model: nn.Module, fast: bool | None = None) -> nn.Module:
    """Switch a model just loaded for inference (Qwen-VL or Qwen2-VL) to the fast paths in place, unless off."""
    if not fast_enabled(fast):
        return model
    use_fast_linears(model)
    use_fast_vision_linears(model)
    for module in model.modules():
        if isinstance(module, QWenAttention):
            module.attend = attend
        if isinstance(module, (ResamplerAttention, VisionTransformer, PatchEmbed)):
            module.project = quant_kernels.linear
        if isinstance(module, (VisionAttention, Qwen2Attention)):
            module.rotate = rotate
        if isinstance(module, VisionMLP):
            module.quick_gelu = quick_gelu
    if isinstance(model, Qwen2VL) and model.model.embed_tokens.weight.dtype in _DECODER_DTYPES:
        model.__dict__[_ATTACHED] = (FastDecoder(model), _fused_members(model))
    if (isinstance(model, QWenLMHeadModel) and model.transformer.wte.weight.dtype in _DECODER_DTYPES
            and fusable(model)):
        model.__dict__[_ATTACHED] = (FastDecoderV1(model), _fused_members(model))
    return model


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """text.sdpa with one-query rows (decoding) on the decode-attention kernel where it applies."""
    out = quant_kernels.decode_attention(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask) if out is None else out


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """text.apply_rope, on the row kernel where it applies (full-width rotary, float32 tables): the same bits."""
    out = quant_kernels.rows_rope(x, cos, sin)
    return apply_rope(x, cos, sin) if out is None else out


def quick_gelu(h: torch.Tensor) -> torch.Tensor:
    """qwen2_vl.quick_gelu of a fresh activation, in place on the row kernel where it applies."""
    out = quant_kernels.rows_quick_gelu_(h)
    return reference_quick_gelu(h) if out is None else out


def fast_step(model: nn.Module):
    """The decode step `use_fast_paths` attached, or None (use the reference `decode_step`): none attached, or a
    fused projection was swapped since (e.g. by LoRA), which only the reference forward would see."""
    attached = model.__dict__.get(_ATTACHED)
    if attached is None:
        return None
    decoder, members = attached
    now = _fused_members(model)
    return decoder.step if len(now) == len(members) and all(a is b for a, b in zip(now, members)) else None


def _fused_members(model: nn.Module) -> list[nn.Module]:
    """The projections the attached decoder calls through its fused modules (the others it reads from the layer)."""
    layers, groups = decoder_layers(model)
    return [getattr(getattr(layer, parent), m) for layer in layers for parent, members in groups.values()
            for m in members]
