"""A preallocated KV cache owned by the caller (the generation loop or the engine), never by the model.

Layout per layer: keys and values [B, H, S, D], written by slot, never concatenated. Rows share one
fill level `length` (prompts are left-padded to line up); `valid` [B, S] marks the slots that hold a
real token so padding is never attended to, and `next_position` [B] is each row's next RoPE position
(its count of real tokens), so a left-padded row gets the positions it would have alone.
`ntk_alpha` [B] is the dynamic-NTK factor chosen at prefill and reused by every decode step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .config import QWenConfig


@dataclass
class KVCache:
    keys: Tensor           # [L, B, H, S, D]
    values: Tensor         # [L, B, H, S, D]
    valid: Tensor          # [B, S] bool
    next_position: Tensor  # [B] int64
    ntk_alpha: Tensor      # [B] float32 (0 until the prefill sets it)
    length: int = 0

    @classmethod
    def empty(cls, config: QWenConfig, batch: int, max_len: int,
              dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> "KVCache":
        shape = (config.num_hidden_layers, batch, config.num_attention_heads, max_len, config.head_dim)
        return cls(
            keys=torch.zeros(shape, dtype=dtype, device=device),
            values=torch.zeros(shape, dtype=dtype, device=device),
            valid=torch.zeros(batch, max_len, dtype=torch.bool, device=device),
            next_position=torch.zeros(batch, dtype=torch.long, device=device),
            ntk_alpha=torch.zeros(batch, dtype=torch.float32, device=device),
        )

    @property
    def max_len(self) -> int:
        return self.keys.shape[3]

    @property
    def batch(self) -> int:
        return self.keys.shape[1]

    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def check_room(self, n_new: int) -> None:
        if self.length + n_new > self.max_len:
            raise ValueError(f"KV cache full: {self.length=} + {n_new=} > {self.max_len=}")

    def write(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v [B, H, T, D] at slots length..length+T of `layer`; return the filled prefix."""
        end = self.length + k.shape[2]
        self.keys[layer, :, :, self.length:end] = k
        self.values[layer, :, :, self.length:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]  # [B, H, S_used, D]

    def advance(self, attention_mask: Tensor) -> None:
        """After every layer has written T new slots: record which were real tokens and move on."""
        n_new = attention_mask.shape[1]
        self.valid[:, self.length:self.length + n_new] = attention_mask.bool()
        self.next_position += attention_mask.long().sum(dim=1)
        self.length += n_new

    def reset(self) -> None:
        self.valid.zero_()
        self.next_position.zero_()
        self.ntk_alpha.zero_()
        self.length = 0
