"""VQA tasks of the synthetic world: colour, shape, count, position, relation, yes/no (en and zh).

Each is a pure `task(scenes, rng, lang) -> TaskResult` with fields {question, answer}; answers are
short (a word, a digit, yes/no or 是/不是/有/没有) so the standard VQA accuracy applies.
"""
from __future__ import annotations

import random

from qwenvl.synthetic_refs import (PAIR_MARGIN, SIDE_MARGIN, Ref, TaskResult, matching, pick, referable,
                                   yes_no)
from qwenvl.synthetic_scenes import Scene
from qwenvl.synthetic_world import COLOURS, SHAPES, colour_name, object_phrase, shape_name


def _vqa(task: str, scene: Scene, lang: str, q: str, a: str, objects: list[int]) -> TaskResult:
    """fields: question, answer, and `objects`: the indices of the shapes the answer depends on (training aids may
    point the model at them; e.g. both shapes of a relation, every counted one, none for an absent kind)."""
    return TaskResult(task, lang, (scene,), [(q, a)], {"question": q, "answer": a, "objects": objects})


def vqa_colour(scenes: tuple[Scene, ...], rng: random.Random, lang: str) -> TaskResult:
    """'What colour is the circle?' -> 'red' / '圆形是什么颜色的？' -> '红色' (shape[+size] unique)."""
    scene = scenes[0]
    options = []
    for i, o in enumerate(scene.objects):
        for ref in (Ref(None, o.kind), Ref(None, o.kind, size=o.size)):
            if matching(scene, ref) == [i]:
                options.append((i, ref))
                break
    i, ref = pick(rng, options, "no object unique by shape")
    what = ref.say(lang)
    q = rng.choice((f"What colour is {what}?", f"What is the colour of {what}?") if lang == "en" else
                   (f"{what}是什么颜色的？", f"图中的{what}是什么颜色？"))
    return _vqa("vqa_colour", scene, lang, q, colour_name(scene.objects[i].colour, lang), [i])


def vqa_shape(scenes: tuple[Scene, ...], rng: random.Random, lang: str) -> TaskResult:
    """'What shape is the red object?' -> 'circle' / '红色的图形是什么形状？' -> '圆形' (colour unique)."""
    scene = scenes[0]
    options = [i for i, o in enumerate(scene.objects) if matching(scene, Ref(o.colour, None)) == [i]]
    i = pick(rng, options, "no object unique by colour")
    o = scene.objects[i]
    if lang == "en":
        c = colour_name(o.colour, "en")
        q = rng.choice((f"What shape is the {c} object?", f"What is the shape of the {c} object?"))
    else:
        q = rng.choice((f"{colour_name(o.colour, 'zh')}的图形是什么形状？", f"图中{colour_name(o.colour, 'zh')}的是什么形状？"))
    return _vqa("vqa_shape", scene, lang, q, shape_name(o.kind, lang), [i])


def vqa_count(scenes: tuple[Scene, ...], rng: random.Random, lang: str) -> TaskResult:
    """'How many triangles are there?' -> '2' / '图中有几个三角形？' -> '2' (also by colour, or all)."""
    scene = scenes[0]
    mode = rng.choices(("kind", "colour", "all"), weights=(6, 3, 2))[0]
    present_kinds = sorted({o.kind for o in scene.objects}) or list(SHAPES)
    present_colours = sorted({o.colour for o in scene.objects}) or list(COLOURS)
    if mode == "kind":
        kind = rng.choice(present_kinds if rng.random() < 0.8 else list(SHAPES))
        counted = [i for i, o in enumerate(scene.objects) if o.kind == kind]
        q = rng.choice((f"How many {shape_name(kind, 'en', True)} are there?",
                        f"How many {shape_name(kind, 'en', True)} are in the image?") if lang == "en" else
                       (f"图中有几个{shape_name(kind, 'zh')}？", f"{shape_name(kind, 'zh')}一共有几个？"))
    elif mode == "colour":
        colour = rng.choice(present_colours if rng.random() < 0.8 else list(COLOURS))
        counted = [i for i, o in enumerate(scene.objects) if o.colour == colour]
        q = (f"How many {colour_name(colour, 'en')} shapes are there?" if lang == "en" else
             f"图中有几个{colour_name(colour, 'zh')}的图形？")
    else:
        counted = list(range(len(scene.objects)))
        q = "How many shapes are there in total?" if lang == "en" else "图中一共有几个图形？"
    return _vqa("vqa_count", scene, lang, q, str(len(counted)), counted)


