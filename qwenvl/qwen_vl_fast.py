"""Qwen-VL (v1) decode steps in one call: the whole-step kernel of Qwen2-VL (decode_step.cpp) on Qwen-VL's layers.

A Qwen-VL decoder layer is the same computation as a Qwen2-VL one once three things are lined up:
    * attention: c_attn is already packed [q | k | v] with a bias, and every head has its own keys (H = Hk);
    * MLP: c_proj(w1(x) * silu(w2(x))): w2 is the gate, so gate/up is fused as [w2; w1] (fused_projections.py: the
      same weights as views, no copy);
    * rotary angles: the model's own rope_cos_sin at the cache's next position with the NTK alpha the prefill chose
      (dynamic NTK), the values the reference forward computes.
Log-n attention scaling only applies past seq_length: there (and wherever the plan declines: a linear without a
decode kernel, e.g. LoRA; mixed dtypes) `step` returns None and the caller runs the reference forward.

    decoder = FastDecoderV1(model)          # fast_paths.use_fast_paths attaches one
    logits = decoder.step(next_ids, cache)  # [B, V], or None: use model(next_ids[:, None], kv_cache=cache, ...)

Same kernels as the per-op fast path (FastLinear's GEMVs, the decode-attention kernel), with the norm, rotation and
silu * up also in the kernel: the logits agree with the reference forward up to the order of float sums and where
bf16 values are rounded (tests/test_fast_decode_v1.py).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import quant_kernels
from .fused_projections import fuse_projections
from .kv_cache import KVCache
from .model import QWenLMHeadModel
from .qwen2_vl_fast import DecodePlan, FastDecoder
from .text import rope_cos_sin


class FastDecoderV1:
    """Whole decode steps of one Qwen-VL model (fuses the MLP's w2 / w1 in place on construction)."""

    def __init__(self, model: QWenLMHeadModel):
        cfg = model.config
        self.model, self.layers = model, list(model.transformer.h)
        self.fused = fuse_projections(model)
        self.heads = self.kv_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        self._plan: DecodePlan | None = None

    @torch.no_grad()
    def step(self, next_ids: Tensor, cache: KVCache) -> Tensor | None:
        """Feed one token per row [B]; the next logits [B, V], or None (nothing done) where this step declines."""
        if self.declines(cache) is not None:
            return None
        h = self.model.transformer.wte(next_ids[:, None])                             # [B, 1, C]
        plan = DecodePlan.current(self, cache, h)
        if plan is None:
            return None
        cache.check_room(1)
        b, d = h.shape[0], self.head_dim
        cos, sin = self._rope(cache)                                                  # [B, D] each
        mask = FastDecoder._mask(cache)
        visible = None if mask is None else mask.reshape(b, -1).to(torch.uint8)       # [B, S + 1]
        x = quant_kernels.decode_step(plan.words, h.view(b, -1), cos, sin, cache.length, visible, plan.eps,
                                      d ** -0.5)                                      # [B, C]
        cache.advance(torch.ones(b, 1, dtype=torch.bool))
        return self.model.lm_head(x[:, None])[:, -1]                                  # [B, V]

    def declines(self, cache: KVCache) -> str | None:
        """Why the model's config or this cache's position rules the step out (None: they do not)."""
        cfg = self.model.config
        if self.model.training:
            return "a model in training mode"
        if cfg.rotary_dim != self.head_dim:
            return f"a partial rotary ({cfg.rotary_dim} of {self.head_dim} channels)"
        if cfg.use_logn_attn and int(cache.next_position.max()) + 1 > cfg.seq_length:
            return "log-n attention scaling (past seq_length)"
        return None

    def _rope(self, cache: KVCache) -> tuple[Tensor, Tensor]:
        """cos and sin with its first half negated (qwen2_vl_fast.rotate), [B, D] float32, at each row's next position
        with the NTK alpha its prefill chose: what QWenLMHeadModel._rope computes for the step."""
        cfg = self.model.config
        alpha = cache.ntk_alpha if cfg.use_dynamic_ntk else torch.ones_like(cache.ntk_alpha)
        cos, sin = rope_cos_sin(cache.next_position[:, None], alpha, cfg.rotary_dim, cfg.rotary_emb_base)
        cos, sin = cos[:, 0, 0], sin[:, 0, 0]                                           # [B, D]
        half = sin.shape[-1] // 2
        return cos.contiguous(), torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)

    def _step_modules(self) -> list[list]:
        """Per layer: c_attn, attn.c_proj, the fused [w2; w1], mlp.c_proj, ln_1, ln_2; ln_f last (DecodePlan's rows)."""
        rows = [[blk.attn.c_attn, blk.attn.c_proj, f["gate_up"], blk.mlp.c_proj, blk.ln_1, blk.ln_2]
                for blk, f in zip(self.layers, self.fused)]
        return rows + [[self.model.transformer.ln_f]]
