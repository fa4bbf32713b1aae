"""Dense per-patch labels of a synthetic scene, for pretraining the ViT before it meets the LM.

The paper starts from a pretrained CLIP ViT; our stand-in teaches the ViT what is under each patch:
the colour and the kind of the topmost shape, or the character of rendered text, or background.
Dense targets give hundreds of supervised outputs per image, so the tower learns in minutes.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor

from .fonts import load_font
from .synthetic_scenes import Scene, object_mask
from .synthetic_world import COLOURS, EN_WORDS, SHAPES, ZH_WORDS

BACKGROUND, TEXT = 0, 1
COLOUR_IDS = {name: i + 2 for i, name in enumerate(COLOURS)}    # 0 background, 1 text
SHAPE_IDS = {name: i + 2 for i, name in enumerate(SHAPES)}


@functools.lru_cache(maxsize=1)
def char_vocab() -> dict[str, int]:
    """Every character rendered text can hold -> id (0 = no character under the patch)."""
    chars = set("0123456789")
    for word in EN_WORDS:
        chars |= set(word) | set(word.upper())
    for word in ZH_WORDS:
        chars |= set(word)
    return {c: i + 1 for i, c in enumerate(sorted(chars))}


def n_classes() -> tuple[int, int, int]:
    """(colour classes, shape classes, character classes)."""
    return len(COLOURS) + 2, len(SHAPES) + 2, len(char_vocab()) + 1


def patch_labels(scene: Scene, grid: int) -> tuple[Tensor, Tensor, Tensor]:
    """Labels of the grid x grid patch centres, row-major: colour [g*g], shape [g*g], char [g*g].

    Example: a scene whose only content is a red circle covering the centre of patch (row 1, col 2)
    gives colour[1*g+2] = COLOUR_IDS["red"], shape = SHAPE_IDS["circle"], char = 0.
    """
    ys = ((np.arange(grid) + 0.5) * scene.height / grid).astype(int)
    xs = ((np.arange(grid) + 0.5) * scene.width / grid).astype(int)
    colour = np.zeros((grid, grid), dtype=np.int64)
    shape = np.zeros((grid, grid), dtype=np.int64)
    char = np.zeros((grid, grid), dtype=np.int64)
    for text in scene.texts:
        _label_text(text, xs, ys, colour, shape, char)
    for obj in scene.objects:                      # drawing order: later shapes overwrite earlier ones
        hit = object_mask(obj, scene.width, scene.height)[np.ix_(ys, xs)]
        colour[hit], shape[hit], char[hit] = COLOUR_IDS[obj.colour], SHAPE_IDS[obj.kind], 0
    return (torch.from_numpy(colour.reshape(-1)), torch.from_numpy(shape.reshape(-1)),
            torch.from_numpy(char.reshape(-1)))


def _label_text(text, xs: np.ndarray, ys: np.ndarray, colour: np.ndarray, shape: np.ndarray,
                char: np.ndarray) -> None:
    x1, y1, x2, y2 = text.bbox
    rows = np.nonzero((ys >= y1) & (ys < y2))[0]
    cols = np.nonzero((xs >= x1) & (xs < x2))[0]
    if not len(rows) or not len(cols):
        return
    edges = _char_edges(text.text, text.font_px, x1, x2)
    vocab = char_vocab()
    for c in cols:
        k = min(int(np.searchsorted(edges, xs[c], side="right")) - 1, len(text.text) - 1)
        colour[rows, c], shape[rows, c] = TEXT, TEXT
        char[rows, c] = vocab.get(text.text[max(k, 0)], 0)


def _char_edges(text: str, font_px: int, x1: int, x2: int) -> np.ndarray:
    """Left x of each character, spreading the font's advance widths over the ink box [x1, x2)."""
    font = load_font(font_px)
    widths = np.array([font.getlength(text[:i]) for i in range(len(text) + 1)], dtype=np.float64)
    return x1 + (x2 - x1) * widths[:-1] / max(widths[-1], 1e-6)
