"""A test double: the tiny model forced to answer a fixed script (shared by the server and page tests)."""
from __future__ import annotations

import torch


class ScriptedModel(torch.nn.Module):
    """The tiny model forced to answer `script` then <|im_end|>: keeps the real cache and image paths,
    overrides the logits. One request at a time (it counts decode steps since the last prefill)."""

    def __init__(self, inner, script: list[int], end_id: int):
        super().__init__()
        self.inner, self.config, self.script, self.step = inner, inner.config, script + [end_id], 0

    def encode_images(self, pixels):
        return self.inner.encode_images(pixels)

    def forward(self, input_ids, kv_cache=None, **kwargs):
        self.step = 0 if input_ids.shape[1] > 1 else self.step + 1        # a prefill (maybe from a cached prefix)
        logits = self.inner(input_ids, kv_cache=kv_cache, **kwargs)
        forced = torch.full_like(logits, -1e4)
        forced[..., self.script[min(self.step, len(self.script) - 1)]] = 0.0
        return forced
