"""Scenes of the synthetic world: sample one from a seeded RNG, render it to pixels.

A `Scene` is plain data (canvas size, background, shapes, text items) with exact pixel boxes, so
the tasks can ask and answer questions about it without looking at pixels. `sample_scene` and
`render_scene` are pure: the same `random.Random` state and spec give the same scene, and the same
scene gives the same pixels (background noise comes from a seed stored in the scene).

Pixel boxes are `(x1, y1, x2, y2)` pixel *edges*: the ink covers columns x1..x2-1 and rows
y1..y2-1, so x2 - x1 is the width in pixels and the box is tight (every edge row/column has ink).
"""
from __future__ import annotations

import dataclasses
import functools
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from qwenvl.fonts import load_font
from qwenvl.synthetic_world import BACKGROUNDS, COLOURS, EN_WORDS, SHAPES, SIZES, TEXT_COLOURS, ZH_WORDS

BBox = tuple[int, int, int, int]
RGB = tuple[int, int, int]
TEXT_LANGS = ("en", "num", "zh")
MIN_FONT_PX = 8


@dataclass(frozen=True)
class SceneSpec:
    """What `sample_scene` may draw; the training script tunes difficulty here.

    Ranges are inclusive `(lo, hi)`. Sizes of shapes and fonts scale with min(width, height);
    `text_sizes` are font heights as a fraction of it. `max_occlusion` is the largest fraction of
    a shape's pixels that later shapes may cover (0 = shapes never touch). Placement can fail on a
    crowded canvas, so a scene may hold fewer objects/texts than asked (never more).
    """
    width: int = 224
    height: int = 224
    n_objects: tuple[int, int] = (1, 5)
    n_texts: tuple[int, int] = (0, 1)
    kinds: tuple[str, ...] = tuple(SHAPES)
    colours: tuple[str, ...] = tuple(COLOURS)
    sizes: tuple[str, ...] = tuple(SIZES)
    backgrounds: tuple[str, ...] = tuple(BACKGROUNDS)
    text_langs: tuple[str, ...] = TEXT_LANGS
    text_sizes: tuple[float, ...] = (0.07, 0.09, 0.11, 0.14)
    max_occlusion: float = 0.25
    colour_jitter: int = 12
    noise: int = 8

    def __post_init__(self) -> None:
        if not (16 <= self.width <= 999 and 16 <= self.height <= 999):   # see to_1000: x1 < x2 needs < 1000 px
            raise ValueError(f"canvas must be 16..999 px per side, got {self.width}x{self.height}")
        for name in ("n_objects", "n_texts"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"{name}={(lo, hi)} must satisfy 0 <= lo <= hi")
        for name, allowed in (("kinds", SHAPES), ("colours", COLOURS), ("sizes", SIZES),
                              ("backgrounds", BACKGROUNDS), ("text_langs", TEXT_LANGS)):
            values = getattr(self, name)
            bad = [v for v in values if v not in allowed]
            if bad or not values:
                raise ValueError(f"{name}={values} must be a non-empty subset of {tuple(allowed)}")
        if not 0.0 <= self.max_occlusion < 1.0:
            raise ValueError(f"max_occlusion={self.max_occlusion} must be in [0, 1)")

    def replace(self, **changes) -> "SceneSpec":
        """A copy with some fields changed, e.g. `spec.replace(n_objects=(1, 1))`."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Background:
    kind: str          # a key of BACKGROUNDS
    rgb: RGB
    rgb2: RGB          # second colour (gradient end, stripes, checker)
    period: int        # stripe / checker period in pixels
    noise: int         # per-pixel noise amplitude (std) in 0..255 units
    seed: int          # seeds the noise, so rendering stays pure


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    size: str
    rgb: RGB
    x: int             # top-left of the side x side drawing square
    y: int
    side: int
    bbox: BBox         # tight pixel box of the drawn shape
    visible: float     # fraction of its pixels not covered by later shapes

    @property
    def center(self) -> tuple[float, float]:
        return (self.bbox[0] + self.bbox[2]) / 2, (self.bbox[1] + self.bbox[3]) / 2


@dataclass(frozen=True)
class TextItem:
    text: str
    lang: str          # "en" | "num" | "zh"
    font_px: int
    rgb: RGB
    bbox: BBox         # tight pixel box of the ink; the ink mask is pasted at (bbox[0], bbox[1])

    @property
    def center(self) -> tuple[float, float]:
        return (self.bbox[0] + self.bbox[2]) / 2, (self.bbox[1] + self.bbox[3]) / 2


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    background: Background
    objects: tuple[Shape, ...]   # in drawing order: later ones are on top
    texts: tuple[TextItem, ...]  # drawn before the shapes, never overlapped by them


# ---------------------------------------------------------------------------------------------
# Boxes in the model's [0, 1000) convention
# ---------------------------------------------------------------------------------------------

def to_1000(v: int, extent: int) -> int:
    """Normalise one pixel-edge coordinate: min(999, floor(1000 * v / extent)).

    >>> to_1000(112, 224), to_1000(224, 224), to_1000(0, 224)
    (500, 999, 0)

    For any box of width >= 1 px on a canvas < 1000 px, x1 < x2 still holds after normalising (at exactly
    1000 px the last column would map 999 -> 999, which is why canvases stop at 999 px).
    To go back to pixels use v * extent / 1000 (the official eval divides by 999: <= 0.1% apart).
    """
    if not 0 <= v <= extent:
        raise ValueError(f"coordinate {v=} outside [0, {extent}]")
    return min(999, v * 1000 // extent)


def box_1000(bbox: BBox, width: int, height: int) -> BBox:
    """e.g. box_1000((10, 20, 30, 40), 100, 200) == (100, 100, 300, 200)."""
    x1, y1, x2, y2 = bbox
    return to_1000(x1, width), to_1000(y1, height), to_1000(x2, width), to_1000(y2, height)


def box_text(bbox: BBox, width: int, height: int) -> str:
    """e.g. box_text((10, 20, 30, 40), 100, 200) == "<box>(100,100),(300,200)</box>"."""
    x1, y1, x2, y2 = box_1000(bbox, width, height)
    return f"<box>({x1},{y1}),({x2},{y2})</box>"


# ---------------------------------------------------------------------------------------------
# Masks (cached: they depend only on kind/size or text/font size)
# ---------------------------------------------------------------------------------------------

def _star(points: int = 5, inner: float = 0.42) -> list[tuple[float, float]]:
    import math
    out = []
    for i in range(2 * points):
        r = 1.0 if i % 2 == 0 else inner
        a = -math.pi / 2 + i * math.pi / points
        out.append((r * math.cos(a), r * math.sin(a)))
    return out


def _regular(n: int, start_deg: float) -> list[tuple[float, float]]:
    import math
    return [(math.cos(math.radians(start_deg + 360 * i / n)), math.sin(math.radians(start_deg + 360 * i / n)))
            for i in range(n)]


_POLYGONS: dict[str, list[tuple[float, float]]] = {
    "square": [(0, 0), (1, 0), (1, 1), (0, 1)],
    "triangle": [(0.5, 0), (1, 1), (0, 1)],
    "diamond": [(0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)],
    "star": _star(),
    "hexagon": _regular(6, 0),
    "cross": [(1, 0), (2, 0), (2, 1), (3, 1), (3, 2), (2, 2), (2, 3), (1, 3), (1, 2), (0, 2), (0, 1), (1, 1)],
}


@functools.lru_cache(maxsize=4096)
def shape_mask(kind: str, side: int) -> np.ndarray:
    """Boolean [side, side] mask of a filled shape, centred, aspect kept, touching 2+ edges.

    e.g. shape_mask("square", 3) is all True; shape_mask("circle", 5)[2, 2] is True and [0, 0] False.
    """
    img = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(img)
    if kind == "circle":
        draw.ellipse((0, 0, side - 1, side - 1), fill=255)
    elif kind in _POLYGONS:
        pts = _POLYGONS[kind]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ext = max(max(xs) - min(xs), max(ys) - min(ys))
        scale = (side - 1) / ext
        ox = (side - 1 - (max(xs) - min(xs)) * scale) / 2
        oy = (side - 1 - (max(ys) - min(ys)) * scale) / 2
        draw.polygon([(ox + (px - min(xs)) * scale, oy + (py - min(ys)) * scale) for px, py in pts], fill=255)
    else:
        raise ValueError(f"unknown shape kind {kind!r}; known: {sorted(SHAPES)}")
    mask = np.asarray(img) > 0
    mask.setflags(write=False)
    return mask


@functools.lru_cache(maxsize=8192)
def text_mask(text: str, font_px: int) -> np.ndarray:
    """uint8 [h, w] anti-aliased ink of `text`, cropped to the ink (tight on all four sides)."""
    font = load_font(font_px, require_cjk=True)
    left, top, right, bottom = font.getbbox(text)
    img = Image.new("L", (right - left + 4, bottom - top + 4), 0)
    ImageDraw.Draw(img).text((2 - left, 2 - top), text, font=font, fill=255)
    ink = img.getbbox()
    if ink is None:
        raise ValueError(f"{text!r} at {font_px=} draws no ink")
    out = np.asarray(img.crop(ink))
    out.setflags(write=False)
    return out


def _tight(mask: np.ndarray) -> BBox:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def object_mask(obj: Shape, width: int, height: int) -> np.ndarray:
    """Boolean [height, width] canvas mask of one shape, as drawn (before occlusion)."""
    canvas = np.zeros((height, width), dtype=bool)
    canvas[obj.y:obj.y + obj.side, obj.x:obj.x + obj.side] = shape_mask(obj.kind, obj.side)
    return canvas


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------

def _jitter(rgb: RGB, rng: random.Random, amount: int) -> RGB:
    return tuple(min(255, max(0, c + rng.randint(-amount, amount))) for c in rgb)  # type: ignore[return-value]


def _light_colour(rng: random.Random) -> RGB:
    base = rng.randint(200, 245)
    return tuple(min(255, base + rng.randint(-12, 10)) for _ in range(3))  # type: ignore[return-value]


def sample_background(rng: random.Random, spec: SceneSpec) -> Background:
    """A light background of one of `spec.backgrounds`, with its own noise seed."""
    kind = rng.choice(spec.backgrounds)
    noise = {"plain": 0, "noise": spec.noise}.get(kind, rng.randint(0, spec.noise // 2))
    return Background(kind=kind, rgb=_light_colour(rng), rgb2=_light_colour(rng),
                      period=rng.randint(6, 24), noise=noise, seed=rng.getrandbits(32))


def sample_text(rng: random.Random, spec: SceneSpec) -> tuple[str, str, int]:
    """(text, lang, font_px): an English word (random case), a 1-4 digit number or a Chinese word."""
    lang = rng.choice(spec.text_langs)
    if lang == "en":
        word = rng.choice(EN_WORDS)
        text = rng.choice((word, word, word.capitalize(), word.upper()))
    elif lang == "zh":
        text = rng.choice(ZH_WORDS)
    else:
        text = str(rng.randint(0, 10 ** rng.randint(1, 4) - 1))
    font_px = max(MIN_FONT_PX, round(rng.choice(spec.text_sizes) * min(spec.width, spec.height)))
    return text, lang, font_px


def _free(box: BBox, zone: np.ndarray) -> bool:
    x1, y1, x2, y2 = box
    return not zone[y1:y2, x1:x2].any()


def _place_texts(rng: random.Random, spec: SceneSpec, n: int) -> list[TextItem]:
    zone = np.zeros((spec.height, spec.width), dtype=bool)  # taken by a text, plus a margin
    items: list[TextItem] = []
    for _ in range(n):
        text, lang, font_px = sample_text(rng, spec)
        ink = text_mask(text, font_px)
        h, w = ink.shape
        if w + 4 > spec.width or h + 4 > spec.height:
            continue
        for _try in range(20):
            x, y = rng.randint(2, spec.width - w - 2), rng.randint(2, spec.height - h - 2)
            if _free((x, y, x + w, y + h), zone):
                zone[max(0, y - 3):y + h + 3, max(0, x - 3):x + w + 3] = True
                items.append(TextItem(text, lang, font_px, rng.choice(TEXT_COLOURS), (x, y, x + w, y + h)))
                break
    return items


@functools.lru_cache(maxsize=4096)
def _local_bbox(kind: str, side: int) -> BBox:
    return _tight(shape_mask(kind, side))


def _overlap(a: tuple[int, int, int], b: tuple[int, int, int]) -> tuple[slice, slice, slice, slice] | None:
    """Where squares (x, y, side) a and b intersect: (rows, cols) in a's frame, then in b's frame."""
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[0] + a[2], b[0] + b[2]), min(a[1] + a[2], b[1] + b[2])
    if x1 >= x2 or y1 >= y2:
        return None
    return (slice(y1 - a[1], y2 - a[1]), slice(x1 - a[0], x2 - a[0]),
            slice(y1 - b[1], y2 - b[1]), slice(x1 - b[0], x2 - b[0]))


def _place_shapes(rng: random.Random, spec: SceneSpec, n: int, keep_out: np.ndarray) -> list[Shape]:
    """Shapes in drawing order; each new one may cover at most `max_occlusion` of any earlier one.

    Occlusion is tracked per shape in its own side x side frame (`covered[i]`), so a placement
    test only touches the squares it overlaps.
    """
    shapes: list[Shape] = []
    covered: list[np.ndarray] = []
    short = min(spec.width, spec.height)
    for _ in range(n):
        kind, colour, size = rng.choice(spec.kinds), rng.choice(spec.colours), rng.choice(spec.sizes)
        lo, hi = SIZES[size]
        side = max(4, round(rng.uniform(lo, hi) * short))
        local, mask = _local_bbox(kind, side), shape_mask(kind, side)
        rgb = _jitter(COLOURS[colour][0], rng, spec.colour_jitter)
        for _try in range(30):
            x, y = rng.randint(2, spec.width - side - 2), rng.randint(2, spec.height - side - 2)
            bbox = (x + local[0], y + local[1], x + local[2], y + local[3])
            if _free(bbox, keep_out):
                updates = _occlusion_updates(shapes, covered, (x, y, side), mask, spec.max_occlusion)
                if updates is not None:
                    for i, new in updates:
                        covered[i] = new
                    covered.append(np.zeros_like(mask))
                    shapes.append(Shape(kind, colour, size, rgb, x, y, side, bbox, 1.0))
                    break
    return [dataclasses.replace(s, visible=_visible(shape_mask(s.kind, s.side).sum(), c.sum())) for s, c in zip(shapes, covered)]


def _visible(area: int, hidden: int) -> float:
    """Fraction of a shape left visible, rounded to 4 decimals, e.g. _visible(1600, 282) == 0.8238."""
    return round(int(area - hidden) / int(area), 4)


def _occlusion_updates(shapes: list[Shape], covered: list[np.ndarray], square: tuple[int, int, int],
                       mask: np.ndarray, max_occlusion: float) -> list[tuple[int, np.ndarray]] | None:
    """New `covered` arrays if a shape with `mask` goes on top at `square`, or None if it hides too much."""
    updates = []
    for i, s in enumerate(shapes):
        ov = _overlap((s.x, s.y, s.side), square)
        if ov is None:
            continue
        ra, ca, rb, cb = ov
        own = shape_mask(s.kind, s.side)
        hit = own[ra, ca] & mask[rb, cb]
        if not hit.any():
            continue
        if max_occlusion == 0:
            return None
        new = covered[i].copy()
        new[ra, ca] |= hit
        if new.sum() > max_occlusion * own.sum():
            return None
        updates.append((i, new))
    return updates


def sample_scene(rng: random.Random, spec: SceneSpec = SceneSpec()) -> Scene:
    """Draw a scene from `rng` (advancing it). Pure: same rng state and spec -> same Scene.

    Example: sample_scene(random.Random(0), SceneSpec(n_objects=(1, 1), n_texts=(0, 0))) has exactly
    one shape (a 1-object canvas never fails placement) and no text.
    """
    background = sample_background(rng, spec)
    texts = _place_texts(rng, spec, rng.randint(*spec.n_texts))
    keep_out = np.zeros((spec.height, spec.width), dtype=bool)
    for t in texts:
        x1, y1, x2, y2 = t.bbox
        keep_out[max(0, y1 - 2):y2 + 2, max(0, x1 - 2):x2 + 2] = True
    shapes = _place_shapes(rng, spec, rng.randint(*spec.n_objects), keep_out)
    return Scene(spec.width, spec.height, background, tuple(shapes), tuple(texts))


def with_objects(scene: Scene, objects: list[Shape] | tuple[Shape, ...]) -> Scene:
    """The same scene with another list of shapes; recomputes how visible each one is.

    Used to make "spot the difference" pairs (recolour, remove or add one shape).
    """
    masks = [object_mask(o, scene.width, scene.height) for o in objects]
    out = []
    for i, (o, m) in enumerate(zip(objects, masks)):
        above = np.zeros_like(m)
        for later in masks[i + 1:]:
            above |= later
        out.append(dataclasses.replace(o, visible=_visible(m.sum(), (m & above).sum())))
    return dataclasses.replace(scene, objects=tuple(out))


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------

def render_background(bg: Background, width: int, height: int) -> np.ndarray:
    """uint8 [height, width, 3] pixels of a background; a pure function of its fields."""
    rng = np.random.default_rng(bg.seed)
    c1, c2 = np.array(bg.rgb, np.float32), np.array(bg.rgb2, np.float32)
    yy = np.arange(height, dtype=np.float32)[:, None]   # [H, 1]
    xx = np.arange(width, dtype=np.float32)[None, :]    # [1, W]
    if bg.kind == "gradient":
        t = xx / max(1, width - 1) * 0.5 + yy / max(1, height - 1) * 0.5
    elif bg.kind == "stripes":
        t = (((xx + yy) if bg.seed % 2 else yy + 0 * xx) // (bg.period / 2)) % 2
    elif bg.kind == "checker":
        t = ((xx // bg.period) + (yy // bg.period)) % 2
    elif bg.kind == "clouds":
        low = rng.uniform(-1, 1, size=(6, 6)).astype(np.float32)
        t = np.clip(np.asarray(Image.fromarray(low, mode="F").resize((width, height), Image.BICUBIC)) * 0.5 + 0.5, 0, 1)
    elif bg.kind in ("plain", "noise"):
        t = np.zeros((height, width), np.float32)
    else:
        raise ValueError(f"unknown background kind {bg.kind!r}; known: {sorted(BACKGROUNDS)}")
    img = c1 + (c2 - c1) * t[..., None]                  # [H, W, 3]
    if bg.noise:  # grey noise: the same offset on all three channels
        img += rng.standard_normal((height, width, 1), dtype=np.float32) * bg.noise
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=4096)
def _mask_image(kind: str, side: int) -> Image.Image:
    return Image.fromarray(shape_mask(kind, side).astype(np.uint8) * 255, mode="L")


def render_scene(scene: Scene) -> Image.Image:
    """RGB image of `scene`: background, then texts, then shapes in order (later ones on top)."""
    img = Image.fromarray(render_background(scene.background, scene.width, scene.height), mode="RGB")
    for t in scene.texts:
        ink = Image.fromarray(text_mask(t.text, t.font_px), mode="L")
        img.paste(t.rgb, t.bbox, ink)
    for o in scene.objects:
        img.paste(o.rgb, (o.x, o.y, o.x + o.side, o.y + o.side), _mask_image(o.kind, o.side))
    return img
