"""Qwen-VL (v1) end to end, pure compute: token ids (+ images) in, logits out.

    input_ids [B, T] --wte--> hidden [B, T, C]
    images [N, 3, S, S] --visual--> features [N, Q, C] --scatter into the Q slots of each <img> span-->
    hidden --h.0 .. h.L-1 (RoPE at position_ids, optional KV cache)--> ln_f --lm_head--> logits [B, T, V]

An image span is `<img>` + Q slots + `</img>` (Q = n_queries = 256 for the real models); the features
replace the embeddings of the Q slots, whatever ids they hold (the reference's path bytes and pads, or
plain pads), and the two tags keep their token embeddings (qwen_vl.md §6.3).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import QWenConfig
from .kv_cache import KVCache
from .text import QWenBlock, RMSNorm, attention_mask_4d, logn_scale, ntk_alpha_for_length, rope_cos_sin
from .vision import VisionTransformer


def image_span_mask(input_ids: Tensor, image_start_id: int, n_queries: int) -> Tensor:
    """Bool [B, T]: the positions strictly inside `<img> … </img>` spans; checks the spans are well formed.

    Example (start 7, end 8, Q=2): ids [[5, 7, 1, 1, 8, 5]] -> [[F, F, T, T, F, F]].
    """
    starts, ends = input_ids == image_start_id, input_ids == image_start_id + 1
    depth = starts.long().cumsum(1) - ends.long().cumsum(1)        # [B, T]: 1 inside a span (and on <img>)
    if (depth < 0).any() or (depth > 1).any() or (depth[:, -1] != 0).any():
        raise ValueError("malformed image spans: every <img> needs its own </img>, without nesting")
    inside = (depth == 1) & ~starts
    per_span = inside.sum().item()
    n_spans = int(starts.sum().item())
    if per_span != n_spans * n_queries:
        raise ValueError(f"each image span must hold {n_queries=} positions; got {per_span} positions in {n_spans} spans")
    return inside


class QWenModel(nn.Module):
    """`transformer`: embeddings, decoder blocks, final norm and the visual tower."""

    def __init__(self, cfg: QWenConfig):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.h = nn.ModuleList(QWenBlock(cfg) for _ in range(cfg.num_hidden_layers))
        self.ln_f = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.visual = VisionTransformer(cfg.visual)


class QWenLMHeadModel(nn.Module):
    """Qwen-VL / Qwen-VL-Chat. `forward(input_ids, images=...) -> logits`; no state between calls."""

    def __init__(self, config: QWenConfig):
        super().__init__()
        self.config = config
        self.transformer = QWenModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def encode_images(self, pixels: Tensor) -> Tensor:
        """pixels [N, 3, S, S] (preprocessed) -> features [N, Q, C]."""
        return self.transformer.visual(pixels)

    def forward(
        self,
        input_ids: Tensor,                       # [B, T]
        images: Tensor | None = None,            # [N, 3, S, S] pixels, one per span in row-major order
        image_features: Tensor | None = None,    # [N, Q, C], instead of images (e.g. from a cache)
        attention_mask: Tensor | None = None,    # [B, T], 1 = real token, 0 = (left) padding
        position_ids: Tensor | None = None,      # [B, T]; default: each row's count of real tokens so far
        kv_cache: KVCache | None = None,         # written in place; the caller owns it
        last_only: bool = False,                 # logits for the last position only (generation)
    ) -> Tensor:
        """Logits [B, T, V] (or [B, 1, V] with last_only)."""
        b, t = input_ids.shape
        mask2d = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        hidden = self._embed(input_ids, images, image_features, kv_cache)
        position_ids = self._positions(mask2d, kv_cache) if position_ids is None else position_ids
        rope = self._rope(position_ids, mask2d, kv_cache)
        logn = None
        if self.config.use_logn_attn and not self.training and int(position_ids.max()) + 1 > self.config.seq_length:
            logn = logn_scale(position_ids, self.config.seq_length)
        key_valid = mask2d if kv_cache is None else torch.cat([kv_cache.valid[:, :kv_cache.length], mask2d], 1)
        mask4d = attention_mask_4d(key_valid, t)                                  # [B, 1, T, S]
        if kv_cache is not None:
            kv_cache.check_room(t)
        for i, block in enumerate(self.transformer.h):
            hidden = block(hidden, rope, mask4d, logn, kv_cache, i)
        if kv_cache is not None:
            kv_cache.advance(mask2d)
        if last_only:
            hidden = hidden[:, -1:]
        return self.lm_head(self.transformer.ln_f(hidden))

    def _embed(self, input_ids: Tensor, images: Tensor | None, image_features: Tensor | None,
               kv_cache: KVCache | None) -> Tensor:
        hidden = self.transformer.wte(input_ids)                                  # [B, T, C]
        if images is not None and image_features is not None:
            raise ValueError("pass images or image_features, not both")
        if images is not None:
            image_features = self.encode_images(images)                           # [N, Q, C]
        is_prefill = kv_cache is None or kv_cache.length == 0
        if image_features is None and not (is_prefill and (input_ids == self.config.visual.image_start_id).any()):
            return hidden                                                         # text, or a decode step
        n_spans = int((input_ids == self.config.visual.image_start_id).sum())
        n_images = 0 if image_features is None else image_features.shape[0]
        if n_spans != n_images:
            raise ValueError(f"the input has {n_spans} image spans but {n_images} images were given")
        inside = image_span_mask(input_ids, self.config.visual.image_start_id, self.config.visual.n_queries)
        hidden = hidden.clone()
        hidden[inside] = image_features.reshape(-1, hidden.shape[-1]).to(hidden.dtype)  # row-major order
        return hidden

    def _positions(self, mask2d: Tensor, kv_cache: KVCache | None) -> Tensor:
        start = 0 if kv_cache is None else kv_cache.next_position[:, None]
        return (start + mask2d.long().cumsum(1) - 1).clamp(min=0)                # [B, T]

    def _rope(self, position_ids: Tensor, mask2d: Tensor, kv_cache: KVCache | None) -> tuple[Tensor, Tensor]:
        cfg = self.config
        alpha = torch.ones(mask2d.shape[0], device=mask2d.device)
        if cfg.use_dynamic_ntk and not self.training:
            if kv_cache is not None and kv_cache.length > 0:
                alpha = kv_cache.ntk_alpha                     # decode reuses the prefill's choice
            else:
                alpha = ntk_alpha_for_length(mask2d.sum(1), cfg.seq_length)
        if kv_cache is not None and kv_cache.length == 0:
            kv_cache.ntk_alpha.copy_(alpha)
        return rope_cos_sin(position_ids, alpha, cfg.rotary_dim, cfg.rotary_emb_base)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None, std: float = 0.02,
                     embedding_std: float | None = None) -> None:
        """Random init for training from scratch: normal(0, std) matrices (the token embeddings at
        normal(0, embedding_std) if given), unit norms, zero biases."""
        for name, p in self.named_parameters():
            if name.startswith("transformer.visual."):
                continue
            if p.ndim == 1:
                p.fill_(1.0 if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) else 0.0)
            else:
                wte = name == "transformer.wte.weight" and embedding_std is not None
                p.normal_(0.0, embedding_std if wte else std, generator=generator)
        self.transformer.visual.init_weights(generator)
