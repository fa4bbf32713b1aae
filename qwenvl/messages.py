"""Conversations (role + text and image parts) to ChatML ids for Qwen-VL-Chat, with user text as data.

    system block, one block per message, then `<|im_start|>assistant\\n`:

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>
    \\n<|im_start|>user\\nPicture 1: <img><imgpad>*Q</img>\\nWhat is it?<|im_end|>
    \\n<|im_start|>assistant\\n

Every text goes through `tokenizer.encode_untrusted`, so no text can produce a special token, an image
span or a file path: images exist only as `ImageSlot` parts, each one `Picture k: ` + placeholder +
`\\n` with k counted over the whole conversation (as the official web demo numbers uploads). The text
around a span is tokenized exactly as the official `from_list_format` + `make_context` would tokenize
it, so for tag-free texts the ids equal `chat.make_context` token for token (tests/test_server.py).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .chat import DEFAULT_SYSTEM

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class ImageSlot:
    """Where an image goes; the pixels travel separately, in the same order."""


@dataclass(frozen=True)
class Message:
    role: str                               # "system" | "user" | "assistant"
    parts: tuple[Text | ImageSlot, ...]


def check_roles(messages: Sequence[Message]) -> None:
    """ValueError unless: at most one system message, first; images only from users; the last is a user's."""
    if not messages:
        raise ValueError("messages is empty; send at least one user message")
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise ValueError(f"messages[{i}].role is {m.role!r}; use one of {list(ROLES)}")
        if m.role == "system" and i != 0:
            raise ValueError(f"messages[{i}] is a system message; only messages[0] may be one")
        if m.role != "user" and any(isinstance(p, ImageSlot) for p in m.parts):
            raise ValueError(f"messages[{i}] ({m.role}) has an image; images go in user messages")
    if messages[-1].role != "user":
        raise ValueError(f"the last message is from the {messages[-1].role}; it must be from the user")


def render_content(parts: Sequence[Text | ImageSlot], tokenizer, first_picture: int = 1) -> list[int]:
    """Ids of one message's content; images are numbered from `first_picture`.

    Text is merged between images and encoded in one piece, as the official code encodes the whole
    string: [ImageSlot(), Text("hi")] is encode("Picture 1: ") + placeholder + encode("\\nhi").
    """
    ids: list[int] = []
    pending, k = "", first_picture
    for part in parts:
        if isinstance(part, ImageSlot):
            ids += tokenizer.encode_untrusted(pending + f"Picture {k}: ") + tokenizer.image_placeholder()
            pending, k = "\n", k + 1
        else:
            pending += part.text
    return ids + (tokenizer.encode_untrusted(pending) if pending else [])


def render_messages(messages: Sequence[Message], tokenizer, default_system: str = DEFAULT_SYSTEM) -> list[int]:
    """Prompt ids for the assistant's next answer (checks the roles first)."""
    check_roles(messages)
    start, end, nl = [tokenizer.im_start_id], [tokenizer.im_end_id], tokenizer.encode_untrusted("\n")

    def block(role: str, content: list[int]) -> list[int]:
        return start + tokenizer.encode_untrusted(role) + nl + content + end

    if messages[0].role == "system":
        system, messages = render_content(messages[0].parts, tokenizer), messages[1:]
    else:
        system = tokenizer.encode_untrusted(default_system)
    ids, picture = block("system", system), 1
    for m in messages:
        ids += nl + block(m.role, render_content(m.parts, tokenizer, picture))
        picture += count_images([m])
    return ids + nl + start + tokenizer.encode_untrusted("assistant") + nl


def count_images(messages: Sequence[Message]) -> int:
    return sum(isinstance(p, ImageSlot) for m in messages for p in m.parts)
