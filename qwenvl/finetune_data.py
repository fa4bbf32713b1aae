"""Fine-tune data: the official JSON file -> checked, rendered examples -> padded batches with pixels.

The file is a list of `{"id", "conversations": [{"from": "user"|"assistant", "value"}]}` (qwen_vl.md §9.1).
Images are written inline as `Picture N: <img>PATH</img>`; a relative PATH is relative to the JSON file.
Every sample is checked once, up front, and a problem names the sample id: unknown role, unclosed or
nested `<img>/<ref>/<box>/<quad>` tags, a box outside [0, 1000) or malformed, a missing image file or one
that does not open as an image, a sample longer than `max_len` (the official script cuts it silently, which
can split an image span; `truncate=True` cuts as it does, but refuses a cut inside an image span).

Rendering is `data.render_sft` (the official ids and labels); the ids keep the PATH bytes as written in
the JSON, so they equal the official ones, and the resolved file is loaded when the batch is built.
"""
from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from .data import IGNORE_INDEX, DataError, Rendered, render_sft
from .grounding import NORM_MAX
from .images import load_image, preprocess_v1

_TAG = re.compile(r"<(/?)(img|ref|box|quad)>")
_BOX = re.compile(r"\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*,\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*")
_URL = re.compile(r"^(https?://|data:)", re.IGNORECASE)


@dataclass
class Example:
    """One rendered sample: official ids and labels, and its images (resolved paths or URLs) in span order."""

    id: str
    rendered: Rendered
    images: list[str]

    @property
    def n_supervised(self) -> int:
        """Targets the loss sees: labels[1:] that are not IGNORE (the model shifts by one)."""
        return sum(1 for t in self.rendered.labels[1:] if t != IGNORE_INDEX)


def read_samples(path: str | Path) -> list[dict]:
    """The JSON list, with a clear error for a missing file, bad JSON or a non-list."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"fine-tune data file not found: {path}")
    try:
        samples = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(samples, list) or not samples:
        raise DataError(f"{path} must hold a non-empty JSON list of samples, got {type(samples).__name__}")
    return samples


def sample_fields(sample: object, index: int) -> tuple[str, list]:
    """(id, conversations) of one raw sample; the id defaults to `#index` when absent."""
    if not isinstance(sample, dict):
        raise DataError(f"sample #{index} is a {type(sample).__name__}, expected an object with 'conversations'")
    sample_id = str(sample.get("id", f"#{index}"))
    conv = sample.get("conversations")
    if not isinstance(conv, list):
        raise DataError(f"sample {sample_id!r}: 'conversations' must be a list of turns")
    if not all(isinstance(t, dict) for t in conv):
        raise DataError(f"sample {sample_id!r}: every turn must be an object with 'from' and 'value'")
    return sample_id, conv


def check_markup(conversation: Sequence[dict], sample_id: str) -> None:
    """Tags pair up without nesting (a `<box>` opened at the end of one turn may close in the next, as in the
    official grounding prompts; `<img>` must close in its own turn) and every box is `(x1,y1),(x2,y2)` in range.

    Example: "<ref>dog</ref><box>(10,20),(300,400)</box>" passes; "<box>(10,20),(1200,5)</box>" fails.
    """
    open_tag, body, opened_in = None, "", -1
    for turn, msg in enumerate(conversation):
        text, pos = str(msg.get("value", "")), 0
        for m in _TAG.finditer(text):
            if open_tag:
                body += text[pos:m.start()]
            closing, tag = m.group(1) == "/", m.group(2)
            where = f"sample {sample_id!r}, turn {turn}"
            if not closing and open_tag:
                raise DataError(f"{where}: <{tag}> opens inside an unclosed <{open_tag}>")
            if closing and open_tag != tag:
                raise DataError(f"{where}: </{tag}> without a matching <{tag}>")
            if closing:
                if tag == "box":
                    check_box(body, sample_id, turn)
                open_tag, body = None, ""
            else:
                open_tag, opened_in = tag, turn
            pos = m.end()
        if open_tag:
            body += text[pos:]
        if open_tag == "img":
            raise DataError(f"sample {sample_id!r}, turn {turn}: unclosed <img> tag")
    if open_tag:
        raise DataError(f"sample {sample_id!r}, turn {opened_in}: unclosed <{open_tag}> tag")


def check_box(body: str, sample_id: str, turn: int) -> None:
    """`(x1,y1),(x2,y2)` with integer corners in [0, NORM_MAX] and x1 <= x2, y1 <= y2."""
    m = _BOX.fullmatch(body)
    if not m:
        raise DataError(f"sample {sample_id!r}, turn {turn}: box {body!r} is not '(x1,y1),(x2,y2)'")
    x1, y1, x2, y2 = map(int, m.groups())
    if max(x1, y1, x2, y2) > NORM_MAX or x1 > x2 or y1 > y2:
        raise DataError(f"sample {sample_id!r}, turn {turn}: box {body!r} is out of range (corners are "
                        f"normalised to [0, {NORM_MAX}], top-left first)")


def resolve_image(source: str, base_dir: Path, sample_id: str) -> str:
    """A URL stays as is; a path is taken relative to the JSON file's folder and must be a file."""
    if _URL.match(source):
        return source
    path = Path(source).expanduser()
    path = path if path.is_absolute() else base_dir / path
    if not path.is_file():
        raise DataError(f"sample {sample_id!r}: image {source!r} not found (looked for {path})")
    return str(path)


