"""Generation for Qwen2-VL: prefill with M-RoPE ids, then one token per step with the caller's KVCache.

The per-request state lives here, never on the model: `rope_delta` [B] from `positions.get_rope_index`,
and the cache's per-row count of real tokens (`KVCache.next_position`). A decode step's M-RoPE id is
`next_position + rope_delta`, the same in all three rows (qwen2_vl.md §6.1). Prompts are left-padded with
`generation.left_pad`; each row decodes as it would alone. Sampling is `qwenvl.sampling`.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .kv_cache import KVCache
from .positions import decode_position_ids, get_rope_index
from .qwen2_vl import Qwen2VL, new_kv_cache
from .sampling import SamplingParams, ends_with_stop, sample


@dataclass
class VisionInputs:
    """Preprocessed images/videos of a batch, in order of appearance (row-major over the batch)."""

    pixel_patches: Tensor | None = None      # [N, C*Tp*P*P]
    image_grid_thw: Tensor | None = None     # [num_images, 3]
    video_patches: Tensor | None = None
    video_grid_thw: Tensor | None = None


def prefill(model: Qwen2VL, input_ids: Tensor, attention_mask: Tensor, vision: VisionInputs, cache: KVCache,
            video_rule: str = "max_plus_one") -> tuple[Tensor, Tensor]:
    """Run the prompt through the model into `cache`; return (last logits [B, V], rope_delta [B])."""
    cfg = model.config
    position_ids, rope_delta = get_rope_index(input_ids, vision.image_grid_thw, vision.video_grid_thw,
                                              cfg.image_token_id, cfg.video_token_id,
                                              cfg.vision.spatial_merge_size, attention_mask, video_rule)
    logits = model(input_ids, position_ids, attention_mask, vision.pixel_patches, vision.image_grid_thw,
                   vision.video_patches, vision.video_grid_thw, kv_cache=cache, last_only=True)
    return logits[:, -1], rope_delta


def decode_step(model: Qwen2VL, next_ids: Tensor, cache: KVCache, rope_delta: Tensor) -> Tensor:
    """Feed one token per row [B]; return the next logits [B, V]."""
    position_ids = decode_position_ids(cache.next_position, rope_delta)                # [3, B, 1]
    ones = torch.ones(next_ids.shape[0], 1, dtype=torch.long, device=next_ids.device)
    return model(next_ids[:, None], position_ids, ones, kv_cache=cache, last_only=True)[:, -1]


@torch.no_grad()
def generate_stream(
    model: Qwen2VL,
    input_ids: Tensor,                          # [B, T], left-padded
    params: SamplingParams,
    attention_mask: Tensor | None = None,       # [B, T]
    vision: VisionInputs | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    kv_cache: KVCache | None = None,
    video_rule: str = "max_plus_one",
    step: Callable[[Tensor, KVCache, Tensor], Tensor] | None = None,
) -> Iterator[Tensor]:
    """Yield each step's new ids [B]; a finished row repeats its first eos id (or its last token).

    `step(next_ids, cache, rope_delta) -> logits` replaces `decode_step` (e.g. `qwen2_vl_fast.FastDecoder(m).step`)."""
    b, t = input_ids.shape
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
    eos = _as_tuple(eos_token_id)
    dtype = next(model.parameters()).dtype
    cache = kv_cache or new_kv_cache(model.config, b, t + params.max_new_tokens, dtype, input_ids.device)
    seen = _seen(input_ids, mask, model.config.text.vocab_size) if params.repetition_penalty != 1.0 else None
    logits, rope_delta = prefill(model, input_ids, mask, vision or VisionInputs(), cache, video_rule)
    done = torch.zeros(b, dtype=torch.bool)
    history: list[list[int]] = [[] for _ in range(b)]
    for i_step in range(params.max_new_tokens):
        next_ids = sample(logits, params, seen, generator)                              # [B]
        if eos:
            next_ids = torch.where(done, torch.tensor(eos[0]), next_ids)
        yield next_ids
        for i, tok in enumerate(next_ids.tolist()):
            history[i].append(tok)
            done[i] |= tok in eos or ends_with_stop(history[i], params.stop_words_ids)
        if bool(done.all()) or i_step == params.max_new_tokens - 1:
            return
        if seen is not None:
            seen[torch.arange(b), next_ids] = True
        logits = decode_step(model, next_ids, cache, rope_delta) if step is None else step(next_ids, cache, rope_delta)


def generate(model: Qwen2VL, input_ids: Tensor, params: SamplingParams, **kwargs) -> Tensor:
    """The new ids [B, n] (n <= max_new_tokens); rows that stopped early are filled with eos."""
    steps = list(generate_stream(model, input_ids, params, **kwargs))
    return torch.stack(steps, dim=1) if steps else input_ids.new_zeros(input_ids.shape[0], 0)


def _as_tuple(eos: int | Sequence[int] | None) -> tuple[int, ...]:
    if eos is None:
        return ()
    return (int(eos),) if isinstance(eos, int) else tuple(int(e) for e in eos)


def _seen(input_ids: Tensor, mask: Tensor, vocab_size: int) -> Tensor:
    seen = torch.zeros(input_ids.shape[0], vocab_size, dtype=torch.bool)
    rows, cols = mask.bool().nonzero(as_tuple=True)
    seen[rows, input_ids[rows, cols]] = True                                         # padding is not "seen"
    return seen
