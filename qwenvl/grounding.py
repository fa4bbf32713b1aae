"""Boxes and referring expressions: list format, parsing, formatting, pixel conversion, drawing.

Qwen-VL (v1) writes a box as `<ref>phrase</ref><box>(x1,y1),(x2,y2)</box>`: top-left and bottom-right corners,
integers normalised to [0, 1000) (qwen_vl.md §7.7). Two families of functions live here:

* the official helpers, with the official semantics and errors (`from_list_format`, `to_list_format`,
  `_fetch_latest_picture`, `_fetch_all_box_with_ref`, `draw_bbox_on_latest_picture`);
* robust ones for model output and the API (`Box`, `parse_boxes` never raises, `format_box(es)`,
  `strip_grounding`, `to_pixels` / `from_pixels`, `draw_boxes`). Model output is read leniently
  (`parse_boxes` keeps out-of-range boxes, `malformed_boxes` lists what it skips, `to_pixels` clamps);
  boxes written into prompts are checked (`format_box` refuses what `from_list_format` refuses).

Box syntax is chosen by `BoxFormat`: v1 (`BoxFormat.QWEN_VL`) and Qwen2-VL (`BoxFormat.QWEN2_VL`,
`<|object_ref_start|>r<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>`, same [0, 1000) space;
qwen2_vl.md §9) are entries of `_FORMATS` sharing one parser. Qwen2.5-VL answers in JSON with `bbox_2d` in
absolute pixels of the model-input (smart-resized) image: `parse_bbox_2d` reads those, and
`bbox_2d_to_box` converts them explicitly to the [0, 1000) space.
"""
from __future__ import annotations

import enum
import json
import math
import numbers
import os
import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw

from qwenvl.tokenizer import (
    BOX_END,
    BOX_START,
    ENDOFTEXT,
    IMAGE_ST,
    IMG_END,
    IMG_START,
    QUAD_END,
    QUAD_START,
    REF_END,
    REF_START,
    SPECIAL_TOKENS,
)

NORM_MAX = 999  # largest coordinate of the [0, 1000) space


class BoxFormat(enum.Enum):
    """How boxes are written in text."""

    QWEN_VL = "qwen_vl"  # <ref>r</ref><box>(x1,y1),(x2,y2)</box>, ints in [0, 1000)
    QWEN2_VL = "qwen2_vl"  # <|object_ref_start|>r<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>


@dataclass(frozen=True)
class Box:
    """A box in the normalised [0, 1000) space: (x1, y1) top-left, (x2, y2) bottom-right; `ref` its phrase."""

    x1: int
    y1: int
    x2: int
    y2: int
    ref: str | None = None


# ------------------------------------------------------------------------ official list format

_OPENERS = {IMG_START: ("image", IMG_END), REF_START: ("ref", REF_END), BOX_START: ("box", BOX_END),
            QUAD_START: ("quad", QUAD_END)}
# to_list_format encodes with allowed_special = IMAGE_ST + (<|endoftext|>,) and tiktoken's default
# disallowed_special="all": every other special surface form in the text is an error.
_LIST_ALLOWED = IMAGE_ST + (ENDOFTEXT,)
_LIST_ALLOWED_RE = re.compile("|".join(re.escape(t) for t in _LIST_ALLOWED))
_LIST_DISALLOWED_RE = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS if t not in _LIST_ALLOWED))