def vqa_position(scenes: tuple[Scene, ...], rng: random.Random, lang: str) -> TaskResult:
    """'Is the red circle on the left or the right of the image?' -> 'left' / '…在图片的左边还是右边？' -> '左边'."""
    scene = scenes[0]
    options = []
    for i, ref in referable(scene, allow_position=False):
        cx, cy = scene.objects[i].center
        if abs(cx / scene.width - 0.5) >= SIDE_MARGIN:
            options.append((i, ref, "h", "left" if cx < scene.width / 2 else "right"))
        if abs(cy / scene.height - 0.5) >= SIDE_MARGIN:
            options.append((i, ref, "v", "top" if cy < scene.height / 2 else "bottom"))
    i, ref, axis, side = pick(rng, options, "no describable object clearly off-centre")
    r = ref.say(lang)
    if lang == "en":
        q = (f"Is {r} on the left or the right of the image?" if axis == "h" else
             f"Is {r} at the top or the bottom of the image?")
        return _vqa("vqa_position", scene, lang, q, side, [i])
    q = f"{r}在图片的左边还是右边？" if axis == "h" else f"{r}在图片的上方还是下方？"
    return _vqa("vqa_position", scene, lang, q, {"left": "左边", "right": "右边", "top": "上方", "bottom": "下方"}[side],
                [i])


_REL_EN = {"left": "to the left of", "right": "to the right of", "top": "above", "bottom": "below"}
_REL_ZH = {"left": "左边", "right": "右边", "top": "上面", "bottom": "下面"}
_OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}


def _pairs(scene: Scene) -> list[tuple[Ref, Ref, str, tuple[int, int]]]:
    """(a, b, where a is relative to b, their indices) for describable pairs clearly apart on some axis."""
    refs = referable(scene, allow_position=False)
    out = []
    for i, ra in refs:
        for j, rb in refs:
            if i == j:
                continue
            (ax, ay), (bx, by) = scene.objects[i].center, scene.objects[j].center
            if bx - ax >= PAIR_MARGIN * scene.width:
                out.append((ra, rb, "left", (i, j)))
            if by - ay >= PAIR_MARGIN * scene.height:
                out.append((ra, rb, "top", (i, j)))
    return out


def vqa_relation(scenes: tuple[Scene, ...], rng: random.Random, lang: str) -> TaskResult:
    """'Is the red circle to the left of the blue square?' -> 'yes'; 'Which is higher, A or B?' -> 'the …'.
    Chinese: '红色的圆形在蓝色的正方形的左边吗？' -> '是'; '…和…，哪个更靠左？' -> '红色的圆形'."""
    scene = scenes[0]
    a, b, rel, pair = pick(rng, _pairs(scene), "no describable pair clearly apart")
    if rng.random() < 0.5:  # a first is (a rel b): swap to (b opposite a) half the time
        a, b, rel = b, a, _OPPOSITE[rel]
    sa, sb = a.say(lang), b.say(lang)
    if rng.random() < 0.5:
        truth = rng.random() < 0.5
        asked = rel if truth else _OPPOSITE[rel]
        q = f"Is {sa} {_REL_EN[asked]} {sb}?" if lang == "en" else f"{sa}在{sb}的{_REL_ZH[asked]}吗？"
        return _vqa("vqa_relation", scene, lang, q, yes_no(truth, lang), sorted(pair))
    first, second = (sa, sb) if rng.random() < 0.5 else (sb, sa)
    if lang == "en":
        word = {"left": "further left", "right": "further right", "top": "higher", "bottom": "lower"}[rel]
        q = f"Which is {word}, {first} or {second}?"
    else:
        word = {"left": "靠左", "right": "靠右", "top": "靠上", "bottom": "靠下"}[rel]
        q = f"{first}和{second}，哪个更{word}？"
    return _vqa("vqa_relation", scene, lang, q, sa, sorted(pair))


def vqa_yesno(scenes: tuple[Scene, ...], rng: random.Random, lang: str) -> TaskResult:
    """'Is there a green star in the image?' -> 'no' / '图中有绿色的五角星吗？' -> '没有' (balanced)."""
    scene = scenes[0]
    present = {(o.colour, o.kind) for o in scene.objects}
    if rng.random() < 0.5 and present:
        colour, kind = rng.choice(sorted(present))
    else:
        colour, kind = rng.choice(list(COLOURS)), rng.choice(list(SHAPES))
    if rng.random() < 0.3:
        colour = None
    seen = [i for i, o in enumerate(scene.objects) if colour in (None, o.colour) and o.kind == kind]
    truth = bool(seen)
    if lang == "en":
        q = (f"Is there {object_phrase(colour, kind, 'en', article='a')} in the image?"
             if colour else f"Are there any {shape_name(kind, 'en', True)} in the image?")
        return _vqa("vqa_yesno", scene, lang, q, yes_no(truth, "en"), seen)
    q = f"图中有{object_phrase(colour, kind, 'zh')}吗？"
    return _vqa("vqa_yesno", scene, lang, q, yes_no(truth, "zh", "有", "没有"), seen)
