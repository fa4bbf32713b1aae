"""Choosing the next token (pure functions): repetition penalty, temperature, top-k, top-p, then a draw
from an explicit `torch.Generator`. The order and semantics are transformers' logits processors', so
the official `generation_config.json` values mean what they meant there.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. `do_sample=False` or `temperature=0` means greedy."""

    max_new_tokens: int = 512
    do_sample: bool = True
    temperature: float = 1.0
    top_k: int = 0                  # 0 = off
    top_p: float = 1.0              # 1 = off
    repetition_penalty: float = 1.0
    stop_words_ids: tuple[tuple[int, ...], ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        _check_number("max_new_tokens", self.max_new_tokens, numbers.Integral)
        _check_number("top_k", self.top_k, numbers.Integral)
        for name in ("temperature", "top_p", "repetition_penalty"):
            _check_number(name, getattr(self, name), numbers.Real)
        if self.max_new_tokens < 1:
            raise ValueError(f"{self.max_new_tokens=} must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"{self.temperature=} must be >= 0")
        if self.top_k < 0:
            raise ValueError(f"{self.top_k=} must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"{self.top_p=} must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise ValueError(f"{self.repetition_penalty=} must be > 0")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0


def _check_number(name: str, value: object, kind: type) -> None:
    """ValueError unless `value` is a finite `kind` (bools, strings and NaN are refused by name).

    Example: `_check_number("temperature", float("nan"), numbers.Real)` -> "temperature must be a finite
    number, got nan" (NaN would pass every range check below and sample from NaN probabilities)."""
    ok = isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value)
    if not ok:
        what = "an integer" if kind is numbers.Integral else "a finite number"
        raise ValueError(f"{name} must be {what}, got {value!r}")


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """Penalise tokens already seen [B, V] bool: positive logits / penalty, negative * penalty.

    Example (penalty 2): logits [4., -1., 3.], seen [T, T, F] -> [2., -2., 3.].
    """
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits per row, -inf elsewhere (k = 0: unchanged)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]                       # [B, 1]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filter: drop the least likely tokens whose total probability is <= 1 - p; keep >= 1.

    Example (p 0.5): probs [0.6, 0.3, 0.1] -> only the first survives.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1)                            # ascending
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop_sorted = cum <= 1 - p
    drop_sorted[..., -1] = False                                                 # never drop the best
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample(logits: Tensor, params: SamplingParams, seen: Tensor | None = None,
           generator: torch.Generator | None = None) -> Tensor:
    """Next token ids [B] from logits [B, V]."""
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits.argmax(-1)
    logits = top_p_filter(top_k_filter(logits / params.temperature, params.top_k), params.top_p)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def ends_with_stop(tokens: list[int], stop_words_ids: tuple[tuple[int, ...], ...]) -> bool:
    """True if `tokens` ends with any of the stop sequences. Example: [5, 7, 9] with ((7, 9),) -> True."""
    return any(len(s) and tuple(tokens[-len(s):]) == tuple(s) for s in stop_words_ids)