def from_list_format(list_format: Iterable[dict[str, Any]]) -> str:
    """Official `from_list_format`: list of {'image'|'text'|'box'(+'ref')} dicts -> prompt text.

    Example: `[{"image": "a.jpg"}, {"text": "Hi"}, {"ref": "dog", "box": [[1, 2, 3.9, 4]]}]`
    -> `"Picture 1: <img>a.jpg</img>\\nHi<ref>dog</ref><box>(1,2),(3,4)</box>"` (numbers written with %d).
    """
    if isinstance(list_format, (str, bytes, dict)) or not isinstance(list_format, Iterable):
        raise ValueError(f"list_format must be a list of dicts, got {_short(list_format)}")
    text, n_images = "", 0
    for i, ele in enumerate(list_format):
        if isinstance(ele, dict) and "image" in ele:
            n_images += 1
            text += f"Picture {n_images}: " + IMG_START + _image_text(ele["image"], i) + IMG_END + "\n"  # latest: space
        elif isinstance(ele, dict) and "text" in ele:
            check_text(f"list_format[{i}]['text']", ele["text"])
            text += ele["text"]
        elif isinstance(ele, dict) and "box" in ele:
            if "ref" in ele:
                check_text(f"list_format[{i}]['ref']", ele["ref"])
                text += REF_START + ele["ref"] + REF_END
            text += "".join(BOX_START + _coords_text(_checked_box(box, f"list_format[{i}] box")) + BOX_END
                            for box in _boxes_of(ele, i))
        else:
            raise ValueError(f"Unsupport element: {ele} (expected a dict with 'image', 'text' or 'box')")
    return text


def _image_text(source: Any, i: int) -> str:
    """An image element's path or URL, which must not break out of its `<img>` span."""
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    check_text(f"list_format[{i}]['image'] (a path or URL)", source)
    if IMG_START in source or IMG_END in source:
        raise ValueError(f"list_format[{i}]['image'] {source!r} contains {IMG_START} or {IMG_END}")
    return source


def _boxes_of(ele: dict, i: int) -> list:
    """A box element's list of boxes. Example: `{"box": [[1, 2, 3, 4]]}` -> `[[1, 2, 3, 4]]`; a lone
    `[1, 2, 3, 4]` is refused (the official format wraps even one box in a list)."""
    boxes = ele["box"]
    if not _is_list_like(boxes) or not all(_is_list_like(b) for b in boxes):
        raise ValueError(f"list_format[{i}]['box'] must be a list of boxes [[x1, y1, x2, y2], ...], "
                         f"got {_short(boxes)}")
    return [list(b) for b in boxes]


def _is_list_like(value: Any) -> bool:
    """A list, tuple, array or tensor of things; not a string or a mapping."""
    return isinstance(value, Iterable) and hasattr(value, "__len__") and not isinstance(value, (str, bytes, dict))


def _checked_box(box: Sequence[Any], where: str) -> Sequence[float]:
    """A box of 4 real numbers in [0, 1000) with x1 <= x2 and y1 <= y2, or a ValueError naming it after `where`.

    The model reads boxes only in that space (qwen_vl.md §7.7): pixel coordinates or swapped corners would be
    written as they are and mean a different box. Convert pixels with `from_pixels`. Example:
    `_checked_box([0, 0, 1000, 5], "list_format[2] box")` -> "list_format[2] box list [0, 0, 1000, 5]:
    coordinates must be in [0, 1000) ...".
    """
    where = f"{where} {_short(box)}"
    if len(box) != 4:
        raise ValueError(f"a box needs exactly 4 numbers x1,y1,x2,y2, got {box!r}")
    if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in box):
        raise ValueError(f"{where}: coordinates must be finite numbers")
    if not all(0 <= v < 1000 for v in box):
        raise ValueError(f"{where}: coordinates must be in [0, 1000) (normalised, not pixels: see from_pixels)")
    if box[0] > box[2] or box[1] > box[3]:
        raise ValueError(f"{where}: needs x1 <= x2 and y1 <= y2 (top-left corner first)")
    return box


def _coords_text(box: Sequence[float]) -> str:
    """`[500.7, 1.2, 999, 998]` -> `"(500,1),(999,998)"` (%d truncates toward zero, as official)."""
    if len(box) != 4:
        raise ValueError(f"a box needs exactly 4 numbers x1,y1,x2,y2, got {box!r}")
    return "(%d,%d),(%d,%d)" % tuple(box)


