"""What the engine, the server and the CLI need to know about one model family, in one small object each.

    family = family_of(model)          # QwenVLFamily (v1) or Qwen2VLFamily, picked by the model's class
    family_name(model_dir)             # 'qwen_vl' | 'qwen2_vl', from config.json's model_type

The engine asks its family for the KV cache, the prefill / decode calls (positions included: v1 counts
real tokens, Qwen2-VL adds each request's M-RoPE `rope_delta`, kept per request by the engine), and the
encoding of image features. The server asks it how to load an image (and the per-request pixel limits of
Qwen2-VL), how to render messages to ids, which ids stop an answer, how to turn ids into text, and how
boxes are written. Nothing here keeps per-request state.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .config import read_json_object
from .grounding import BoxFormat, parse_boxes, to_pixels
from .images import image_digest, load_image, preprocess_v1
from .kv_cache import KVCache
from .messages import ImageSlot, Message, Text, check_roles, render_messages


def family_name(model_dir: str | Path) -> str:
    """'qwen2_vl' when config.json says so, else 'qwen_vl' (v1 checkpoints carry model_type 'qwen')."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return "qwen_vl"                  # the v1 loader reports the missing file with its own message
    return "qwen2_vl" if read_json_object(path).get("model_type") == "qwen2_vl" else "qwen_vl"


def load_family(model_dir: str | Path, dtype: str = "auto", fast: bool | None = None):
    """(model, tokenizer, family) of a checkpoint folder for inference, the family chosen by config.json; the model
    runs the fast paths unless `fast=False` or QWENVL_FAST=0 (fast_paths.py)."""
    from .fast_paths import use_fast_paths

    if family_name(model_dir) == "qwen2_vl":
        from .qwen2_tokenizer import Qwen2Tokenizer
        from .qwen2_vl_weights import load_model, load_processor_config

        model = use_fast_paths(load_model(model_dir, dtype).eval(), fast)
        return model, Qwen2Tokenizer.from_pretrained(model_dir), Qwen2VLFamily(model, load_processor_config(model_dir))
    from .tokenizer import QWenTokenizer
    from .weights import load_model

    model = use_fast_paths(load_model(model_dir, dtype).eval(), fast)
    return model, QWenTokenizer.from_pretrained(model_dir), QwenVLFamily(model)


def family_of(model) -> "QwenVLFamily | Qwen2VLFamily":
    from .qwen2_vl import Qwen2VL

    return Qwen2VLFamily(model) if isinstance(model, Qwen2VL) else QwenVLFamily(model)


@dataclass(frozen=True)
class LoadedVisual:
    """An image ready for the engine: content key, pixels (or a maker), grid (Qwen2-VL), original size."""

    key: str
    pixels: Any
    width: int
    height: int
    grid_thw: tuple[int, int, int] | None = None


# ---------------------------------------------------------------------------------------------- v1


