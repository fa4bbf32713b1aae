"""Shared parts of the synthetic tasks: results, and unique referring expressions.

A referring expression is a `Ref` (colour, kind, optional size or position). `refer` gives the
shortest one that picks out exactly one object of a scene; `matching` reads a Ref back. Tasks only
ever ask about objects `refer` can name, which is what makes their answers unambiguous.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from qwenvl.synthetic_scenes import Scene
from qwenvl.synthetic_world import object_phrase

Turn = tuple[str, str]  # (user, assistant)
SIDE_MARGIN = 0.15      # |centre/extent - 0.5| needed to call something "left"/"top"
PAIR_MARGIN = 0.12      # centre distance (fraction of the extent) needed for "left of"/"above"


class NotApplicable(ValueError):
    """This scene cannot support this task (e.g. no uniquely describable object)."""


@dataclass
class TaskResult:
    task: str
    lang: str
    scenes: tuple[Scene, ...]
    turns: list[Turn]
    fields: dict = field(default_factory=dict)  # what the eval writers need


def yes_no(flag: bool, lang: str, zh_yes: str = "是", zh_no: str = "不是") -> str:
    return ("yes" if flag else "no") if lang == "en" else (zh_yes if flag else zh_no)


def capitalise(s: str) -> str:
    return s[:1].upper() + s[1:]


# ---------------------------------------------------------------------------------------------
# Referring expressions
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Ref:
    """A description: colour and/or kind, optionally a size or a position among look-alikes."""
    colour: str | None
    kind: str | None
    size: str | None = None
    position: str | None = None  # left/right/top/bottom: the extreme one among colour+kind matches

    def say(self, lang: str, article: str = "the") -> str:
        return object_phrase(self.colour, self.kind, lang, size=self.size, position=self.position,
                             article=article)


_EXTREME = {"left": (0, min), "right": (0, max), "top": (1, min), "bottom": (1, max)}


def matching(scene: Scene, ref: Ref) -> list[int]:
    """Indices of the objects `ref` describes. A position picks the extreme look-alike, and only
    when it is clear: at least PAIR_MARGIN of the canvas ahead of the next one."""
    idx = [i for i, o in enumerate(scene.objects)
           if ref.colour in (None, o.colour) and ref.kind in (None, o.kind) and ref.size in (None, o.size)]
    if ref.position is None or len(idx) < 2:
        return idx if ref.position is None else []
    axis, pick = _EXTREME[ref.position]
    extent = (scene.width, scene.height)[axis]
    coords = sorted(scene.objects[i].center[axis] for i in idx)
    best = pick(idx, key=lambda i: scene.objects[i].center[axis])
    gap = coords[1] - coords[0] if pick is min else coords[-1] - coords[-2]
    return [best] if gap >= PAIR_MARGIN * extent else []


def refer(scene: Scene, i: int, *, allow_position: bool = True) -> Ref | None:
    """The shortest unique description of object i (colour+kind, then +size, then +position).

    e.g. with one red circle: Ref("red", "circle"); with a large and a small one: Ref("red",
    "circle", size="large"); with two that only differ in place: Ref("red", "circle", position="left").
    """
    o = scene.objects[i]
    candidates = [Ref(o.colour, o.kind), Ref(o.colour, o.kind, size=o.size)]
    if allow_position:
        candidates += [Ref(o.colour, o.kind, position=p) for p in _EXTREME]
    for ref in candidates:
        if matching(scene, ref) == [i]:
            return ref
    return None


def referable(scene: Scene, allow_position: bool = True) -> list[tuple[int, Ref]]:
    out = [(i, refer(scene, i, allow_position=allow_position)) for i in range(len(scene.objects))]
    return [(i, r) for i, r in out if r is not None]


def pick(rng: random.Random, items: list, what: str):
    if not items:
        raise NotApplicable(what)
    return rng.choice(items)