def to_list_format(text: str) -> list[dict[str, str]]:
    """Official `to_list_format`: text -> [{'text'|'image'|'ref'|'box'|'quad': str}, ...].

    Example: `"Picture 1: <img>a.jpg</img>\\nWhat?"` ->
    `[{"text": "Picture 1: "}, {"image": "a.jpg"}, {"text": "\\nWhat?"}]`.
    Works on the text (the official goes through token ids; same result): NFC first, an opening tag pairs
    with the first matching closing tag after it, an unclosed one raises, and `<|im_start|>`,
    `<|im_end|>`, `<|extra_N|>` in the text raise ValueError as tiktoken's disallowed-special check does.
    """
    text = unicodedata.normalize("NFC", text)
    if bad := _LIST_DISALLOWED_RE.search(text):
        raise ValueError(f"Encountered text corresponding to disallowed special token {bad.group()!r}.")
    tags = list(_LIST_ALLOWED_RE.finditer(text))
    out: list[dict[str, str]] = []
    pos, k = 0, 0
    while k < len(tags):
        if tags[k].group() not in _OPENERS:
            k += 1
            continue
        key, closer = _OPENERS[tags[k].group()]
        j = next((j for j in range(k + 1, len(tags)) if tags[j].group() == closer), None)
        if j is None:  # the official message says "image" for every tag kind
            raise ValueError(f"Unclosed image token: {tags[k].group()} at character {tags[k].start()}")
        _append_text(out, text[pos : tags[k].start()])
        out.append({key: text[tags[k].end() : tags[j].start()]})
        pos, k = tags[j].end(), j + 1
    _append_text(out, text[pos:])
    return out


def _append_text(out: list[dict[str, str]], text: str) -> None:
    if text:  # the official drops empty text elements
        out.append({"text": text})


def check_history(history: Any) -> None:
    """ValueError naming the first bad turn unless `history` is None or a list of (query, response) pairs,
    each query a string and each response a string or None (the official chat history; JSON gives lists).

    Example: `check_history([("hi", "hello"), ["again", None]])` passes; `check_history(["hi"])` raises
    "history[0] must be a (query, response) pair, got 'hi'".
    """
    if history is None:
        return
    if not isinstance(history, (list, tuple)):
        raise ValueError(f"history must be a list of (query, response) pairs, got {_short(history)}")
    for i, turn in enumerate(history):
        if not isinstance(turn, (list, tuple)) or len(turn) != 2:
            raise ValueError(f"history[{i}] must be a (query, response) pair, got {_short(turn)}")
        if not isinstance(turn[0], str):
            raise ValueError(f"history[{i}][0], the query, must be a string, got {_short(turn[0])}")
        if turn[1] is not None and not isinstance(turn[1], str):
            raise ValueError(f"history[{i}][1], the response, must be a string or None, got {_short(turn[1])}")


def check_text(name: str, value: Any) -> None:
    """ValueError unless `value` is a string. Example: `check_text("query", None)` -> "query must be a string,
    got None"."""
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {_short(value)}")


def _short(value: Any, limit: int = 80) -> str:
    """A value for an error message: its repr, cut to `limit` characters, with its type unless None."""
    text = repr(value)
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return text if value is None or isinstance(value, str) else f"{type(value).__name__} {text}"


def _fetch_latest_picture(response: str, history: Sequence[Sequence[str | None]] | None) -> str | None:
    """Official: the last image in `response`, else in the newest earlier QUERY (responses are not searched).

    Example: `_fetch_latest_picture("no image", [("Picture 1: <img>a.jpg</img>", "see <img>r.jpg</img>")])`
    -> `"a.jpg"`.
    """
    check_text("response", response)
    check_history(history)
    turns = list(history or []) + [(response, None)]
    for query, _ in reversed(turns):
        for ele in reversed(to_list_format(query)):
            if "image" in ele:
                return ele["image"]
    return None


def _fetch_all_box_with_ref(text: str) -> list[dict[str, Any]]:
    """Official: every `<box>` as `{'box': (x1, y1, x2, y2)}`, plus `'ref'` (stripped) when a ref is right before.

    Example: `"<ref> dog</ref><box>(1,2),(3,4)</box><box>(5,6),(7,8)</box>"` ->
    `[{"box": (1, 2, 3, 4), "ref": "dog"}, {"box": (5, 6, 7, 8)}]` (only the first box gets the ref).
    Raises ValueError on a box that is not 4 integers (use `parse_boxes` for untrusted model output).
    """
    elements = to_list_format(text)
    output: list[dict[str, Any]] = []
    for i, ele in enumerate(elements):
        if "box" not in ele:
            continue
        try:
            coords = tuple(int(v) for v in ele["box"].replace("(", "").replace(")", "").split(","))
        except ValueError:
            raise ValueError(f"box {ele['box']!r} is not (x1,y1),(x2,y2) in integers") from None
        if len(coords) != 4:
            raise ValueError(f"box {ele['box']!r} has {len(coords)} numbers, expected 4")
        output.append({"box": coords})
        if i > 0 and "ref" in elements[i - 1]:
            output[-1]["ref"] = elements[i - 1]["ref"].strip()
    return output


