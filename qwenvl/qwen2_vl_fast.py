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
      of ~2-20 us each become one call (without the kernels: F.rms_norm and torch's ops, the same bits as text.py);
    * and where every linear has a decode kernel (FastLinear, Int8Linear, Int4Linear, GPTQLinear): all layers in
      one call (decode_step.cpp: the same kernels in the same order, so the same bits), from a DecodePlan of the
      tensors' addresses that is rebuilt whenever a tensor it names was replaced or changed.
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
    """Decode steps of one Qwen2-VL model (it fuses the model's projections in place on construction).
    whole_step=False keeps every step op by op (the whole-step kernel's reference in tests and benchmarks)."""

    def __init__(self, model: Qwen2VL, whole_step: bool = True):
        cfg = model.config.text
        self.model, self.layers, self.whole_step = model, list(model.model.layers), whole_step
        self._plan: DecodePlan | None = None
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
        plan = DecodePlan.current(self, cache, h) if self.whole_step else None
        if plan is not None:
            b, d = h.shape[0], self.head_dim
            visible = None if mask is None else mask.reshape(b, -1).to(torch.uint8)   # [B, S + 1]
            x = quant_kernels.decode_step(plan.words, h.view(b, -1), rope[0].view(b, d), rope[1].view(b, d),
                                          cache.length, visible, plan.eps, d ** -0.5)  # [B, C]
            cache.advance(torch.ones(b, 1, dtype=torch.bool))
            return self.model.lm_head(x[:, None])[:, -1]                               # [B, V]
        h, x = add_norm(h, None, self.layers[0].input_layernorm)
        for i, (layer, fused) in enumerate(zip(self.layers, self.fused)):
            h, x = add_norm(h, self._attention(layer, fused["qkv"], x, rope, mask, cache, i),
                            layer.post_attention_layernorm)
            after = self.layers[i + 1].input_layernorm if i + 1 < len(self.layers) else self.model.model.norm
            h, x = add_norm(h, layer.mlp.down_proj(silu_mul(fused["gate_up"](x))), after)   # gate_up: [B, 1, 2I]
        cache.advance(torch.ones(h.shape[0], 1, dtype=torch.bool))
        return self.model.lm_head(x)[:, -1]                                            # [B, V]

    def _step_modules(self) -> list[list]:
        """Per layer: the fused qkv, o_proj, fused gate_up, down_proj, and the norms; the final norm last."""
        rows = [[f["qkv"], layer.self_attn.o_proj, f["gate_up"], layer.mlp.down_proj, layer.input_layernorm,
                 layer.post_attention_layernorm] for layer, f in zip(self.layers, self.fused)]
        return rows + [[self.model.model.norm]]

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


class DecodePlan:
    """decode_step.cpp's plan for one FastDecoder and cache: an int64 array of sizes and addresses (its Header, then
    a Layer per decoder layer), with the tensors it points into; `words` is None where the whole-step kernel does
    not apply (a linear without a decode kernel, mixed dtypes, more rows than the GEMV kernels take, no kernels).

    `key` names what the addresses depend on: each tensor of the modules by address and version (an in-place
    update of a tensor a converted copy was made of, or a replaced tensor, makes a new plan), and the cache's."""

    def __init__(self, key: tuple, words: Tensor | None, eps: float = 0.0, keep: tuple = ()):
        self.key_, self.words, self.eps, self.keep = key, words, eps, keep

    @classmethod
    def current(cls, decoder, cache: KVCache, h: Tensor) -> "DecodePlan | None":
        """The decoder's plan for this cache and these weights (kept in `decoder._plan`, rebuilt when anything it
        names changed), or None where the whole-step kernel does not apply. The decoder (FastDecoder, qwen_vl_fast.
        FastDecoderV1) gives heads, kv_heads, head_dim and `_step_modules()`."""
        modules = decoder._step_modules()
        key = cls.key(modules, cache, h)
        if decoder._plan is None or decoder._plan.key_ != key:
            decoder._plan = cls.build(decoder, modules, cache, h, key)
        return decoder._plan if decoder._plan.words is not None else None

    @staticmethod
    def key(modules: list[list], cache: KVCache, h: Tensor) -> tuple:
        tensors = [t for row in modules for m in row for t in (*m._parameters.values(), *m._buffers.values())
                   if t is not None]
        return (tuple(id(m) for row in modules for m in row), tuple((t.data_ptr(), t._version) for t in tensors),
                cache.keys.data_ptr(), cache.values.data_ptr(), cache.keys.shape, h.shape, h.dtype)

    @staticmethod
    def _shapes_fit(decoder: FastDecoder, c: int, row: list, gate_up: int) -> bool:
        """The layer's linears have the shapes decode_step.cpp sizes its buffers by (layer 0's MLP width)."""
        qkv, o, gu, down = row
        attn = decoder.heads * decoder.head_dim
        return ((qkv.n, qkv.k, o.n, o.k, gu.n, gu.k, down.n, down.k)
                == (attn + 2 * decoder.kv_heads * decoder.head_dim, c, c, attn, gate_up, c, c, gate_up // 2))

    @classmethod
    def build(cls, decoder: FastDecoder, modules: list[list], cache: KVCache, h: Tensor, key: tuple) -> "DecodePlan":
        linears = [[getattr(m, "decode_kernel", lambda: None)() for m in row[:4]] for row in modules[:-1]]
        norms = [m for row in modules for m in row if isinstance(m, RMSNorm)]
        if cls.declines(decoder, linears, norms, cache, h):
            return cls(key, None)
        header = [h.shape[0], h.shape[-1], decoder.heads, decoder.kv_heads, decoder.head_dim, len(linears),
                  int(h.dtype == torch.bfloat16), modules[0][4].weight.data_ptr(),
                  *cache.keys.stride()[1:4], *cache.values.stride()[1:4]]
        words = list(header)
        for i, (row, kernels) in enumerate(zip(modules[:-1], linears)):
            next_norm = modules[i + 1][4] if i + 1 < len(linears) else modules[-1][0]
            words += [w for k in kernels for w in k.words()]
            words += [row[5].weight.data_ptr(), next_norm.weight.data_ptr(), cache.keys[i].data_ptr(),
                      cache.values[i].data_ptr()]
        return cls(key, torch.tensor(words, dtype=torch.int64), norms[0].eps, keep=tuple(linears))

    @classmethod
    def declines(cls, decoder: FastDecoder, linears: list[list], norms: list[RMSNorm], cache: KVCache,
                 h: Tensor) -> str | None:
        """Why decode_step.cpp cannot run this step (None: it can)."""
        dtype = h.dtype
        if quant_kernels.library() is None:
            return "no compiled kernels"
        if dtype not in (torch.float32, torch.bfloat16) or h.shape[0] > quant_kernels.FAST_MAX_ROWS:
            return f"{dtype} activations / {h.shape[0]} rows"
        if any(k is None for row in linears for k in row):
            return "a linear without a decode kernel"
        tensors = (cache.keys, cache.values, *(n.weight for n in norms))
        if any(t.dtype != dtype or not t.is_contiguous() for t in tensors):
            return "the KV cache or a norm is not contiguous in the activations' dtype"
        if len({n.eps for n in norms}) != 1:
            return "norms with different eps"
        if not all(cls._shapes_fit(decoder, h.shape[-1], row, linears[0][2].n) for row in linears):
            return "layers of different shapes"
        return None
