"""Qwen-VL's visual tower (pure compute): an OpenCLIP-geometry ViT and the 256-query resampler.

    pixels [N, 3, S, S] -> conv1 (no bias; a linear map of the flattened patches)
      -> + bicubic-resized 16x16 position table -> ln_pre
      -> resblocks -> attn_pool (cross-attention of learnable queries, 2-D sin-cos positions)
      -> ln_post -> @ proj  ==  features [N, Q, C_llm]

Module and parameter names are the checkpoint's (`transformer.visual.*`, qwen_vl.md §3), so loading is
a prefix strip. Two layouts are kept as the checkpoint stores them and handled here in forward:
`in_proj` of the ViT packs q/k/v *per head* (head0 q,k,v | head1 q,k,v | ...), and `proj` is a plain
matrix multiplied on the right.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import VisualConfig


def resize_pos_table(table: Tensor, n_tokens: int) -> Tensor:
    """Resize a square position table [L, C] to [n_tokens, C] bicubically, as the reference `get_abs_pos`.

    Done in float32 with align_corners=False, then cast back. Example: the ViT's 16x16 table
    [256, 1664] becomes [1024, 1664] for a 32x32 patch grid; a table already at size is returned as is.
    """
    src, tgt = math.isqrt(table.shape[0]), math.isqrt(n_tokens)
    if src == tgt:
        return table
    grid = table.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)       # [1, C, src, src]
    grid = F.interpolate(grid, size=(tgt, tgt), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(tgt * tgt, -1).to(table.dtype)  # [tgt*tgt, C]


def flatten_patches(pixels: Tensor, patch: int) -> Tensor:
    """Pixels [N, C, S, S] -> patches [N, g*g, C*P*P] (g = S // P), row-major, each flattened in conv1's weight order
    (channel, row, column), so that conv1 (stride = kernel) is a linear map of them. Example: S = 4, P = 2, C = 1:
    patch 1 (row 0, column 1) is pixels [0, 0, 0:2, 2:4] read row by row."""
    n, c, size, _ = pixels.shape
    g = size // patch
    x = pixels[:, :, :g * patch, :g * patch].reshape(n, c, g, patch, g, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(n, g * g, c * patch * patch)


def sincos_pos_table(dim: int, grid: int) -> Tensor:
    """The resampler's 2-D sin-cos table [grid*grid, dim] (MAE recipe, as the reference builds it).

    Token t = row*grid + col. Channels [0, dim/2) encode the column, [dim/2, dim) the row; each half is
    [sin(p*w), cos(p*w)] with w_k = 1/10000^(k/(dim/4)). Example: dim=4, grid=2, token 3 (row 1, col 1)
    -> [sin 1, cos 1, sin 1, cos 1]. Checkpoints store this table; it is only needed to initialise one.
    """
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")

    def encode(pos: np.ndarray) -> np.ndarray:                       # [grid*grid] -> [grid*grid, dim/2]
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return torch.from_numpy(np.concatenate([encode(cols), encode(rows)], axis=1)).float()


class VisualAttention(nn.Module):
    """ViT self-attention with the checkpoint's per-head packed qkv."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        n, length, width = x.shape
        qkv = self.in_proj(x).view(n, length, self.heads, 3 * self.head_dim)  # [N, L, H, 3D] per head
        q, k, v = qkv.transpose(1, 2).split(self.head_dim, dim=-1)            # each [N, H, L, D]
        out = F.scaled_dot_product_attention(q, k, v)                         # [N, H, L, D]
        return self.out_proj(out.transpose(1, 2).reshape(n, length, width))


class VisualAttentionBlock(nn.Module):
    """Pre-norm residual block: x + attn(ln_1 x), then + mlp(ln_2 x) with exact GELU."""

    def __init__(self, width: int, heads: int, mlp_width: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = VisualAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(OrderedDict(
            c_fc=nn.Linear(width, mlp_width), gelu=nn.GELU(), c_proj=nn.Linear(mlp_width, width)))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TransformerBlock(nn.Module):
    """The ViT trunk; exists only so parameter names read `transformer.resblocks.N`."""

    def __init__(self, width: int, layers: int, heads: int, mlp_width: int):
        super().__init__()
        self.resblocks = nn.ModuleList(VisualAttentionBlock(width, heads, mlp_width) for _ in range(layers))

    def forward(self, x: Tensor) -> Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class ResamplerAttention(nn.Module):
    """`nn.MultiheadAttention` semantics and parameter names ([Wq; Wk; Wv] packing), batch first, via SDPA."""

    project = staticmethod(F.linear)     # (x, weight, bias) -> x @ weight.T + bias; fast_paths may swap it

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        q, k, v = self.project(query, wq, bq), self.project(key, wk, bk), self.project(value, wv, bv)
        q, k, v = (self._split(t) for t in (q, k, v))                  # [N, H, Q|L, D]
        out = F.scaled_dot_product_attention(q, k, v)                  # [N, H, Q, D]
        n, _, n_q, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(n, n_q, -1))  # [N, Q, C]

    def _split(self, t: Tensor) -> Tensor:
        n, length, dim = t.shape
        return t.view(n, length, self.heads, dim // self.heads).transpose(1, 2)


class Resampler(nn.Module):
    """The position-aware VL adapter (`attn_pool`): Q learnable queries cross-attend to the patch grid."""

    def __init__(self, n_queries: int, embed_dim: int, heads: int, kv_dim: int):
        super().__init__()
        self.query = nn.Parameter(torch.empty(n_queries, embed_dim))
        self.pos_embed = nn.Parameter(torch.empty(n_queries, embed_dim), requires_grad=False)
        # The reference skips the projection when the ViT width already equals the LLM width.
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False) if kv_dim != embed_dim else nn.Identity()
        self.attn = ResamplerAttention(embed_dim, heads)
        self.ln_q = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        pos_k = resize_pos_table(self.pos_embed, x.shape[1])      # [L, C]: keys see the upsampled grid
        x = self.ln_kv(self.kv_proj(x))                            # [N, L, C]
        q = (self.ln_q(self.query) + self.pos_embed).unsqueeze(0)  # [1, Q, C]: queries see the Q grid
        q = q.expand(x.shape[0], -1, -1)                           # [N, Q, C]
        return self.attn(q, x + pos_k, x)                          # values get no positions


class VisionTransformer(nn.Module):
    """`transformer.visual`: pixels [N, 3, S, S] -> features [N, Q, output_dim]."""

    project = staticmethod(F.linear)     # as ResamplerAttention.project

    def __init__(self, cfg: VisualConfig):
        super().__init__()
        self.conv1 = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.positional_embedding = nn.Parameter(torch.empty(256, cfg.width))  # always a 16x16 table
        self.ln_pre = nn.LayerNorm(cfg.width, eps=1e-6)
        self.transformer = TransformerBlock(cfg.width, cfg.layers, cfg.heads, cfg.mlp_width)
        self.attn_pool = Resampler(cfg.n_queries, cfg.output_dim, cfg.resampler_heads, cfg.width)
        self.ln_post = nn.LayerNorm(cfg.output_dim, eps=1e-6)
        self.proj = nn.Parameter(torch.empty(cfg.output_dim, cfg.output_dim))

    def forward(self, pixels: Tensor) -> Tensor:
        x = self.ln_post(self.attn_pool(self.patch_tokens(pixels)))     # [N, Q, C]
        return self.project(x, self.proj.t(), None)                      # [N, Q, C]: x @ proj

    def patch_tokens(self, pixels: Tensor) -> Tensor:
        """The ViT trunk alone: pixels [N, 3, S, S] -> patch tokens [N, g*g, W] (before the resampler)."""
        weight = self.conv1.weight                                       # [W, 3, P, P]
        patches = flatten_patches(pixels.to(weight.dtype), weight.shape[-1])  # [N, g*g, 3*P*P]
        x = self.project(patches, weight.flatten(1), None)               # [N, g*g, W]: conv1, stride = kernel
        x = x + resize_pos_table(self.positional_embedding, x.shape[1])
        return self.transformer(self.ln_pre(x))                          # [N, g*g, W]

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Random init for training from scratch (OpenCLIP-like); the resampler gets its sin-cos table.

        The resampler's q/k projections get std 1.5/sqrt(C), so query-key logits start with a spread of a
        few units and each query looks at its own region of the sin-cos grid. With a small fixed std
        (0.02) a narrow adapter starts with uniform attention: every query averages all patches, the
        features barely differ between images, and the LM learns to ignore them (measured on the demo
        model). At the real width (4096) the official xavier init already gives such logits.

        The trunk's position table starts as the 2-D sin-cos code too: at N(0, 0.02) it stayed faint next to the
        patch embeddings (std 0.027 against ~0.5). With it (and row/column targets, twice the steps) the demo model's
        pretrained trunk reads shape per patch at 0.82, against 0.67 before (session 17).
        """
        for name, p in self.named_parameters():
            if name.endswith("pos_embed") or name == "positional_embedding":
                grid = math.isqrt(p.shape[0])
                p.copy_(sincos_pos_table(p.shape[1], grid))
            elif p.ndim == 1:
                p.fill_(1.0 if _is_norm_weight(name) else 0.0)
            elif name == "attn_pool.attn.in_proj_weight":
                p.normal_(0.0, 1.5 / math.sqrt(p.shape[1]), generator=generator)
            elif name == "attn_pool.kv_proj.weight":
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]), generator=generator)
            else:
                p.normal_(0.0, 0.02, generator=generator)


def _is_norm_weight(name: str) -> bool:
    return name.split(".")[-2].startswith("ln") and name.endswith("weight")