# ------------------------------------------------------------------------------ robust parsing


@dataclass(frozen=True)
class _FormatSpec:
    tag_re: re.Pattern[str]  # group 1: "/" or "", group 2: the element kind
    box_re: re.Pattern[str]  # fullmatch of a box body, groups = x1, y1, x2, y2
    ref_tags: tuple[str, str] = (REF_START, REF_END)  # how format_box writes a ref and a box
    box_tags: tuple[str, str] = (BOX_START, BOX_END)


_BOX_BODY_RE = re.compile(r"\s*\(\s*(?P<x1>[0-9]{1,6})\s*,\s*(?P<y1>[0-9]{1,6})\s*\)\s*,"
                          r"\s*\(\s*(?P<x2>[0-9]{1,6})\s*,\s*(?P<y2>[0-9]{1,6})\s*\)\s*")
_FORMATS = {
    BoxFormat.QWEN_VL: _FormatSpec(
        tag_re=re.compile(r"<(/?)(ref|box|quad)>"),
        # ASCII digits only (\d would accept "３"); at most 6 so int() is cheap and never refuses.
        box_re=_BOX_BODY_RE,
    ),
    BoxFormat.QWEN2_VL: _FormatSpec(
        # Same groups as v1: group 1 is "end" for a closing tag (captured by the look-ahead, None for an
        # opening one), group 2 the kind: `<|object_ref_start|>` -> (None, "ref"), `<|box_end|>` -> ("end", "box").
        tag_re=re.compile(r"<\|(?=(?:object_ref|box|quad)_(?:start|(end))\|>)(?:object_(?=ref_))?"
                          r"(ref|box|quad)_(?:start|end)\|>"),
        box_re=_BOX_BODY_RE,
        ref_tags=("<|object_ref_start|>", "<|object_ref_end|>"),
        box_tags=("<|box_start|>", "<|box_end|>"),
    ),
}


def _closed_elements(text: str, spec: _FormatSpec) -> Iterator[tuple[str, str, int, int]]:
    """(kind, body, start, end) for each opening tag whose NEXT tag is its closing tag; other tags are skipped.

    Example: `"<ref>a</ref><box>x"` yields only `("ref", "a", 0, 12)`: the unclosed box is not an element.
    """
    tags = list(spec.tag_re.finditer(text))
    k = 0
    while k < len(tags):
        m = tags[k]
        nxt = tags[k + 1] if k + 1 < len(tags) else None
        if not m.group(1) and nxt is not None and nxt.group(1) and nxt.group(2) == m.group(2):
            yield m.group(2), text[m.end() : nxt.start()], m.start(), nxt.end()
            k += 2
        else:
            k += 1


def parse_boxes(text: str, fmt: BoxFormat = BoxFormat.QWEN_VL) -> list[Box]:
    """All well-formed boxes in `text`, each with the `<ref>` it belongs to. Never raises on any string.

    A ref applies to the run of boxes that follows it with only whitespace in between (that is how
    `from_list_format` writes several boxes for one ref). Malformed boxes (unclosed, nested, non-numeric,
    negative, more than 6 digits) are skipped. Example:
    `parse_boxes("<ref> dog</ref><box>(1,2),(3,4)</box> <box>(5,6),(7,8)</box> and <box>(9,9),(9,9)</box>")`
    -> `[Box(1, 2, 3, 4, "dog"), Box(5, 6, 7, 8, "dog"), Box(9, 9, 9, 9, None)]`.
    """
    spec = _FORMATS[fmt]
    boxes: list[Box] = []
    ref, last_end = None, 0
    for kind, body, start, end in _closed_elements(text, spec):
        if text[last_end:start].strip():  # text (or a stray tag) between: the ref's run of boxes ended
            ref = None
        if kind == "ref":
            ref = body.strip() or None
        elif kind == "box":
            if m := spec.box_re.fullmatch(body):
                boxes.append(Box(*(int(g) for g in m.groups()), ref=ref))
        else:  # a quad is not a Box; it also ends the run
            ref = None
        last_end = end
    return boxes