class QwenVLFamily:
    """Qwen-VL / Qwen-VL-Chat: fixed 448² images, `<img>` spans, 1-D RoPE counted per row."""

    name = "qwen_vl"
    prefix_cache = True                   # K/V of prompt prefixes ending with an image may be reused
    grids_in_prompt = False               # the prompt's length does not depend on the images
    box_format = BoxFormat.QWEN_VL

    def __init__(self, model):
        self.model = model

    # -- engine
    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    @property
    def image_start_id(self) -> int:
        return self.model.config.visual.image_start_id

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """Keys + values of one token over all layers. Qwen-VL-Chat, bf16: 2 * 32 * 32 * 128 * 2 = 512 KiB."""
        c = self.model.config
        return 2 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * torch.empty((), dtype=dtype).element_size()

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype) -> KVCache:
        return KVCache.empty(self.model.config, batch, max_len, dtype)

    def check_images(self, prompt_ids: list[int], images: list) -> None:
        visual = self.model.config.visual
        n_spans = prompt_ids.count(visual.image_start_id)
        if n_spans != len(images):
            raise ValueError(f"the prompt has {n_spans} image spans but {len(images)} images were given")
        size = (3, visual.image_size, visual.image_size)
        if any(isinstance(img.pixels, Tensor) and tuple(img.pixels.shape) != size for img in images):
            raise ValueError(f"image pixels must have shape {size}")

    def encode(self, pixels: list[Tensor], grids: list) -> list[Tensor]:
        return list(self.model.encode_images(torch.stack(pixels)))                      # M x [Q, C]

    def join(self, features: list[Tensor], grids: list) -> Tensor:
        return torch.stack(features)                                                      # [N, Q, C]

    def prefill(self, ids: Tensor, mask: Tensor, features: Tensor | None, grids: list, cache: KVCache
                ) -> tuple[Tensor, list[int]]:
        """Last logits [B, V] and per-row rope deltas (always 0 for v1)."""
        logits = self.model(ids, image_features=features, attention_mask=mask, kv_cache=cache, last_only=True)
        return logits[:, -1], [0] * ids.shape[0]

    def decode(self, last: Tensor, cache: KVCache, rope_deltas: list[int]) -> Tensor:
        from .generation import next_logits

        return next_logits(self.model, last[:, 0], cache)                                # [n, V]

    # -- server
    def load_image(self, source: str, policy, min_pixels: int | None = None, max_pixels: int | None = None
                   ) -> LoadedVisual:
        image = load_image(source, policy)
        pixels = functools.partial(preprocess_v1, image, self.model.config.visual.image_size)   # lazy
        return LoadedVisual(image_digest(image), pixels, image.width, image.height)

    def check_pixel_limits(self, min_pixels: int | None, max_pixels: int | None) -> None:
        """ValueError when either is given: v1 resizes every image to one size, so they would be ignored."""
        given = [name for name, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None]
        if given:
            size = self.model.config.visual.image_size
            raise ValueError(f"{given[0]} applies to Qwen2-VL models only; this Qwen-VL model resizes every image "
                             f"to {size}x{size}")

    def render(self, messages: list[Message], tokenizer, images: list[LoadedVisual], system: str) -> list[int]:
        return render_messages(messages, tokenizer, system)

    def eos_token_id(self, tokenizer) -> int:
        return tokenizer.eod_id

    def stop_words_ids(self, tokenizer) -> tuple[tuple[int, ...], ...]:
        return ((tokenizer.im_end_id,), (tokenizer.im_start_id,))

    def visible(self, tokenizer, token_id: int) -> bool:
        return 0 <= token_id < tokenizer.eod_id or token_id in tokenizer.image_special_ids

    def decode_text(self, tokenizer, ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True, keep_image_special=True, errors="replace")

    def span_hint(self, tokenizer) -> str:
        return f"each of its images takes {tokenizer.image_span + 2}"

    def check_budget(self, images: list, max_visual_tokens: int, min_pixels: int | None = None) -> None:
        """v1 images are a fixed number of tokens each: nothing to check."""

    def boxes(self, text: str, width: int, height: int) -> list[tuple]:
        return [(b, to_pixels(b, width, height, scale=1000)) for b in parse_boxes(text, self.box_format)]


# ---------------------------------------------------------------------------------------------- v2