def fit_length(rendered: Rendered, max_len: int, truncate: bool, sample_id: str, img_start_id: int) -> Rendered:
    """Refuse (default) or cut a sample longer than max_len; a cut must not split an image span."""
    n = len(rendered.input_ids)
    if n <= max_len:
        return rendered
    if not truncate:
        raise DataError(f"sample {sample_id!r} has {n} tokens > max_len {max_len}: raise max_len, shorten it, "
                        f"or allow the official hard cut (truncate)")
    kept = rendered.input_ids[:max_len]
    if kept.count(img_start_id) != kept.count(img_start_id + 1):
        raise DataError(f"sample {sample_id!r}: cutting {n} tokens to max_len {max_len} splits an image span")
    return Rendered(kept, rendered.labels[:max_len])


def load_examples(path: str | Path, tokenizer, max_len: int, system_message: str = "You are a helpful assistant.",
                  assistant_only: bool = False, truncate: bool = False) -> list[Example]:
    """Read, check and render every sample of the official fine-tune JSON file."""
    path = Path(path)
    examples, seen = [], set()
    for index, sample in enumerate(read_samples(path)):
        sample_id, conv = sample_fields(sample, index)
        if sample_id in seen:
            raise DataError(f"sample id {sample_id!r} appears twice in {path}")
        seen.add(sample_id)
        examples.append(render_example(sample_id, conv, tokenizer, path.parent, max_len, system_message,
                                       assistant_only, truncate))
    first_use: dict[str, str] = {}
    for e in examples:
        for src in e.images:
            first_use.setdefault(src, e.id)
    for src, sample_id in first_use.items():
        check_image(src, sample_id)
    return examples


def check_image(source: str, sample_id: str) -> None:
    """A local file must open as an image (header and structure, no full decode), so a file that is not one
    fails before training, not at its step. URLs are fetched when their batch is built."""
    if _URL.match(source):
        return
    try:
        with Image.open(source) as im:
            im.verify()
    except (OSError, SyntaxError, ValueError) as e:   # PIL: UnidentifiedImageError (an OSError), SyntaxError, ...
        raise DataError(f"sample {sample_id!r}: image {source} is not a readable image ({e})") from None


def render_example(sample_id: str, conv: list, tokenizer, base_dir: Path, max_len: int, system_message: str,
                   assistant_only: bool, truncate: bool) -> Example:
    check_markup(conv, sample_id)
    try:
        rendered = render_sft(conv, tokenizer, system_message, sample_id, assistant_only)
        paths = tokenizer.image_paths(rendered.input_ids)
    except DataError:
        raise
    except ValueError as e:      # the tokenizer's image-span errors (path too long, special token inside)
        raise DataError(f"sample {sample_id!r}: {e}") from None
    if not any(turn.get("from") == "assistant" for turn in conv[1:]):
        raise DataError(f"sample {sample_id!r} has no assistant reply to learn from")
    rendered = fit_length(rendered, max_len, truncate, sample_id, tokenizer.img_start_id)
    n_spans = rendered.input_ids.count(tokenizer.img_start_id)
    images = [resolve_image(p, base_dir, sample_id) for p in paths[:n_spans]]
    return Example(sample_id, rendered, images)


def make_batch(examples: Sequence[Example], pad_id: int, image_size: int) -> dict[str, Tensor]:
    """Right-padded ids/labels [B, T], the official mask (ids != pad), positions 0..T-1, pixels [N, 3, S, S]."""
    width = max(len(e.rendered.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.rendered.input_ids)
        ids[i, :n] = torch.tensor(e.rendered.input_ids)
        labels[i, :n] = torch.tensor(e.rendered.labels)
    positions = torch.arange(width).expand(len(examples), width)                 # [B, T]
    return {"input_ids": ids, "labels": labels, "attention_mask": ids != pad_id, "position_ids": positions,
            "images": load_pixels([(e.id, src) for e in examples for src in e.images], image_size)}


def load_pixels(sources: Sequence[tuple[str, str]], image_size: int) -> Tensor | None:
    """Pixels [N, 3, S, S] of (sample id, source) pairs in span order; a load failure names the sample."""
    if not sources:
        return None
    out = []
    for sample_id, src in sources:
        try:
            out.append(preprocess_v1(load_image(src), image_size))
        except ValueError as e:
            raise DataError(f"sample {sample_id!r}: {e}") from None
    return torch.stack(out)