def malformed_boxes(text: str, fmt: BoxFormat = BoxFormat.QWEN_VL) -> list[str]:
    """The bodies of the closed box tags that `parse_boxes` skips, to tell a user why nothing was drawn.

    Example: `malformed_boxes("<box>(1,2),(3)</box><box>(1,2),(3,4)</box>")` -> `["(1,2),(3)"]`.
    """
    spec = _FORMATS[fmt]
    return [body for kind, body, _, _ in _closed_elements(text, spec)
            if kind == "box" and not spec.box_re.fullmatch(body)]


def format_box(box: Box, fmt: BoxFormat = BoxFormat.QWEN_VL) -> str:
    """`Box(1, 2, 3, 4, "dog")` -> `"<ref>dog</ref><box>(1,2),(3,4)</box>"` (no ref tag when ref is None).

    With `BoxFormat.QWEN2_VL`: `"<|object_ref_start|>dog<|object_ref_end|><|box_start|>(1,2),(3,4)<|box_end|>"`.
    This writes boxes INTO prompts, so like `from_list_format` it refuses non-finite, out-of-[0, 1000) or
    swapped coordinates with a ValueError naming the box. To quote a parsed model box back as it was
    written (possibly out of range), use `box_as_written`.
    """
    _checked_box((box.x1, box.y1, box.x2, box.y2), f"format_box: Box(ref={box.ref!r})")
    return box_as_written(box, fmt)


def box_as_written(box: Box, fmt: BoxFormat = BoxFormat.QWEN_VL) -> str:
    """`box` in the text syntax of `fmt`, unchecked: for quoting model output back (e.g. in a warning).

    Example: `box_as_written(Box(1000, 0, 2000, 5))` -> `"<box>(1000,0),(2000,5)</box>"` (`format_box` refuses it).
    """
    spec = _FORMATS[fmt]  # unknown formats fail here
    ref = spec.ref_tags[0] + box.ref + spec.ref_tags[1] if box.ref is not None else ""
    return ref + spec.box_tags[0] + _coords_text((box.x1, box.y1, box.x2, box.y2)) + spec.box_tags[1]


def format_boxes(boxes: Iterable[Box], fmt: BoxFormat = BoxFormat.QWEN_VL) -> str:
    """Consecutive boxes with the same ref share one `<ref>`, so `parse_boxes(format_boxes(b)) == b`.

    Example: `[Box(1, 2, 3, 4, "a"), Box(5, 6, 7, 8, "a")]` ->
    `"<ref>a</ref><box>(1,2),(3,4)</box><box>(5,6),(7,8)</box>"`.
    """
    parts, prev = [], object()
    for box in boxes:
        same_run = box.ref is not None and box.ref == prev
        parts.append(format_box(Box(box.x1, box.y1, box.x2, box.y2) if same_run else box, fmt))
        prev = box.ref
    return "".join(parts)


_REF_WITH_BOXES = re.compile(r"<ref>(.*?)</ref>(?:<box>.*?</box>)*(?:<quad>.*?</quad>)*")  # TUTORIAL.md
_BOX_OR_QUAD = re.compile(r"<(box|quad)>.*?(?:</\1>|$)", re.DOTALL)  # web demo; also an unfinished tail


def strip_grounding(text: str) -> str:
    """Text for display: keep ref phrases, drop boxes, quads and stray ref tags.

    Example: `"<ref> Woman</ref><box>(451,379),(731,806)</box> and her dog<box>(1,2"` -> `" Woman and her dog"`.
    """
    text = _REF_WITH_BOXES.sub(r"\1", text)
    text = _BOX_OR_QUAD.sub("", text)
    return text.replace(REF_START, "").replace(REF_END, "")


