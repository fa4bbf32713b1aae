"""The Qwen(-7B) language model's pieces (pure compute): RMSNorm, RoPE with dynamic NTK, log-n scaling,
attention with a caller-owned KV cache, and the SwiGLU MLP. Parameter names are the checkpoint's
(`transformer.h.N.{ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.w1, mlp.w2, mlp.c_proj}`).

Where this differs from the reference on purpose: RoPE positions come from `position_ids` (each row's
own count of real tokens), not from the index in the left-padded batch, which the reference uses even
though it computes `position_ids` (qwen_vl.md §4.5). Without padding the two agree exactly.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import QWenConfig
from .kv_cache import KVCache


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, cast back, *then* scaled by the weight (the reference's order)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def ntk_alpha_for_length(n_tokens: Tensor, seq_length: int) -> Tensor:
    """Dynamic-NTK alpha per row from its prompt length: 1 up to seq_length, then 3, 7, 15, ...

    alpha = max(2^ceil(log2(n / seq_length) + 1) - 1, 1). Example with seq_length 2048:
    n = 2048 -> 1, n = 2049 -> 3, n = 4096 -> 3, n = 4097 -> 7.
    """
    ratio = n_tokens.double().clamp(min=1) / seq_length
    alpha = 2.0 ** torch.ceil(torch.log2(ratio) + 1) - 1
    return alpha.clamp(min=1).float()


def rope_cos_sin(position_ids: Tensor, ntk_alpha: Tensor, rotary_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """cos, sin [B, 1, T, rotary_dim] in float32 for positions [B, T] and per-row NTK alpha [B].

    base' = base * alpha^(d / (d - 2)); inv_freq_k = 1 / base'^(2k / d); angles are duplicated
    (half-split layout): emb = [freqs, freqs].
    """
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=position_ids.device) / rotary_dim
    row_base = base * ntk_alpha.float() ** (rotary_dim / (rotary_dim - 2))          # [B]
    inv_freq = 1.0 / row_base[:, None] ** exponent[None, :]                        # [B, d/2]
    freqs = position_ids.float()[:, :, None] * inv_freq[:, None, :]                # [B, T, d/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]                               # [B, 1, T, d]
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first rotary_dim channels of x [B, H, T, D] (half-split, in float32)."""
    rot_dim = cos.shape[-1]
    x_rot, x_pass = x[..., :rot_dim].float(), x[..., rot_dim:]
    half = rot_dim // 2
    rotated = torch.cat([-x_rot[..., half:], x_rot[..., :half]], dim=-1)
    out = x_rot * cos + rotated * sin
    return torch.cat([out.type_as(x), x_pass], dim=-1)


def logn_scale(position_ids: Tensor, seq_length: int) -> Tensor:
    """Query scale [B, 1, T, 1]: log(p+1)/log(seq_length) where p+1 > seq_length, else 1 (inference only)."""
    p1 = position_ids.double() + 1
    scale = torch.where(p1 > seq_length, torch.log(p1) / math.log(seq_length), torch.ones_like(p1))
    return scale.float()[:, None, :, None]


def sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """QWenAttention's attention, [B, H, T, D] -> [B, H, T, D] (fast_paths swaps in a decode kernel per module)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class QWenAttention(nn.Module):
    """Multi-head attention: packed c_attn [q | k | v] with bias, RoPE, optional log-n, c_proj."""

    attend = staticmethod(sdpa)

    def __init__(self, cfg: QWenConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        proj = self.heads * self.head_dim
        self.c_attn = nn.Linear(cfg.hidden_size, 3 * proj, bias=True)
        self.c_proj = nn.Linear(proj, cfg.hidden_size, bias=not cfg.no_bias)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor, logn: Tensor | None,
                kv_cache: KVCache | None, layer: int) -> Tensor:
        b, t, _ = x.shape
        q, k, v = self.c_attn(x).split(self.heads * self.head_dim, dim=-1)        # each [B, T, H*D]
        q, k, v = (z.view(b, t, self.heads, self.head_dim).transpose(1, 2) for z in (q, k, v))  # [B, H, T, D]
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if logn is not None:
            q = q * logn.to(q.dtype)
        if kv_cache is not None:
            k, v = kv_cache.write(layer, k, v)                                     # [B, H, S, D]
        out = self.attend(q, k, v, mask)                                           # [B, H, T, D]
        return self.c_proj(out.transpose(1, 2).reshape(b, t, -1))


class QWenMLP(nn.Module):
    """SwiGLU with the reference's branch order: c_proj(w1(x) * silu(w2(x)))."""

    def __init__(self, cfg: QWenConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.hidden_size, cfg.ffn_dim, bias=not cfg.no_bias)
        self.w2 = nn.Linear(cfg.hidden_size, cfg.ffn_dim, bias=not cfg.no_bias)
        self.c_proj = nn.Linear(cfg.ffn_dim, cfg.hidden_size, bias=not cfg.no_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(self.w1(x) * F.silu(self.w2(x)))


class QWenBlock(nn.Module):
    """Pre-norm decoder block: h = x + attn(ln_1 x); out = h + mlp(ln_2 h)."""

    def __init__(self, cfg: QWenConfig):
        super().__init__()
        self.ln_1 = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.attn = QWenAttention(cfg)
        self.ln_2 = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.mlp = QWenMLP(cfg)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor, logn: Tensor | None,
                kv_cache: KVCache | None, layer: int) -> Tensor:
        x = x + self.attn(self.ln_1(x), rope, mask, logn, kv_cache, layer)
        return x + self.mlp(self.ln_2(x))


def attention_mask_4d(key_valid: Tensor, n_query: int) -> Tensor:
    """Boolean mask [B, 1, T, S]: query t (the last T of S slots) sees valid keys at or before it.

    A query always sees its own slot, so padding rows never get an all-masked (NaN) softmax; their
    outputs are never used. Example: key_valid [[0, 1, 1]], T=3 -> row 0 sees only slot 0 (itself),
    row 1 sees slot 1, row 2 sees slots 1 and 2.
    """
    b, s = key_valid.shape
    q_slot = torch.arange(s - n_query, s, device=key_valid.device)[:, None]    # [T, 1]
    k_slot = torch.arange(s, device=key_valid.device)[None, :]                 # [1, S]
    causal = k_slot <= q_slot                                                  # [T, S]
    mask = causal[None] & key_valid[:, None, :]                                # [B, T, S]
    return (mask | (k_slot == q_slot)[None])[:, None]                          # [B, 1, T, S]
