"""Qwen2-VL decode steps without the general forward's work: the fast path of `qwen2_vl_generation.decode_step`.

A decode step feeds one token per row. The general forward (qwen2_vl.Qwen2VL.forward) builds an M-RoPE table by a
gather over three position rows, a [B, 1, 1, S] boolean mask, checks placeholder counts and calls five projections
per layer. Here, per step:
    * the rotary angles once for all layers: at decode the three M-RoPE ids are equal (positions.decode_position_ids),
      so the table is plain RoPE at next_position + rope_delta, the same float32 values as mrope_cos_sin's;
    * no mask at all unless a row of the cache holds padding (SDPA then takes its unmasked path);
    * q and k rotated in one call (bit-identical to text.py's apply_rope, tested);
    * q/k/v and gate/up as one fused projection each (fused_projections.py: the same weights, views, no copy);
    * keys and values into the caller's preallocated KVCache (static shapes, written by slot);
    * with the compiled kernels (quant_kernels): each residual add with the RMSNorm after it, the rotation, and
      silu(gate) * up as one call each, and the attention on the decode-attention kernel; 4-10 framework ops
      of ~2-20 us each become one call (without the kernels: F.rms_norm and torch's ops, the same bits as text.py).
The linears are the model's own (FastLinear / Int8Linear / Int4Linear pick their decode kernels), so the step
computes what the reference computes up to the order of float sums (GEMVs, the norm's sum of squares, attention)
and where bf16 values are rounded; tests/test_fast_decode.py holds the two together.

    step = FastDecoder(model).step                     # step(next_ids [B], cache, rope_delta [B]) -> logits [B, V]
    generate(model, ids, params, vision=..., step=step)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import quant_kernels
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
        h, x = add_norm(h, None, self.layers[0].input_layernorm)
        for i, (layer, fused) in enumerate(zip(self.layers, self.fused)):
            h, x = add_norm(h, self._attention(layer, fused["qkv"], x, rope, mask, cache, i),
                            layer.post_attention_layernorm)
            after = self.layers[i + 1].input_layernorm if i + 1 < len(self.layers) else self.model.model.norm
            h, x = add_norm(h, layer.mlp.down_proj(silu_mul(fused["gate_up"](x))), after)   # gate_up: [B, 1, 2I]
        cache.advance(torch.ones(h.shape[0], 1, dtype=torch.bool))
        return self.model.lm_head(x)[:, -1]                                            # [B, V]

    def _attention(self, layer, qkv_proj, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None,
                   cache: KVCache, i: int) -> Tensor:
        b = x.shape[0]
        qkv = qkv_proj(x).view(b, self.heads + 2 * self.kv_heads, 1, self.head_dim)   # [B, H + 2 Hkv, 1, D]
        qk = rotate(qkv[:, :self.heads + self.kv_heads], *rope)                         # q and k in one call
        (q, k), v = qk.split([self.heads, self.kv_heads], dim=1), qkv[:, self.heads + self.kv_heads:]
        keys, values = cache.write(i, k, v)                                            # [B, Hkv, S, D]
        out = quant_kernels.decode_attention(q, keys, values, mask)                     # [B, H, 1, D] or None
        if out is None:
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
    [-x2, x1] * [s1, s2] = [x2, x1] * [-s1, s2] (negation is exact), and [x2, x1] is a flip of x's two halves.
    One kernel call where the compiled kernels apply (quant_kernels.rope: the same float32 operations)."""
    out = quant_kernels.rope(x, cos, signed_sin)
    if out is not None:
        return out
    xf = x.float()
    swapped = xf.unflatten(-1, (2, -1)).flip(-2).flatten(-2)                            # [x2, x1]
    return (xf * cos + swapped * signed_sin).type_as(x)


def rms_norm(norm: RMSNorm, x: Tensor) -> Tensor:
    """RMSNorm.forward in three ops instead of seven (float32 norm, cast back, then the weight): the same bits."""
    return F.rms_norm(x.float(), (x.shape[-1],), eps=norm.eps).type_as(x) * norm.weight


def add_norm(h: Tensor, delta: Tensor | None, norm: RMSNorm) -> tuple[Tensor, Tensor]:
    """(h + delta, norm(h + delta)) with delta None meaning 0: a residual add and the next RMSNorm, in one kernel
    call where it applies (which then adds into h in place: the step's own tensor), else `rms_norm`'s three ops."""
    normed = quant_kernels.add_rms_norm(h, delta, norm.weight, norm.eps)
    if normed is not None:
        return h, normed
    h = h if delta is None else h + delta
    return h, rms_norm(norm, h)


def silu_mul(gate_up: Tensor) -> Tensor:
    """silu(gate) * up of a fused gate/up output [..., 2I] -> [..., I] (one kernel call where it applies)."""
    out = quant_kernels.silu_mul(gate_up)
    if out is not None:
        return out
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