# ------------------------------------------------------------------- Qwen2.5-VL JSON boxes


@dataclass(frozen=True)
class PixelBox:
    """A Qwen2.5-VL `bbox_2d`: absolute pixels of the model-input (smart-resized) image, and its `label`."""

    x1: float
    y1: float
    x2: float
    y2: float
    label: str | None = None


_JSON_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)


def parse_bbox_2d(text: str) -> list[PixelBox]:
    """Every `{"bbox_2d": [x1, y1, x2, y2], "label": ...}` of a JSON answer (fenced or bare). Never raises.

    Entries without 4 finite non-negative numbers are skipped; nothing parseable gives []. Example:
    '```json\n[{"bbox_2d": [10, 20, 110, 220], "label": "cat"}]\n```' -> [PixelBox(10, 20, 110, 220, "cat")].
    """
    fenced = _JSON_FENCE.findall(text)
    for candidate in (fenced or []) + [text]:
        try:
            data = json.loads(candidate.strip())
        except (ValueError, RecursionError):
            continue
        items = data if isinstance(data, list) else [data]
        return [b for b in (_pixel_box(item) for item in items) if b is not None]
    return []


def _pixel_box(item: Any) -> PixelBox | None:
    if not isinstance(item, dict) or not isinstance(item.get("bbox_2d"), list) or len(item["bbox_2d"]) != 4:
        return None
    coords = item["bbox_2d"]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
               for v in coords):
        return None
    label = item.get("label")
    return PixelBox(*(float(v) for v in coords), label=str(label) if label is not None else None)


def bbox_2d_to_box(box: PixelBox, input_width: int, input_height: int) -> Box:
    """A Qwen2.5-VL pixel box -> the [0, 1000) space, given the MODEL-INPUT size (not the original's).

    The model-input size is `grid_thw[2] * 14` × `grid_thw[1] * 14` (width × height). Convert to the original
    image with `to_pixels(box, orig_width, orig_height)`. Example, input 644 × 476 (a 640 × 480 photo):
    `bbox_2d_to_box(PixelBox(322, 119, 644, 476, "cat"), 644, 476)` -> `Box(500, 250, 999, 999, "cat")`.
    """
    return from_pixels(box.x1, box.y1, box.x2, box.y2, input_width, input_height, scale=1000, ref=box.label)


# ------------------------------------------------------------------------- pixel conversion


def _check_scale(scale: int) -> None:
    if scale not in (999, 1000):
        raise ValueError(
            f"{scale=}: use 1000 (official drawing, x * W / 1000) or 999 (official grounding eval, x / 999 * W)"
        )


def _clamp(v: float, lo: float, hi: float) -> float:
    return min(max(v, lo), hi)


def to_pixels(box: Box, width: int, height: int, scale: int = 1000) -> tuple[float, float, float, float]:
    """Normalised box -> pixel (x1, y1, x2, y2), clamped to the image and ordered so x1 <= x2, y1 <= y2.

    `scale` is the divisor: 1000 is what the official drawing uses (so 999 maps to 0.999 * W), 999 is what
    the official grounding evaluation uses (999 maps to W). Example on a 640 x 480 image:
    `to_pixels(Box(500, 250, 999, 999), 640, 480)` -> `(320.0, 120.0, 639.36, 479.52)`;
    with `scale=999` -> `(320.32..., 120.12..., 640.0, 480.0)`.
    """
    _check_scale(scale)
    xs = sorted(_clamp(v / scale * width, 0, width) for v in (box.x1, box.x2))  # divide first, as official
    ys = sorted(_clamp(v / scale * height, 0, height) for v in (box.y1, box.y2))
    return xs[0], ys[0], xs[1], ys[1]


