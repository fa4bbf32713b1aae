"""The ViT pretraining's per-patch labels (qwenvl/patch_labels.py) on a hand-built scene.

112 x 112 px, grid 4: patch centres at 14, 42, 70, 98 px. A red square over pixels [10, 50) covers the centres of
patches (0,0), (0,1), (1,0), (1,1); a blue square drawn after it over [30, 70) covers (1,1) alone and so owns it;
the text "AB" with ink box (56, 84)-(112, 112) covers (3,2) with 'A' and (3,3) with 'B'.
"""
import torch

from qwenvl.patch_labels import BACKGROUND, COLOUR_IDS, SHAPE_IDS, TEXT, char_vocab, n_classes, patch_labels
from qwenvl.synthetic_scenes import Background, Scene, Shape, TextItem
from qwenvl.synthetic_world import COLOURS, SHAPES


def _square(colour: str, x: int, side: int) -> Shape:
    return Shape("square", colour, "medium", (0, 0, 0), x, x, side, (x, x, x + side, x + side), 1.0)


SCENE = Scene(112, 112, Background("plain", (255, 255, 255), (255, 255, 255), 8, 0, 0),
              (_square("red", 10, 40), _square("blue", 30, 40)), (TextItem("AB", "en", 20, (0, 0, 0), (56, 84, 112, 112)),))


def test_each_patch_gets_the_topmost_thing_under_its_centre():
    colour, shape, char = (t.view(4, 4) for t in patch_labels(SCENE, 4))
    red, blue, square = COLOUR_IDS["red"], COLOUR_IDS["blue"], SHAPE_IDS["square"]
    assert colour[:2, :2].tolist() == [[red, red], [red, blue]]             # the later square owns (1, 1)
    assert (shape[:2, :2] == square).all() and (char[:2, :2] == 0).all()
    assert colour[3, 2:].tolist() == [TEXT, TEXT] and shape[3, 2:].tolist() == [TEXT, TEXT]
    assert char[3, 2:].tolist() == [char_vocab()["A"], char_vocab()["B"]]
    rest = torch.ones(4, 4, dtype=torch.bool)
    rest[:2, :2] = False
    rest[3, 2:] = False
    assert (colour[rest] == BACKGROUND).all() and (shape[rest] == BACKGROUND).all() and (char[rest] == 0).all()


def test_label_ids_fit_the_head_sizes():
    n_colour, n_shape, n_char = n_classes()
    assert n_colour == len(COLOURS) + 2 and n_shape == len(SHAPES) + 2
    assert max(COLOUR_IDS.values()) < n_colour and max(SHAPE_IDS.values()) < n_shape
    assert max(char_vocab().values()) < n_char and {"A", "7", "猫"} <= set(char_vocab())
