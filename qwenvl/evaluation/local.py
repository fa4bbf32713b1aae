"""A local Qwen-VL (v1) for evaluation: batched greedy generation with left padding, and option losses.

Raw prompts (the eval scripts' way, even for the Chat model) are encoded as they are; chat samples go
through `make_context` (ChatML, system "You are a helpful assistant.") and stop at <|im_end|>. Image
spans are given as placeholders plus pixels: the model replaces every position inside a span with the
image's features, so the path bytes the official tokenizer writes there never reach a logit.

Generation follows the official `model.generate(..., do_sample=False, num_beams=1, max_new_tokens,
min_new_tokens, pad_token_id = eos_token_id = <|endoftext|>)`; the answer is the generated tail decoded
with special tokens skipped, stripped. `min_new_tokens` forbids <|endoftext|> for the first n tokens, as
transformers' MinNewTokensLengthLogitsProcessor does.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ..chat import DEFAULT_SYSTEM, make_context, response_tokens
from ..generation import generate, left_pad
from ..images import TRUSTED, load_image, preprocess_v1
from ..sampling import SamplingParams
from .datasets import IMAGE_SPAN, Sample
from .multiple_choice import LETTERS, target_losses


class NoEosBefore(nn.Module):
    """The model with `eos_id` forbidden for its first `n` next-token predictions (min_new_tokens).

    The first call is the prefill (its last logits choose new token 0), each later call one decode step.
    """

    def __init__(self, model: nn.Module, eos_id: int, n: int):
        super().__init__()
        self.inner, self.config, self.eos_id, self.n, self.calls = model, model.config, eos_id, n, 0

    def forward(self, *args, **kwargs) -> Tensor:
        logits = self.inner(*args, **kwargs)
        if self.calls < self.n:
            logits = logits.clone()
            logits[..., self.eos_id] = float("-inf")
        self.calls += 1
        return logits


class LocalModel:
    """Evaluation calls on a loaded v1 model + tokenizer (both read-only)."""

    has_likelihood = True

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model.eval(), tokenizer

    @classmethod
    def from_dir(cls, model_dir: str | Path, dtype: str = "auto", fast: bool | None = None) -> "LocalModel":
        """The checkpoint in `model_dir`, on the fast paths unless `fast` is False (None: unless QWENVL_FAST=0),
        as the chat API and the server load it."""
        from ..fast_paths import use_fast_paths
        from ..families import family_name
        from ..tokenizer import QWenTokenizer
        from ..weights import load_model

        if family_name(model_dir) == "qwen2_vl":
            raise ValueError(f"{model_dir} is a Qwen2-VL checkpoint: evaluate it through `qwenvl serve --model "
                             f"{model_dir}` and `qwenvl eval --endpoint URL` (the official eval scripts are v1's)")
        return cls(use_fast_paths(load_model(model_dir, dtype), fast), QWenTokenizer.from_pretrained(model_dir))

    # ------------------------------------------------------------------ inputs

    def prompt_ids(self, sample: Sample) -> list[int]:
        """Ids of the prompt with each image span as a placeholder (`<img></img>` encodes to one)."""
        text = IMAGE_SPAN.sub("<img></img>", sample.prompt)
        if sample.chat:
            return make_context(self.tokenizer, text, None, system=DEFAULT_SYSTEM)[1]
        return self.tokenizer.encode(text)

    def pixels(self, samples: Sequence[Sample], repeat: Sequence[int] | None = None) -> Tensor | None:
        """[N, 3, S, S] for every image of every sample in order (sample i repeated repeat[i] times)."""
        size = self.model.config.visual.image_size
        out = []
        for i, s in enumerate(samples):
            one = [preprocess_v1(load_image(src, TRUSTED), size) for src in s.images]
            out += one * (1 if repeat is None else repeat[i])
        return torch.stack(out) if out else None

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(self, samples: Sequence[Sample], max_new_tokens: int, min_new_tokens: int = 0) -> list[str]:
        """Greedy answers for a batch (left-padded with <|endoftext|>)."""
        tok = self.tokenizer
        ids, mask = left_pad([self.prompt_ids(s) for s in samples], tok.eod_id)         # [B, T]
        chat = any(s.chat for s in samples)
        stops = ((tok.im_end_id,), (tok.im_start_id,)) if chat else ()
        params = SamplingParams(max_new_tokens=max_new_tokens, do_sample=False, stop_words_ids=stops)
        model = NoEosBefore(self.model, tok.eod_id, min_new_tokens) if min_new_tokens else self.model
        new = generate(model, ids, params, attention_mask=mask, images=self.pixels(samples), eos_token_id=tok.eod_id)
        return [self.decode(row, s.chat) for row, s in zip(new.tolist(), samples)]

    def decode(self, new_ids: list[int], chat: bool) -> str:
        """Raw: every special token skipped (as decode(skip_special_tokens=True)); chat: the response
        before the first stop, <ref>/<box> tags kept (as model.chat). Stripped."""
        tok = self.tokenizer
        if chat:
            kept = [t for t in response_tokens(new_ids, tok) if t < tok.eod_id or t in tok.image_special_ids]
        else:
            kept = [t for t in new_ids if t < tok.eod_id]
        return tok.decode(kept, errors="replace").strip()

    # ------------------------------------------------------------------ likelihood ranking

    def option_ids(self, sample: Sample) -> list[list[int]]:
        """tokenizer(" " + letter) for each choice (the official targets)."""
        return [self.tokenizer.encode(" " + LETTERS[i]) for i in range(len(sample.choices))]

    @torch.no_grad()
    def option_losses(self, samples: Sequence[Sample]) -> list[list[float]]:
        """Mean CE of each option's tokens after the prompt. One batched forward when every option is
        one token (the letters are, in Qwen's vocabulary); else one row per option (the reference path)."""
        if all(len(o) == 1 for s in samples for o in self.option_ids(s)):
            return self._single_token_losses(samples)
        return [self.reference_losses(s) for s in samples]

    def _single_token_losses(self, samples: Sequence[Sample]) -> list[list[float]]:
        ids, mask = left_pad([self.prompt_ids(s) for s in samples], self.tokenizer.eod_id)
        logits = self.model(ids, images=self.pixels(samples), attention_mask=mask, last_only=True)[:, -1]  # [B, V]
        logp = torch.log_softmax(logits.float(), dim=-1)
        return [[-logp[b, o[0]].item() for o in self.option_ids(s)] for b, s in enumerate(samples)]

    def reference_losses(self, sample: Sample) -> list[float]:
        """The official computation, one (prompt + option) row at a time."""
        prompt, out = self.prompt_ids(sample), []
        pixels = self.pixels([sample])
        for option in self.option_ids(sample):
            ids = torch.tensor([prompt + option])                                         # [1, T]
            logits = self.model(ids, images=pixels)                                       # [1, T, V]
            out.append(target_losses(logits, ids, [len(option)])[0].item())
        return out
