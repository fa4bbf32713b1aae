"""The official Python API, so a user switches by changing an import:

    from qwenvl import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    response, history = model.chat(tokenizer, query, history=None)

`QWenVL` holds the pure `QWenLMHeadModel` and the generation defaults; the work is in chat.py and
generation.py. `trust_remote_code`, `device_map` and similar transformers arguments are accepted and
ignored (everything runs here, on the CPU). The loaded model runs the fast inference paths (fast_paths.py);
`from_pretrained(dir, fast=False)` or QWENVL_FAST=0 keeps the reference paths.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from . import chat as chat_lib
from .config import GenerationConfig, QWenConfig
from .fast_paths import use_fast_paths
from .generation import generate as generate_ids
from .model import QWenLMHeadModel
from .tokenizer import QWenTokenizer
from .weights import load_generation_config, load_model

_IGNORED_LOAD_ARGS = {"trust_remote_code", "device_map", "revision", "low_cpu_mem_usage", "fp32", "bf16", "fp16",
                      "use_flash_attn", "resume_download", "attn_implementation"}


class QWenVL:
    """A loaded Qwen-VL model with its generation config: forward, generate, chat, chat_stream."""

    def __init__(self, model: QWenLMHeadModel, generation_config: GenerationConfig | None = None):
        self.model = model
        self.generation_config = generation_config or GenerationConfig()

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, dtype: str | torch.dtype | None = "auto",
                        torch_dtype: str | torch.dtype | None = None, fast: bool | None = None,
                        **kwargs) -> "QWenVL":
        """Load config.json, generation_config.json and the weights of a checkpoint directory; `fast` as in
        fast_paths.use_fast_paths (None: on unless QWENVL_FAST=0)."""
        unknown = set(kwargs) - _IGNORED_LOAD_ARGS
        if unknown:
            raise TypeError(f"unknown arguments to from_pretrained: {sorted(unknown)}")
        model = load_model(model_dir, dtype=torch_dtype if torch_dtype is not None else dtype)
        use_fast_paths(model, fast)
        return cls(model, load_generation_config(model_dir))

    @property
    def config(self) -> QWenConfig:
        return self.model.config

    def eval(self) -> "QWenVL":
        self.model.eval()
        return self

    def __call__(self, input_ids: Tensor, images: Tensor | None = None, **kwargs) -> Tensor:
        """Logits [B, T, V] for input_ids [B, T]; images [N, 3, S, S] preprocessed pixels (see images.py)."""
        return self.model(input_ids, images=images, **kwargs)

    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, images: Tensor | None = None,
                 generation_config: GenerationConfig | None = None, stop_words_ids=None,
                 generator: torch.Generator | None = None, **kwargs) -> Tensor:
        """Prompt + new ids [B, T + n], like transformers' generate. Without `images`, the paths in the
        prompt's `<img>` spans are loaded (trusted input, as the official model does)."""
        gen = generation_config or self.generation_config
        if images is None:
            images = self._span_images(input_ids)
        params = chat_lib.sampling_params(gen, stop_words_ids, **kwargs)
        new = generate_ids(self.model, input_ids, params, attention_mask=attention_mask, images=images,
                           eos_token_id=gen.eos_token_id, generator=generator)
        return torch.cat([input_ids, new], dim=1)

    def _span_images(self, input_ids: Tensor) -> Tensor | None:
        per_row = [chat_lib.load_span_images(row.tolist(), self.model) for row in input_ids]
        found = [p for p in per_row if p is not None]
        return torch.cat(found) if found else None

    def chat(self, tokenizer: QWenTokenizer, query: str, history=None, system: str = chat_lib.DEFAULT_SYSTEM,
             append_history: bool = True, generation_config: GenerationConfig | None = None, **kwargs):
        """(response, history), as the official `model.chat`."""
        with torch.no_grad():
            return chat_lib.chat(self.model, tokenizer, query, history, system, append_history,
                                 generation_config=generation_config or self.generation_config, **kwargs)

    def chat_stream(self, tokenizer: QWenTokenizer, query: str, history=None, system: str = chat_lib.DEFAULT_SYSTEM,
                    generation_config: GenerationConfig | None = None, **kwargs) -> Iterator[str]:
        """Yield the response decoded so far after each token, as the official `model.chat_stream`."""
        yield from chat_lib.chat_stream(self.model, tokenizer, query, history, system,
                                        generation_config=generation_config or self.generation_config, **kwargs)


class AutoModelForCausalLM:
    """`AutoModelForCausalLM.from_pretrained(dir)` -> QWenVL (drop-in for the transformers call)."""

    from_pretrained = staticmethod(QWenVL.from_pretrained)


class AutoTokenizer:
    """`AutoTokenizer.from_pretrained(dir)` -> QWenTokenizer."""

    from_pretrained = staticmethod(QWenTokenizer.from_pretrained)