def from_pixels(
    x1: float, y1: float, x2: float, y2: float, width: int, height: int, scale: int = 1000, ref: str | None = None
) -> Box:
    """Pixel box -> normalised Box: round to nearest, clamp to [0, 999], order the corners.

    Example on 640 x 480: `from_pixels(320, 120, 640, 480, 640, 480)` -> `Box(500, 250, 999, 999)`
    (640 / 640 * 1000 = 1000 is clamped to 999); with `scale=999` -> `Box(500, 250, 999, 999)` too
    (320 / 640 * 999 = 499.5 rounds up to 500). Inverse of `to_pixels` for the same scale.
    """
    _check_scale(scale)

    def norm(p: float, size: int) -> int:
        return int(_clamp(math.floor(p / size * scale + 0.5), 0, NORM_MAX))

    xa, xb = sorted((norm(x1, width), norm(x2, width)))
    ya, yb = sorted((norm(y1, height), norm(y2, height)))
    return Box(xa, ya, xb, yb, ref)


# ---------------------------------------------------------------------------------- drawing

# matplotlib's TABLEAU_COLORS (what the official drawing picks from), in order instead of at random.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")


def _colours(boxes: Sequence[Box]) -> dict[str | None, str]:
    """One palette colour per distinct ref, in order of first appearance. Example: refs a, b, a -> 2 colours."""
    colours: dict[str | None, str] = {}
    for box in boxes:
        colours.setdefault(box.ref, PALETTE[len(colours) % len(PALETTE)])
    return colours


def _font_size(width: int, height: int) -> int:
    """Official Visualizer rule: sqrt(W * H) // 30, at least 15. Example: 640 x 480 -> 18."""
    return max(int(math.sqrt(width * height) // 30), 15)


def draw_boxes(image: Image.Image, boxes: Sequence[Box], scale: int = 1000) -> Image.Image:
    """A copy of `image` with a rectangle per box and its ref label at the top-left (CJK-capable font).

    Pixel corners are truncated to ints as the official drawing does (`int(x / 1000 * w)`).
    """
    from qwenvl.fonts import load_font

    out = image.convert("RGB")  # always a new image: the caller's image is not touched
    draw = ImageDraw.Draw(out)
    size = _font_size(*out.size)
    font, line = load_font(size), max(size // 4, 1)
    colours = _colours(boxes)
    for box in boxes:
        x1, y1, x2, y2 = (int(v) for v in to_pixels(box, out.width, out.height, scale))
        draw.rectangle((x1, y1, x2, y2), outline=colours[box.ref], width=line)
        if box.ref:
            _draw_label(draw, box.ref, (x1, y1), colours[box.ref], font)
    return out


def _draw_label(draw: ImageDraw.ImageDraw, text: str, xy: tuple[int, int], colour: str, font: Any) -> None:
    """Text on a black background, top-left at `xy` (the official draws on black, alpha 0.8)."""
    left, top, right, bottom = draw.textbbox(xy, text, font=font)
    draw.rectangle((left - 2, top - 2, right + 2, bottom + 2), fill="black")
    draw.text(xy, text, fill=_label_colour(colour), font=font)


def _label_colour(colour: str) -> tuple[int, int, int]:
    """Brighten a colour for text on black like the official Visualizer (channels >= 0.2, the largest >= 0.8).

    Example: `"#1f77b4"` -> `(51, 119, 204)`.
    """
    rgb = [max(int(colour[i : i + 2], 16), 51) for i in (1, 3, 5)]  # 51 = 0.2 * 255
    top = rgb.index(max(rgb))
    rgb[top] = max(rgb[top], 204)  # 204 = 0.8 * 255
    return rgb[0], rgb[1], rgb[2]


def draw_bbox_on_latest_picture(
    response: str,
    history: Sequence[Sequence[str | None]] | None = None,
    load_image: Callable[[str], Image.Image] | None = None,
) -> Image.Image | None:
    """Draw the boxes of `response` on the latest picture (see `_fetch_latest_picture`); None if either is missing.

    `load_image(source) -> PIL.Image` defaults to `qwenvl.images.load_image` (its policy decides which paths
    and URLs are allowed). Returns a PIL image (it has `.save()`, like the official VisImage).
    """
    source = _fetch_latest_picture(response, history)
    boxes = parse_boxes(response)
    if source is None or not boxes:
        return None
    if load_image is None:
        from qwenvl.images import load_image
    return draw_boxes(load_image(source), boxes)
