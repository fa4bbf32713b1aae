"""Qwen2-VL in plain PyTorch (pure compute: tensors in, logits out; no I/O, no tokenizer, no state).

Pieces, bottom-up (qwen2_vl.md §3, §6, §7):
* the ViT: Conv3d patch embedding used as a linear map over pre-flattened patches, 2-D rotary on the
  un-merged patch grid, attention restricted to one frame (block-diagonal, one segment per temporal
  patch of each image/video), QuickGELU MLPs, and the 2×2 patch merger (LayerNorm → MLP with exact GELU);
* the Qwen2 decoder: GQA attention with q/k/v biases, M-RoPE (sections over the rotary frequencies,
  contiguous), SwiGLU, RMSNorm computed in float32;
* `Qwen2VL`: embed → scatter vision features at the placeholders (counts checked) → decoder → lm_head.

Module names are the hub checkpoint's (`visual.*`, `model.*`, `lm_head`), so loading is a prefix map.
M-RoPE ids come from `positions.get_rope_index`; during decoding the caller passes them (its cache
length + rope_delta per row): the model keeps nothing between calls.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .kv_cache import KVCache
from .positions import get_rope_index, grid_rows, vision_position_ids, vision_token_counts
from .qwen2_vl_config import Qwen2VLConfig, Qwen2VLTextConfig, Qwen2VLVisionConfig
from .text import RMSNorm, apply_rope

# ------------------------------------------------------------------------------------ rotary tables


def vision_rope_cos_sin(pos: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos, sin [N, D] for (row, col) ids [N, 2]: D/4 frequencies per axis, [rows | cols] twice."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim // 2, 2, dtype=torch.float32) / (head_dim // 2))
    angles = (pos.float()[:, :, None] * inv_freq[None, None]).reshape(pos.shape[0], -1)  # [N, D/2]
    emb = torch.cat([angles, angles], dim=-1)                                           # [N, D]
    return emb.cos(), emb.sin()


def mrope_cos_sin(position_ids: Tensor, cfg: Qwen2VLTextConfig) -> tuple[Tensor, Tensor]:
    """cos, sin [B, 1, T, D] (float32) for M-RoPE ids [3, B, T].

    Frequency k (of D/2) takes its angle from the temporal row for k < s0, the height row for
    s0 <= k < s0+s1, the width row after that (mrope_section [s0, s1, s2], e.g. [16, 24, 24]).
    """
    d = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=position_ids.device) / d)
    freqs = position_ids.float()[..., None] * inv_freq                                  # [3, B, T, D/2]
    axis = torch.repeat_interleave(torch.arange(3, device=freqs.device),
                                   torch.tensor(cfg.mrope_section, device=freqs.device))  # [D/2]: 0..0 1..1 2..2
    picked = freqs.gather(0, axis.view(1, 1, 1, -1).expand(1, *freqs.shape[1:]))[0]    # [B, T, D/2]
    emb = torch.cat([picked, picked], dim=-1)[:, None]                                  # [B, 1, T, D]
    return emb.cos(), emb.sin()


# --------------------------------------------------------------------------------------- vision


class PatchEmbed(nn.Module):
    """Conv3d (C, Tp, P, P) with stride = kernel over one flattened patch = a bias-free linear map."""

    def __init__(self, cfg: Qwen2VLVisionConfig):
        super().__init__()
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.embed_dim, kernel_size=k, stride=k, bias=False)

    project = staticmethod(F.linear)     # (x, weight, bias); fast_paths may swap it (vision.VisionTransformer's)

    def forward(self, pixel_patches: Tensor) -> Tensor:                 # [N, C*Tp*P*P] -> [N, E]
        weight = self.proj.weight.reshape(self.proj.weight.shape[0], -1)  # [E, C*Tp*P*P], same (C, T, P, P) order
        return self.project(pixel_patches.to(weight.dtype), weight, None)


class VisionAttention(nn.Module):
    """Non-causal attention, packed qkv [q | k | v], 2-D rotary, one segment per frame (cu_seqlens)."""

    def __init__(self, cfg: Qwen2VLVisionConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim, bias=True)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim, bias=True)

    rotate = staticmethod(apply_rope)    # (x, cos, sin); fast_paths may swap it (one pass instead of eight ops)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], seg_lens: list[int]) -> Tensor:
        n = x.shape[0]
        qkv = self.qkv(x).view(n, 3, self.heads, self.head_dim).permute(1, 2, 0, 3)    # [3, H, N, D]
        q, k, v = qkv[0], qkv[1], qkv[2]
        cos, sin = rope                                                                 # [N, D]
        q, k = self.rotate(q, cos, sin), self.rotate(k, cos, sin)
        # Frames never attend to each other: one SDPA per segment (a block-diagonal mask, without N² memory).
        # 4-D inputs: with 3-D ones CPU SDPA takes its math path (N² scores, ~5x slower in bf16).
        outs = [F.scaled_dot_product_attention(qs[None], ks[None], vs[None])[0] for qs, ks, vs in
                zip(q.split(seg_lens, 1), k.split(seg_lens, 1), v.split(seg_lens, 1))]  # each [H, n_i, D]
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)                      # [H, N, D]
        return self.proj(out.transpose(0, 1).reshape(n, -1))                            # [N, E]


def quick_gelu(h: Tensor) -> Tensor:
    """h * sigmoid(1.702 h), each op rounded to h's dtype (the reference's QuickGELU)."""
    return h * torch.sigmoid(1.702 * h)


class VisionMLP(nn.Module):
    """fc1 → activation (QuickGELU for Qwen2-VL) → fc2, with biases."""

    def __init__(self, cfg: Qwen2VLVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.embed_dim, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.embed_dim)
        self.act = cfg.hidden_act

    quick_gelu = staticmethod(quick_gelu)     # (h) -> h's QuickGELU; fast_paths may swap it (in place, one pass)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)
        if self.act == "quick_gelu":
            h = self.quick_gelu(h)
        else:
            h = F.gelu(h) if self.act == "gelu" else F.silu(h)
        return self.fc2(h)


class VisionBlock(nn.Module):
    """Pre-norm ViT block with LayerNorm (eps 1e-6)."""

    def __init__(self, cfg: Qwen2VLVisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.attn = VisionAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], seg_lens: list[int]) -> Tensor:
        x = x + self.attn(self.norm1(x), rope, seg_lens)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """LayerNorm per patch, then each 4 consecutive rows (one 2×2 block) → Linear → GELU → Linear."""

    def __init__(self, cfg: Qwen2VLVisionConfig):
        super().__init__()
        width = cfg.embed_dim * cfg.spatial_merge_size ** 2
        self.ln_q = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, cfg.hidden_size))

    def forward(self, x: Tensor) -> Tensor:                            # [N, E] -> [M, C], M = N / 4
        return self.mlp(self.ln_q(x).reshape(-1, self.mlp[0].in_features))


class VisionTransformer(nn.Module):
    """pixel_patches [N, C*Tp*P*P] + grid_thw [I, 3] -> merged features [M, C], M = N / merge²."""

    def __init__(self, cfg: Qwen2VLVisionConfig):
        super().__init__()
        self.config = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)

    def forward(self, pixel_patches: Tensor, grid_thw: Tensor) -> Tensor:
        cfg = self.config
        rows = grid_rows(grid_thw, cfg.spatial_merge_size)                              # [(t, h, w)] per image
        n_expected = sum(t * h * w for t, h, w in rows)
        if pixel_patches.shape != (n_expected, cfg.patch_dim):
            raise ValueError(f"pixel_patches {tuple(pixel_patches.shape)} != (sum of t*h*w = {n_expected}, "
                             f"{cfg.patch_dim}) for grid_thw {grid_thw.tolist()}")
        x = self.patch_embed(pixel_patches)                                             # [N, E]
        pos = vision_position_ids(grid_thw, cfg.spatial_merge_size).to(x.device)        # [N, 2]
        rope = vision_rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta)
        seg_lens = [h * w for t, h, w in rows for _ in range(t)]                        # one per frame
        for block in self.blocks:
            x = block(x, rope, seg_lens)
        return self.merger(x)                                                           # [M, C]


# ----------------------------------------------------------------------------------------- text


class Qwen2Attention(nn.Module):
    """GQA attention: q/k/v with bias, o without; M-RoPE on q and k; keys/values go to the caller's cache."""

    def __init__(self, cfg: Qwen2VLTextConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.heads * self.head_dim, cfg.hidden_size, bias=False)

    rotate = staticmethod(apply_rope)    # (x, cos, sin); fast_paths may swap it (one pass instead of eight ops)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor, kv_cache: KVCache | None,
                layer: int) -> Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)       # [B, H, T, D]
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)    # [B, Hkv, T, D]
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.rotate(q, *rope), self.rotate(k, *rope)
        if kv_cache is not None:
            k, v = kv_cache.write(layer, k, v)                                         # [B, Hkv, S, D]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # [B, H, T, D]
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class Qwen2MLP(nn.Module):
    """SwiGLU without biases: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: Qwen2VLTextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen2DecoderLayer(nn.Module):
    """Pre-norm block: h = x + attn(norm x); out = h + mlp(norm h)."""

    def __init__(self, cfg: Qwen2VLTextConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Qwen2Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = Qwen2MLP(cfg)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor, kv_cache: KVCache | None,
                layer: int) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, kv_cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2TextModel(nn.Module):
    """embed_tokens, layers, norm (the checkpoint's `model.*`)."""

    def __init__(self, cfg: Qwen2VLTextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def causal_mask(key_valid: Tensor, n_query: int) -> Tensor:
    """Boolean mask [B, 1, T, S]: query t (the last T of S slots) sees valid keys at or before it, and itself.

    Seeing itself keeps padded queries from an all-masked (NaN) softmax; their outputs are never used.
    Example: key_valid [[0, 1, 1]], T = 3 -> rows see {0}, {1}, {1, 2}.
    """
    s = key_valid.shape[1]
    q_slot = torch.arange(s - n_query, s, device=key_valid.device)[:, None]          # [T, 1]
    k_slot = torch.arange(s, device=key_valid.device)[None, :]                       # [1, S]
    mask = (k_slot <= q_slot)[None] & key_valid[:, None, :]                          # [B, T, S]
    return (mask | (k_slot == q_slot)[None])[:, None]                                # [B, 1, T, S]


# ---------------------------------------------------------------------------------------- model


class Qwen2VL(nn.Module):
    """Qwen2VLForConditionalGeneration's compute: `visual`, `model`, `lm_head` (tied for 2B)."""

    def __init__(self, config: Qwen2VLConfig):
        super().__init__()
        self.config = config
        self.visual = VisionTransformer(config.vision)
        self.model = Qwen2TextModel(config.text)
        self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None, std: float = 0.02) -> None:
        """Random init (tests, demos): normal(0, std) for matrices, zero biases, unit norms."""
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=generator)

    def encode_vision(self, pixel_patches: Tensor, grid_thw: Tensor) -> Tensor:
        """Features [M, C] (one per placeholder token, in order) of images or videos."""
        return self.visual(pixel_patches, grid_thw)

    def forward(
        self,
        input_ids: Tensor,                        # [B, T]
        position_ids: Tensor | None = None,       # [3, B, T]; None: computed from the prompt (no cache yet)
        attention_mask: Tensor | None = None,     # [B, T], 1 real, 0 (left) padding
        pixel_patches: Tensor | None = None,      # [N, C*Tp*P*P] of all images, in order of appearance
        image_grid_thw: Tensor | None = None,     # [num_images, 3]
        video_patches: Tensor | None = None,      # [N', C*Tp*P*P] of all videos
        video_grid_thw: Tensor | None = None,     # [num_videos, 3]
        image_features: Tensor | None = None,     # [M, C] instead of pixel_patches (e.g. from a cache)
        video_features: Tensor | None = None,     # [M', C] instead of video_patches
        kv_cache: KVCache | None = None,          # written in place; the caller owns it
        last_only: bool = False,
    ) -> Tensor:
        """Logits [B, T, V] (or [B, 1, V] with last_only)."""
        cfg = self.config
        mask2d = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        if position_ids is None:
            if kv_cache is not None and kv_cache.length > 0:
                raise ValueError("decode steps need position_ids (cache position + rope_delta per row)")
            position_ids, _ = get_rope_index(input_ids, image_grid_thw, video_grid_thw, cfg.image_token_id,
                                             cfg.video_token_id, cfg.vision.spatial_merge_size, mask2d)
        if image_features is None and pixel_patches is not None:
            image_features = self.encode_vision(pixel_patches, image_grid_thw)
        if video_features is None and video_patches is not None:
            video_features = self.encode_vision(video_patches, video_grid_thw)
        h = self.model.embed_tokens(input_ids)                                          # [B, T, C]
        h = self._scatter(h, input_ids, cfg.image_token_id, image_features, image_grid_thw, "image")
        h = self._scatter(h, input_ids, cfg.video_token_id, video_features, video_grid_thw, "video")
        rope = mrope_cos_sin(position_ids, cfg.text)
        mask = self._mask(mask2d, kv_cache)
        if kv_cache is not None:
            kv_cache.check_room(input_ids.shape[1])
        for i, layer in enumerate(self.model.layers):
            h = layer(h, rope, mask, kv_cache, i)
        if kv_cache is not None:
            kv_cache.advance(mask2d)
        h = h[:, -1:] if last_only else h
        return self.lm_head(self.model.norm(h))

    def _scatter(self, h: Tensor, input_ids: Tensor, token_id: int, features: Tensor | None,
                 grid_thw: Tensor | None, kind: str) -> Tensor:
        """Write features [M, C] over the `token_id` placeholders of h [B, T, C], in row-major order."""
        where = input_ids == token_id                                                   # [B, T]
        n_tokens, n_features = int(where.sum()), 0 if features is None else features.shape[0]
        if grid_thw is not None:
            n_grid = sum(vision_token_counts(grid_thw, self.config.vision.spatial_merge_size, f"{kind}_grid_thw"))
            if n_grid != n_features:
                raise ValueError(f"{kind}: {n_features=} != {n_grid=} tokens from {kind}_grid_thw")
        if n_tokens != n_features:
            raise ValueError(f"{kind}: {n_tokens=} placeholder tokens != {n_features=}")
        if n_tokens == 0:
            return h
        return h.masked_scatter(where[..., None], features.to(h.dtype))

    def _mask(self, mask2d: Tensor, kv_cache: KVCache | None) -> Tensor:
        if kv_cache is None:
            return causal_mask(mask2d, mask2d.shape[1])
        past = kv_cache.valid[:, :kv_cache.length]                                      # [B, S_past]
        return causal_mask(torch.cat([past, mask2d], dim=1), mask2d.shape[1])


def new_kv_cache(config: Qwen2VLConfig, batch: int, max_len: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> KVCache:
    """An empty KVCache [L, B, Hkv, S, D] for Qwen2-VL (GQA: only the key/value heads are stored)."""
    t = config.text
    shape = (t.num_hidden_layers, batch, t.num_key_value_heads, max_len, t.head_dim)
    return KVCache(keys=torch.zeros(shape, dtype=dtype, device=device),
                   values=torch.zeros(shape, dtype=dtype, device=device),
                   valid=torch.zeros(batch, max_len, dtype=torch.bool, device=device),
                   next_position=torch.zeros(batch, dtype=torch.long, device=device),
                   ntk_alpha=torch.ones(batch, dtype=torch.float32, device=device))