class Qwen2VLFamily(QwenVLFamily):
    """Qwen2-VL: dynamic-resolution images (grid_thw), GQA cache, M-RoPE with a per-request rope_delta.

    The prefix cache is off: a cached prefix would also need its rope_delta, and Qwen2-VL prompts
    rarely share one image prefix; every prompt is prefilled whole (the feature cache still applies).
    """

    name = "qwen2_vl"
    prefix_cache = False
    grids_in_prompt = True                # the number of image pads depends on each image's size
    box_format = BoxFormat.QWEN2_VL

    def __init__(self, model, processor_config=None):
        from .processor import VisionProcessorConfig

        super().__init__(model)
        self.processor = processor_config or VisionProcessorConfig(
            patch_size=model.config.vision.patch_size, temporal_patch_size=model.config.vision.temporal_patch_size,
            merge_size=model.config.vision.spatial_merge_size)

    @property
    def vocab_size(self) -> int:
        return self.model.config.text.vocab_size

    @property
    def image_start_id(self) -> int:
        return self.model.config.vision_start_token_id

    @property
    def merge_size(self) -> int:
        return self.model.config.vision.spatial_merge_size

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        t = self.model.config.text                        # GQA: only the key/value heads are stored
        return 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * torch.empty((), dtype=dtype).element_size()

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype) -> KVCache:
        from .qwen2_vl import new_kv_cache

        return new_kv_cache(self.model.config, batch, max_len, dtype)

    def check_images(self, prompt_ids: list[int], images: list) -> None:
        from .positions import vision_token_counts

        if any(img.grid_thw is None for img in images):
            raise ValueError("Qwen2-VL images need their grid_thw")
        n_pads = prompt_ids.count(self.model.config.image_token_id)
        need = sum(vision_token_counts([img.grid_thw for img in images], self.merge_size))
        if n_pads != need:
            raise ValueError(f"the prompt has {n_pads} image pad tokens but the images' grids need {need}")

    def encode(self, pixels: list[Tensor], grids: list) -> list[Tensor]:
        from .positions import vision_token_counts

        features = self.model.encode_vision(torch.cat(pixels), torch.tensor(grids, dtype=torch.long))  # [M, C]
        return list(features.split(vision_token_counts(grids, self.merge_size)))

    def join(self, features: list[Tensor], grids: list) -> Tensor:
        return torch.cat(features)                                                        # [M, C]

    def prefill(self, ids: Tensor, mask: Tensor, features: Tensor | None, grids: list, cache: KVCache
                ) -> tuple[Tensor, list[int]]:
        from .positions import get_rope_index

        cfg = self.model.config
        grid_thw = torch.tensor(grids, dtype=torch.long) if grids else None
        position_ids, rope_delta = get_rope_index(ids, grid_thw, None, cfg.image_token_id, cfg.video_token_id,
                                                  self.merge_size, mask)                  # [3, B, T], [B]
        logits = self.model(ids, position_ids, mask, image_grid_thw=grid_thw, image_features=features,
                            kv_cache=cache, last_only=True)
        return logits[:, -1], rope_delta.tolist()

    def decode(self, last: Tensor, cache: KVCache, rope_deltas: list[int]) -> Tensor:
        from .fast_paths import fast_step
        from .positions import decode_position_ids

        n, deltas = last.shape[0], torch.tensor(rope_deltas, dtype=torch.long)
        step = fast_step(self.model)                  # FastDecoder's step when the loader switched it on
        if step is not None:
            return step(last[:, 0], cache, deltas)                                        # [n, V]
        position_ids = decode_position_ids(cache.next_position, deltas)
        return self.model(last, position_ids, torch.ones(n, 1, dtype=torch.long), kv_cache=cache,
                          last_only=True)[:, -1]                                          # [n, V]

    def load_image(self, source: str, policy, min_pixels: int | None = None, max_pixels: int | None = None
                   ) -> LoadedVisual:
        from .processor import WHITE, preprocess_images

        image = load_image(source, policy, background=WHITE)          # Qwen2-VL composites alpha onto white
        patches, grid = preprocess_images([image], self.processor, min_pixels=min_pixels, max_pixels=max_pixels)
        key = f"{image_digest(image)}:{min_pixels}:{max_pixels}"      # the grid depends on the pixel limits
        return LoadedVisual(key, patches, image.width, image.height, tuple(int(v) for v in grid[0]))

    def check_pixel_limits(self, min_pixels: int | None, max_pixels: int | None) -> None:
        """ValueError when the limits in effect (these, else the processor config's) leave no size for an image.

        Example: max_pixels=784 with the hub's min_pixels 3136 -> "min_pixels=3136 (the checkpoint's default) is
        larger than max_pixels=784"."""
        lo, hi = min_pixels or self.processor.min_pixels, max_pixels or self.processor.max_pixels
        if lo > hi:
            lo_text = f"{lo}" if min_pixels else f"{lo} (the checkpoint's default)"
            hi_text = f"{hi}" if max_pixels else f"{hi} (the checkpoint's default)"
            raise ValueError(f"min_pixels={lo_text} is larger than max_pixels={hi_text}; no image size fits both")

    def check_budget(self, images: list, max_visual_tokens: int, min_pixels: int | None = None) -> None:
        """VisualBudgetError (a ValueError) naming the count when the images need too many tokens; `min_pixels`
        is the request's (None: the checkpoint's), which the hint names when it is what enlarges the images."""
        from .processor import check_visual_budget

        grids = [torch.tensor([img.grid_thw for img in images], dtype=torch.long)] if images else []
        check_visual_budget(grids, max_visual_tokens, self.merge_size, min_pixels or self.processor.min_pixels)

    def render(self, messages: list[Message], tokenizer, images: list[LoadedVisual], system: str) -> list[int]:
        from .qwen2_vl_chat import render_ids

        check_roles(messages)
        dicts = [{"role": m.role, "content": [{"type": "image"} if isinstance(p, ImageSlot) else
                                              {"type": "text", "text": p.text} for p in m.parts if
                                              isinstance(p, (ImageSlot, Text))]} for m in messages]
        grids = [list(img.grid_thw) for img in images] or None
        return render_ids(dicts, tokenizer, grids, None, self.merge_size, default_system=system)

    def eos_token_id(self, tokenizer) -> int:
        return tokenizer.token_id("<|im_end|>")

    def stop_words_ids(self, tokenizer) -> tuple[tuple[int, ...], ...]:
        from .qwen2_vl_chat import stop_token_ids

        return tuple((i,) for i in stop_token_ids(tokenizer))

    def visible(self, tokenizer, token_id: int) -> bool:
        """Text and grounding tags are shown; chat markers, vision spans and unknown ids are not."""
        hidden = {"<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>", "<|vision_pad|>"}
        special = tokenizer.id_to_special.get(token_id)
        if special is not None:
            return special not in hidden
        return token_id in tokenizer.id_to_token

    def decode_text(self, tokenizer, ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False)

    def span_hint(self, tokenizer) -> str:
        return ("its images take one token per 28x28 pixels, at least min_pixels and at most max_pixels each "
                "(lower them to shrink the images)")
