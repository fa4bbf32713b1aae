"""Autoregressive generation with a preallocated KV cache: prefill once, then one token per step.

`generate_stream` yields each step's new ids; `generate` collects them. Batches are left-padded
(`left_pad`); every row gets its own RoPE positions, so a row's tokens are the same in a batch as alone.
A row stops at `eos_token_id` or at the end of any stop sequence (the stop tokens are kept in the output,
as transformers keeps them; chat decoding cuts them).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from .fast_paths import fast_step
from .kv_cache import KVCache
from .model import QWenLMHeadModel
from .sampling import SamplingParams, ends_with_stop, sample


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Left-pad id lists into input_ids [B, T] and attention_mask [B, T].

    Example: [[5, 6], [7]] with pad 0 -> ids [[5, 6], [0, 7]], mask [[1, 1], [0, 1]].
    """
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("every prompt needs at least one token")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(list(r), dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids, mask


@torch.no_grad()
def generate_stream(
    model: QWenLMHeadModel,
    input_ids: Tensor,                      # [B, T]
    params: SamplingParams,
    attention_mask: Tensor | None = None,   # [B, T]
    images: Tensor | None = None,           # [N, 3, S, S]
    image_features: Tensor | None = None,   # [N, Q, C]
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
    kv_cache: KVCache | None = None,
) -> Iterator[Tensor]:
    """Yield the new ids [B] of each step; finished rows repeat `eos_token_id` (or their last token)."""
    b, t = input_ids.shape
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
    dtype = next(model.parameters()).dtype
    cache = kv_cache or KVCache.empty(model.config, b, t + params.max_new_tokens, dtype, input_ids.device)
    seen = _seen_tokens(input_ids, mask, model.config.vocab_size) if params.repetition_penalty != 1.0 else None
    logits = model(input_ids, images=images, image_features=image_features, attention_mask=mask,
                   kv_cache=cache, last_only=True)[:, -1]                       # [B, V]
    done = torch.zeros(b, dtype=torch.bool)
    history: list[list[int]] = [[] for _ in range(b)]
    for step in range(params.max_new_tokens):
        next_ids = sample(logits, params, seen, generator)                       # [B]
        fill = eos_token_id if eos_token_id is not None else next_ids
        next_ids = torch.where(done, torch.as_tensor(fill), next_ids)
        yield next_ids
        done |= _finished(next_ids, history, params, eos_token_id)
        if bool(done.all()) or step == params.max_new_tokens - 1:
            return
        if seen is not None:
            seen[torch.arange(b), next_ids] = True
        logits = next_logits(model, next_ids, cache)


def next_logits(model: QWenLMHeadModel, next_ids: Tensor, cache: KVCache) -> Tensor:
    """Logits [B, V] after feeding one token per row [B]: the whole decode step fast_paths attached where it runs
    (qwen_vl_fast.FastDecoderV1), else the forward."""
    step = fast_step(model)
    logits = None if step is None else step(next_ids, cache)
    if logits is None:
        ones = torch.ones(next_ids.shape[0], 1, dtype=torch.long)
        logits = model(next_ids[:, None], attention_mask=ones, kv_cache=cache, last_only=True)[:, -1]
    return logits


def generate(model: QWenLMHeadModel, input_ids: Tensor, params: SamplingParams, **kwargs) -> Tensor:
    """The new ids [B, n] (n <= max_new_tokens); rows that stopped early are filled with eos."""
    steps = list(generate_stream(model, input_ids, params, **kwargs))
    return torch.stack(steps, dim=1) if steps else input_ids.new_zeros(input_ids.shape[0], 0)


def _seen_tokens(input_ids: Tensor, mask: Tensor, vocab_size: int) -> Tensor:
    seen = torch.zeros(input_ids.shape[0], vocab_size, dtype=torch.bool)
    rows, cols = mask.bool().nonzero(as_tuple=True)
    seen[rows, input_ids[rows, cols]] = True                                    # padding is not "seen"
    return seen


def _finished(next_ids: Tensor, history: list[list[int]], params: SamplingParams, eos: int | None) -> Tensor:
    out = torch.zeros(len(history), dtype=torch.bool)
    for i, tok in enumerate(next_ids.tolist()):
        history[i].append(tok)
        out[i] = (eos is not None and tok == eos) or ends_with_stop(history[i], params.stop_words_ids)
    return out
