"""The Qwen2-VL Instruct chat template, rendered straight to token ids (qwen2_vl.md §2).

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n        (when the first message is not system)
    <|im_start|>{role}\\n{content}<|im_end|>\\n                          (each message)
    <|im_start|>assistant\\n                                             (add_generation_prompt)

List content is walked part by part: an image part becomes `<|vision_start|><|image_pad|>*N<|vision_end|>`,
a video part the same with `<|video_pad|>`, a text part its text (no newline in between). N comes from the
part's grid_thw through `positions.vision_token_counts`, the helper the model's count check uses too.
With `add_vision_id`, `Picture k: ` / `Video k: ` precede the spans. Message text is encoded as data
(`encode_untrusted`): special-token text in it never becomes a special id, unless `trusted=True`.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from torch import Tensor

from .positions import vision_token_counts
from .processor import _check_rate
from .qwen2_tokenizer import Qwen2Tokenizer

DEFAULT_SYSTEM = "You are a helpful assistant."
ROLES = ("system", "user", "assistant")
VISION_SPANS = {"image": ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>"),
                "video": ("<|vision_start|>", "<|video_pad|>", "<|vision_end|>")}


def part_kind(part: dict[str, Any]) -> str:
    """'image', 'video' or 'text', with the template's tests: type == 'image' or an 'image' / 'image_url'
    key; type == 'video' or a 'video' key; a 'text' key (a str). Example: {"image_url": ...} -> 'image'.

    The template silently drops any other part (e.g. {"type": "audio"} or {"type": "text", "txt": ...});
    here that is a ValueError, so no part of a message is lost without a word. A video part's `fps`, if
    given, must be a finite number > 0 (as `preprocess_video` requires)."""
    if not isinstance(part, dict):
        raise ValueError(f"a content part must be a dict like {{'type': 'text', 'text': ...}}, got {part!r:.80}")
    if part.get("type") == "image" or "image" in part or "image_url" in part:
        return "image"
    if part.get("type") == "video" or "video" in part:
        _check_rate("a video part's 'fps'", part.get("fps"))   # qwen-vl-utils' per-video sampling rate
        return "video"
    if "text" in part:
        if not isinstance(part["text"], str):
            raise ValueError(f"a text part's 'text' must be a string, got {part['text']!r:.80}")
        return "text"
    raise ValueError(f"unknown content part {part!r:.80}: expected type 'image', 'video' or 'text' "
                     "(with an 'image', 'image_url', 'video' or 'text' key)")


def _pieces(messages: Sequence[dict[str, Any]], add_generation_prompt: bool, add_vision_id: bool,
            default_system: str) -> Iterator[tuple[str, str]]:
    """(kind, value) in order: ('special', token), ('text', str), ('image', ''), ('video', '')."""
    counts = {"image": 0, "video": 0}
    if isinstance(messages, (str, dict)):
        raise ValueError(f"messages must be a list of dicts, got a {type(messages).__name__}; wrap it in a list")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {msg!r:.80}")
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise ValueError(f"message {i}: role {role!r} is not one of {ROLES}")
        if i == 0 and role != "system":
            yield from (("special", "<|im_start|>"), ("text", f"system\n{default_system}"),
                        ("special", "<|im_end|>"), ("text", "\n"))
        yield from (("special", "<|im_start|>"), ("text", f"{role}\n"))
        if isinstance(content, str):
            yield "text", content
        elif isinstance(content, (list, tuple)):
            for j, part in enumerate(content):
                try:
                    kind = part_kind(part)
                except ValueError as e:
                    raise ValueError(f"message {i}, part {j}: {e}") from None
                if kind in counts:
                    counts[kind] += 1
                    if add_vision_id:
                        yield "text", f"{'Picture' if kind == 'image' else 'Video'} {counts[kind]}: "
                    yield kind, ""
                else:
                    yield "text", part["text"]
        else:
            raise ValueError(f"message {i}: content must be a string or a list of parts, got {type(content).__name__}")
        yield from (("special", "<|im_end|>"), ("text", "\n"))
    if add_generation_prompt:
        yield from (("special", "<|im_start|>"), ("text", "assistant\n"))


def render_text(messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                add_vision_id: bool = False, default_system: str = DEFAULT_SYSTEM) -> str:
    """The template's text, one pad per image/video (what transformers' `apply_chat_template` returns).

    Example: [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
    -> '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n<|vision_start|>'
       '<|image_pad|><|vision_end|>Describe this image.<|im_end|>\\n<|im_start|>assistant\\n'
    """
    out = []
    for kind, value in _pieces(messages, add_generation_prompt, add_vision_id, default_system):
        out.append("".join(VISION_SPANS[kind]) if kind in VISION_SPANS else value)
    return "".join(out)


def render_ids(messages: Sequence[dict[str, Any]], tokenizer: Qwen2Tokenizer,
               image_grid_thw: Tensor | Sequence[Sequence[int]] | None = None,
               video_grid_thw: Tensor | Sequence[Sequence[int]] | None = None, merge_size: int = 2,
               add_generation_prompt: bool = True, add_vision_id: bool = False,
               default_system: str = DEFAULT_SYSTEM, trusted: bool = False) -> list[int]:
    """Token ids of the conversation with each span expanded to its grid's token count.

    The k-th image part takes image_grid_thw[k] (t·h·w / merge² pads), likewise for videos. Example: one
    image with grid [1, 8, 10] -> 20 `<|image_pad|>` ids between `<|vision_start|>` and `<|vision_end|>`.
    """
    counts = {"image": vision_token_counts(image_grid_thw, merge_size, "image_grid_thw"),
              "video": vision_token_counts(video_grid_thw, merge_size, "video_grid_thw")}
    encode = tokenizer.encode if trusted else tokenizer.encode_untrusted
    ids: list[int] = []
    used = {"image": 0, "video": 0}
    text = ""                      # adjacent text is encoded in one piece, as the template's output would be
    for kind, value in _pieces(messages, add_generation_prompt, add_vision_id, default_system):
        if kind == "text":
            text += value
            continue
        ids += encode(text)
        text = ""
        if kind == "special":
            ids.append(tokenizer.token_id(value))
            continue
        if used[kind] >= len(counts[kind]):
            raise ValueError(f"the messages have more {kind} parts than {kind}_grid_thw rows ({len(counts[kind])})")
        start, pad, end = (tokenizer.token_id(t) for t in VISION_SPANS[kind])
        ids += [start] + [pad] * counts[kind][used[kind]] + [end]
        used[kind] += 1
    ids += encode(text)
    for kind in counts:
        if used[kind] != len(counts[kind]):
            raise ValueError(f"{len(counts[kind])} {kind}_grid_thw rows but {used[kind]} {kind} parts in the messages")
    return ids


def stop_token_ids(tokenizer: Qwen2Tokenizer) -> tuple[int, int]:
    """Generation ends at <|im_end|> (Instruct) or <|endoftext|> (the generation_config eos list)."""
    return tokenizer.token_id("<|im_end|>"), tokenizer.token_id("<|endoftext|>")
