"""Qwen2-VL decode steps without the general forward's work: the fast path of `qwen2_vl_generation.decode_step`.

A decode step feeds one token per row. The general forward (qwen2_vl.Qwen2VL.forward) builds an M-RoPE table by a
gather over three position rows, a [B, 1, 1, S] boolean mask, checks placeholder counts and calls five projections
per layer. Here, per step:
    * the rotary angles once for all layers: at decode the three M-RoPE ids are equal (positions.decode_position_ids),
      so the table is plain RoPE at next_position + rope_delta, the same float32 values as mrope_cos_sin's;
    * no mask at all unless a row of the cache holds padding (SDPA then takes its unmasked path);
    * q and k rotated in one call of fewer ops, RMSNorm as F.rms_norm (both bit-identical to text.py's, tested);
    * q/k/v and gate/up as one fused projection each (fused_projections.py: the same weights, views, no copy);
    * keys and values into the caller's preallocated KVCache (static shapes, written by slot).
Norms, RoPE, attention and the linears are the model's own modules and functions (FastLinear / Int8Linear /
Int4Linear pick their decode kernels), so the step computes what the reference computes up to the order of float
sums in the fused GEMVs; tests/test_fast_decode.py holds the two together.

    step = FastDecoder(model).step                     # step(next_ids [B], cache, rope_delta [B]) -> logits [B, V]
    generate(model, ids, params, vision=..., step=step)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .fused_projections import fuse_projections
from .kv_cache import KVCache
from .qwen2_vl import Qwen2VL
from .text import RMSNorm


class FastDecoder:
    """Decode steps of one Qwen2-VL model (it fuses the model's projections in place on construction)."""

    def __init__(self, model: Qwen2VL):
        cfg = model.config.text
        self.model, self.layers = model, list(model.model.layers)
        self.fused = fuse_projections(model)
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        d = cfg.head_dim
        self.inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)   # [D/2]

    @torch.no_grad()
    def step(self, next_ids: Tensor, cache: KVCache, rope_delta: Tensor) -> Tensor:
        """Feed one token per row [B]; return the next logits [B, V] (decode_step's contract)."""
        cache.check_room(1)
        rope = self._rope(cache.next_position + rope_delta)                            # 2 x [B, 1, 1, D]
        mask = self._mask(cache)
        h = self.model.model.embed_tokens(next_ids[:, None])                           # [B, 1, C]
        for i, (layer, fused) in enumerate(zip(self.layers, self.fused)):
            h = h + self._attention(layer, fused["qkv"], rms_norm(layer.input_layernorm, h), rope, mask, cache, i)
            gate, up = fused["gate_up"](rms_norm(layer.post_attention_layernorm, h)).chunk(2, dim=-1)  # [B, 1, I]
            h = h + layer.mlp.down_proj(F.silu(gate) * up)
        cache.advance(torch.ones(h.shape[0], 1, dtype=torch.bool))
        return self.model.lm_head(rms_norm(self.model.model.norm, h))[:, -1]             # [B, V]

    def _attention(self, layer, qkv_proj, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None,
                   cache: KVCache, i: int) -> Tensor:
        b = x.shape[0]
        qkv = qkv_proj(x).view(b, self.heads + 2 * self.kv_heads, 1, self.head_dim)   # [B, H + 2 Hkv, 1, D]
        qk = rotate(qkv[:, :self.heads + self.kv_heads], *rope)                         # q and k in one pass
        (q, k), v = qk.split([self.heads, self.kv_heads], dim=1), qkv[:, self.heads + self.kv_heads:]
        keys, values = cache.write(i, k, v)                                            # [B, Hkv, S, D]
        # The G = H / Hkv query heads of one KV head as G query rows of it: the same products and sums as
        # enable_gqa, but SDPA's CPU kernel pays its per-(row, head) block cost Hkv times instead of H times
        # (bf16, 300 cached tokens: 578 -> 64 us a layer, the same bits).
        grouped = q.reshape(b, self.kv_heads, self.heads // self.kv_heads, self.head_dim)  # [B, Hkv, G, D]
        out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask)   # [B, Hkv, G, D]
        return layer.self_attn.o_proj(out.reshape(b, 1, -1))

    def _rope(self, position: Tensor) -> tuple[Tensor, Tensor]:
        """cos [B, 1, 1, D] and sin with its first half negated (see `rotate`)."""
        angles = position.float()[:, None] * self.inv_freq                              # [B, D/2]
        emb = torch.cat([angles, angles], dim=-1)[:, None, None]                        # [B, 1, 1, D]
        half = emb.shape[-1] // 2
        return emb.cos(), torch.cat([-emb[..., :half].sin(), emb[..., half:].sin()], dim=-1)

    @staticmethod
    def _mask(cache: KVCache) -> Tensor | None:
        """None when every cached slot is a real token (batch 1 always); else which keys each row sees."""
        past = cache.valid[:, :cache.length]                                           # [B, S]
        if bool(past.all()):
            return None
        seen = torch.cat([past, torch.ones(past.shape[0], 1, dtype=torch.bool)], dim=1)
        return seen[:, None, None]                                                     # [B, 1, 1, S + 1]


def rotate(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """text.apply_rope for a full-width rotary in 8 ops instead of 12, the same bits: rotate_half(x) * sin is
    [-x2, x1] * [s1, s2] = [x2, x1] * [-s1, s2] (negation is exact), and [x2, x1] is a flip of x's two halves."""
    xf = x.float()
    swapped = xf.unflatten(-1, (2, -1)).flip(-2).flatten(-2)                            # [x2, x1]
    return (xf * cos + swapped * signed_sin).type_as(x)


def rms_norm(norm: RMSNorm, x: Tensor) -> Tensor:
    """RMSNorm.forward in three ops instead of seven (float32 norm, cast back, then the weight): the same bits."""
    return F.rms_norm(x.float(), (x.shape[-1],), eps=norm.eps).type_as(x) * norm.weight
