"""Tasks of the synthetic world: questions and answers about scenes, in English and Chinese.

Each task is a pure function `task(scenes, rng, lang) -> TaskResult`: the conversation turns (user
text *without* the `Picture k: <img>…</img>` prefix, which `make_sample` adds) and the fields the
evaluation files need (question/answer, sent/bbox, captions). A task raises `NotApplicable` when
the scene cannot support it (nothing unique to refer to, no text to read); `build_task` then
samples another scene.

Boxes in answers use `box_text` (see `synthetic_scenes.to_1000` for the exact rounding rule).
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Callable

from qwenvl.synthetic_refs import NotApplicable, Ref, TaskResult, Turn, capitalise, matching, pick, referable
from qwenvl.synthetic_scenes import Scene, SceneSpec, Shape, box_text, sample_scene, with_objects
from qwenvl.synthetic_vqa import vqa_colour, vqa_count, vqa_position, vqa_relation, vqa_shape, vqa_yesno
from qwenvl.synthetic_world import (
    BACKGROUNDS, COLOURS, EN_WORDS, SHAPES, ZH_WORDS, colour_name, counted_phrase, en_count, join_list,
    object_phrase, picture_name, shape_name, text_phrase, zh_number,
)


# ---------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------

def _groups(scene: Scene) -> list[list[Shape]]:
    """Objects grouped by (colour, kind), groups ordered by their leftmost member."""
    groups: dict[tuple[str, str], list[Shape]] = {}
    for o in sorted(scene.objects, key=lambda o: (o.center[0], o.center[1])):
        groups.setdefault((o.colour, o.kind), []).append(o)
    return list(groups.values())


def _group_phrase(g: list[Shape], lang: str) -> str:
    return counted_phrase(len(g), g[0].colour, g[0].kind, lang, size=g[0].size if len(g) == 1 else None)


def _reading_order(scene: Scene) -> list:
    band = max(1, scene.height // 8)
    return sorted(scene.texts, key=lambda t: (t.bbox[1] // band, t.bbox[0]))


EN_CAPTIONS = ("{objs} on a {bg} background.", "A {bg} background with {objs}.",
               "There {be} {objs} in the picture.", "The image shows {objs} on a {bg} background.")
ZH_CAPTIONS = ("{bg}背景上有{objs}。", "在{bg}背景上，有{objs}。", "这张图片里有{objs}。", "画面中是{objs}，用的是{bg}背景。")


def caption_text(scene: Scene, lang: str, template: int) -> str:
    """A caption from one of 4 templates; objects left to right, same-looking ones counted.

    e.g. 'A striped background with a large red circle and two blue squares. It also shows the
    word "cat".' / '条纹背景上有一个红色的大圆形和两个蓝色的正方形。图中还写着“猫”。'
    """
    groups = _groups(scene)
    texts = _reading_order(scene)
    bg_en, bg_zh = BACKGROUNDS[scene.background.kind]
    if lang == "en":
        if groups:
            objs = join_list([_group_phrase(g, "en") for g in groups], "en")
            be = "is" if len(groups[0]) == 1 else "are"
            out = capitalise(EN_CAPTIONS[template % 4].format(objs=objs, bg=bg_en, be=be))
        else:
            out = f"An empty {bg_en} background."
        if texts:
            out += " It also shows " + join_list([text_phrase(t.text, t.lang, "en") for t in texts], "en") + "."
        return out
    if groups:
        objs = join_list([_group_phrase(g, "zh") for g in groups], "zh")
        out = ZH_CAPTIONS[template % 4].format(objs=objs, bg=bg_zh)
    else:
        out = f"一张{bg_zh}背景的空白图片。"
    if texts:
        out += "图中还写着" + join_list([f"“{t.text}”" for t in texts], "zh") + "。"
    return out


CAPTION_PROMPTS = {
    "en": ("Describe the image in English:", "Generate the caption in English:", "What is in this picture?",
           "Describe this image briefly."),
    "zh": ("用中文描述这张图片：", "生成中文描述：", "这张图片里有什么？", "请简要描述这张图片。"),
}


def caption(scenes: tuple[Scene, ...], rng: random.Random, lang: str) -> TaskResult:
    """Caption one image. fields: question, answer, captions (all 4 templates, for CIDEr refs)."""
    scene = scenes[0]
    q = rng.choice(CAPTION_PROMPTS[lang])
    a = caption_text(scene, lang, rng.randrange(4))
    refs = [caption_text(scene, lang, k) for k in range(4)]
    return TaskResult("caption", lang, (scene,), [(q, a)], {"question": q, "answer": a, "captions": refs})


GROUNDED_PROMPTS = {"en": "Generate the caption in English with grounding:", "zh": "生成带定位框的中文描述："}


def grounded_caption(scenes: tuple[Scene, ...], rng: random.Random, lang: str) -> TaskResult:
    """e.g. 'The picture shows <ref>a red circle</ref><box>(..),(..)</box> and <ref>the word
    "cat"</ref><box>…</box> on a plain background.' One box per object after its group's ref."""
    scene = scenes[0]
    W, H = scene.width, scene.height
    items = [f"<ref>{_group_phrase(g, lang)}</ref>" + "".join(box_text(o.bbox, W, H) for o in g)
             for g in _groups(scene)]
    items += [f"<ref>{text_phrase(t.text, t.lang, lang)}</ref>{box_text(t.bbox, W, H)}" for t in _reading_order(scene)]
    if not items:
        raise NotApplicable("grounded caption of an empty scene")
    bg_en, bg_zh = BACKGROUNDS[scene.background.kind]
    if lang == "en":
        a = f"The picture shows {join_list(items, 'en')} on a {bg_en} background."
    else:
        a = f"{bg_zh}背景上有{join_list(items, 'zh')}。"
    q = GROUNDED_PROMPTS[lang]
    return TaskResult("grounded_caption", lang, (scene,), [(q, a)], {"question": q, "answer": a})


# ---------------------------------------------------------------------------------------------
# Referring grounding
# ---------------------------------------------------------------------------------------------

GROUNDING_PROMPTS = {
    "en": ("<ref>{r}</ref>", "Find {r}.", "Where is {r}? Answer with its box.", "Give the bounding box of {r}.",
           "Locate {r} in the image."),
    "zh": ("<ref>{r}</ref>", "框出图中{r}的位置", "{r}在哪里？请给出它的框。", "输出“{r}”的检测框"),
}


def grounding(scenes: tuple[Scene, ...], rng: random.Random, lang: str) -> TaskResult:
    """Referring grounding of a uniquely described object.

    The `<ref>{r}</ref>` prompt is answered by the bare box (so user+assistant concatenated is the
    eval prompt `<ref>sent</ref><box>` continued); instruction prompts are answered
    `<ref>{r}</ref><box>…</box>`. fields: sent, bbox (pixels), width, height.
    """
    scene = scenes[0]
    i, ref = pick(rng, referable(scene), "no uniquely describable object")
    sent = ref.say(lang)
    box = box_text(scene.objects[i].bbox, scene.width, scene.height)
    prompt = rng.choice(GROUNDING_PROMPTS[lang])
    answer = box if prompt.startswith("<ref>") else f"<ref>{sent}</ref>{box}"
    return TaskResult("grounding", lang, (scene,), [(prompt.format(r=sent), answer)],
                      {"sent": sent, "bbox": list(scene.objects[i].bbox), "width": scene.width,
                       "height": scene.height, "objects": [i]})


# ---------------------------------------------------------------------------------------------
# OCR
# ---------------------------------------------------------------------------------------------

def _texts_field(scene: Scene) -> list[dict]:
    return [{"text": t.text, "lang": t.lang, "bbox": list(t.bbox)} for t in _reading_order(scene)]


def ocr(scenes: tuple[Scene, ...], rng: random.Random, lang: str) -> TaskResult:
    """Read the text; several pieces are read top to bottom, left to right, joined by spaces."""
    scene = scenes[0]
    texts = _reading_order(scene)
    if not texts:
        raise NotApplicable("no text to read")
    if len(texts) == 1:
        q = rng.choice(("What is written in the image?", "What does the text say?", "Read the text in the image.")
                       if lang == "en" else ("图中写了什么？", "图片上的文字是什么？", "请读出图中的文字。"))
    else:
        q = ("Read all the text in the image, from top to bottom." if lang == "en" else "请从上到下读出图中所有的文字。")
    a = " ".join(t.text for t in texts)
    return TaskResult("ocr", lang, (scene,), [(q, a)], {"question": q, "answer": a, "texts": _texts_field(scene)})


def ocr_box(scenes: tuple[Scene, ...], rng: random.Random, lang: str) -> TaskResult:
    """Text with its box: all pieces ('<ref>cat</ref><box>…</box>' per line) or one asked-for word."""
    scene = scenes[0]
    texts = _reading_order(scene)
    if not texts:
        raise NotApplicable("no text to locate")
    W, H = scene.width, scene.height
    counts = Counter(t.text for t in texts)
    unique = [t for t in texts if counts[t.text] == 1]
    if unique and rng.random() < 0.5:
        t = rng.choice(unique)
        q = f'Where is the text "{t.text}"?' if lang == "en" else f"“{t.text}”在图中的什么位置？"
        a = f"<ref>{t.text}</ref>{box_text(t.bbox, W, H)}"
    else:
        q = ("Read the text in the image and give the box of each piece." if lang == "en" else
             "识别图中的文字，并给出每段文字的位置。")
        a = "\n".join(f"<ref>{t.text}</ref>{box_text(t.bbox, W, H)}" for t in texts)
    return TaskResult("ocr_box", lang, (scene,), [(q, a)], {"question": q, "answer": a, "texts": _texts_field(scene)})


# ---------------------------------------------------------------------------------------------
# Several images
# ---------------------------------------------------------------------------------------------

def _multi_more(scenes, rng, lang) -> tuple[str, str]:
    kinds = sorted({o.kind for s in scenes for o in s.objects})
    counts = {k: [sum(o.kind == k for o in s.objects) for s in scenes] for k in kinds}
    options = [k for k, c in counts.items() if c.count(max(c)) == 1]
    kind = pick(rng, options, "no shape with a unique maximum count")
    best = counts[kind].index(max(counts[kind])) + 1
    q = (f"Which picture has more {shape_name(kind, 'en', True)}?" if lang == "en" else
         f"哪张图片里的{shape_name(kind, 'zh')}更多？")
    return q, picture_name(best, lang)


def _multi_total(scenes, rng, lang) -> tuple[str, str]:
    kind = rng.choice(sorted({o.kind for s in scenes for o in s.objects}) or list(SHAPES))
    n = sum(o.kind == kind for s in scenes for o in s.objects)
    q = (f"How many {shape_name(kind, 'en', True)} are there in all the pictures together?" if lang == "en" else
         f"这几张图片里一共有几个{shape_name(kind, 'zh')}？")
    return q, str(n)


def _multi_which(scenes, rng, lang) -> tuple[str, str]:
    has = Counter(look for s in scenes for look in {(o.colour, o.kind) for o in s.objects})
    options = sorted(k for k, n in has.items() if n == 1)
    colour, kind = pick(rng, options, "no look that is in exactly one picture")
    k = next(i for i, s in enumerate(scenes) if any((o.colour, o.kind) == (colour, kind) for o in s.objects)) + 1
    q = (f"Which picture has {object_phrase(colour, kind, 'en', article='a')}?"
         if lang == "en" else f"哪张图片里有{object_phrase(colour, kind, 'zh')}？")
    return q, picture_name(k, lang)


def _multi_diff(scene: Scene, rng: random.Random, lang: str) -> tuple[Scene, str, str]:
    """Picture 2 is Picture 1 with one uniquely described shape recoloured or removed."""
    options = [i for i, o in enumerate(scene.objects) if matching(scene, Ref(o.colour, o.kind)) == [i]]
    i = pick(rng, options, "nothing unique to change")
    o = scene.objects[i]
    old = object_phrase(o.colour, o.kind, lang)
    taken = {(p.colour, p.kind) for p in scene.objects}
    colours = [c for c in COLOURS if (c, o.kind) not in taken]
    objects = list(scene.objects)
    if colours and rng.random() < 0.6:
        new = rng.choice(colours)
        objects[i] = Shape(o.kind, new, o.size, COLOURS[new][0], o.x, o.y, o.side, o.bbox, o.visible)
        a = (f"In Picture 2, {old} is {colour_name(new, 'en')}." if lang == "en" else
             f"第二张图片中，{old}变成了{colour_name(new, 'zh')}。")
    else:
        del objects[i]
        a = f"{capitalise(old)} is missing in Picture 2." if lang == "en" else f"第二张图片中没有{old}。"
    q = ("What is different between Picture 1 and Picture 2?" if lang == "en" else "这两张图片有什么不同？")
    return with_objects(scene, objects), q, a


def multi_image(scenes: tuple[Scene, ...], rng: random.Random, lang: str) -> TaskResult:
    """2-3 pictures: which has more X, how many X in all, which has a red circle, spot the difference."""
    mode = rng.choice(("more", "total", "which", "diff"))
    if mode == "diff":
        second, q, a = _multi_diff(scenes[0], rng, lang)
        scenes = (scenes[0], second)
    else:
        q, a = {"more": _multi_more, "total": _multi_total, "which": _multi_which}[mode](scenes, rng, lang)
    return TaskResult("multi_image", lang, tuple(scenes), [(q, a)], {"question": q, "answer": a, "mode": mode})


# ---------------------------------------------------------------------------------------------
# Pure text
# ---------------------------------------------------------------------------------------------

def _text_arith(rng: random.Random, lang: str) -> Turn:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    if rng.random() < 0.5:
        return (f"What is {a} plus {b}?" if lang == "en" else f"{zh_number(a)}加{zh_number(b)}等于几？"), str(a + b)
    a, b = max(a, b), min(a, b)
    return (f"What is {a} minus {b}?" if lang == "en" else f"{a}减{b}等于多少？"), str(a - b)


def _text_sides(rng: random.Random, lang: str) -> Turn:
    kind = rng.choice(["square", "triangle", "hexagon", "diamond"])
    n = SHAPES[kind][3]
    if lang == "en":
        return f"How many sides does a {kind} have?", f"A {kind} has {en_count(n)} sides."
    return f"{shape_name(kind, 'zh')}有几条边？", f"{shape_name(kind, 'zh')}有{zh_number(n)}条边。"


def _text_translate(rng: random.Random, lang: str) -> Turn:
    pairs = ([(colour_name(c, "en"), colour_name(c, "zh")) for c in COLOURS] +
             [(shape_name(k, "en"), shape_name(k, "zh")) for k in SHAPES] + list(zip(EN_WORDS, ZH_WORDS)))
    en, zh = rng.choice(pairs)
    if lang == "en":
        return (f'How do you say "{en}" in Chinese?', zh) if rng.random() < 0.5 else \
               (f'What does "{zh}" mean in English?', en)
    return (f"“{en}”用中文怎么说？", zh) if rng.random() < 0.5 else (f"“{zh}”用英语怎么说？", en)


def _text_compare(rng: random.Random, lang: str) -> Turn:
    a, b = rng.sample(range(0, 100), 2)
    return (f"Which is larger, {a} or {b}?" if lang == "en" else f"{a}和{b}哪个大？"), str(max(a, b))


def _text_next(rng: random.Random, lang: str) -> Turn:
    a = rng.randint(0, 98)
    return (f"What number comes after {a}?" if lang == "en" else f"{a}后面的数是几？"), str(a + 1)


def text(scenes: tuple[Scene, ...], rng: random.Random, lang: str) -> TaskResult:
    """No image: arithmetic, sides of shapes, en<->zh words, comparing and counting numbers."""
    make = rng.choice((_text_arith, _text_sides, _text_translate, _text_compare, _text_next))
    q, a = make(rng, lang)
    return TaskResult("text", lang, (), [(q, a)], {"question": q, "answer": a})


# ---------------------------------------------------------------------------------------------
# Multi-turn chat on one image
# ---------------------------------------------------------------------------------------------

CHAT_TURNS = ("caption", "vqa_colour", "vqa_shape", "vqa_count", "vqa_position", "vqa_relation", "vqa_yesno",
              "grounding", "ocr", "ocr_box")


def chat(scenes: tuple[Scene, ...], rng: random.Random, lang: str) -> TaskResult:
    """2-4 different questions about one image in one conversation (no grounding turns in Chinese)."""
    names = [n for n in CHAT_TURNS if not (n == "grounding" and lang == "zh")]
    turns: list[Turn] = []
    for name in rng.sample(names, len(names)):
        if len(turns) == 4:
            break
        try:
            turns += TASKS[name].fn(scenes, rng, lang).turns
        except NotApplicable:
            continue
    if len(turns) < 2:
        raise NotApplicable("fewer than 2 questions apply")
    turns = turns[:rng.randint(2, len(turns))]
    return TaskResult("chat", lang, scenes[:1], turns, {})


# ---------------------------------------------------------------------------------------------
# The task table and the retry loop
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TaskDef:
    fn: Callable[[tuple[Scene, ...], random.Random, str], TaskResult]
    langs: tuple[str, ...]          # languages for training data
    n_images: tuple[int, int]       # how many scenes to sample (inclusive)
    min_texts: int = 0              # raise spec.n_texts to at least this


TASKS: dict[str, TaskDef] = {
    "caption": TaskDef(caption, ("en", "zh"), (1, 1)),
    "grounded_caption": TaskDef(grounded_caption, ("en",), (1, 1)),    # boxes with Chinese: eval only
    "grounding": TaskDef(grounding, ("en",), (1, 1)),   # Chinese grounding is a zero-shot eval only
    "vqa_colour": TaskDef(vqa_colour, ("en", "zh"), (1, 1)),
    "vqa_shape": TaskDef(vqa_shape, ("en", "zh"), (1, 1)),
    "vqa_count": TaskDef(vqa_count, ("en", "zh"), (1, 1)),
    "vqa_position": TaskDef(vqa_position, ("en", "zh"), (1, 1)),
    "vqa_relation": TaskDef(vqa_relation, ("en", "zh"), (1, 1)),
    "vqa_yesno": TaskDef(vqa_yesno, ("en", "zh"), (1, 1)),
    "ocr": TaskDef(ocr, ("en", "zh"), (1, 1), min_texts=1),
    "ocr_box": TaskDef(ocr_box, ("en",), (1, 1), min_texts=1),
    "multi_image": TaskDef(multi_image, ("en", "zh"), (2, 3)),
    "text": TaskDef(text, ("en", "zh"), (0, 0)),
    "chat": TaskDef(chat, ("en", "zh"), (1, 1)),
}
VQA_TASKS = ("vqa_colour", "vqa_shape", "vqa_count", "vqa_position", "vqa_relation", "vqa_yesno")


def task_spec(task: str, spec: SceneSpec) -> SceneSpec:
    """`spec` adjusted to what `task` needs, e.g. OCR scenes get at least one text."""
    need = TASKS[task].min_texts
    lo, hi = spec.n_texts
    return spec if lo >= need else spec.replace(n_texts=(need, max(hi, need)))


def build_task(rng: random.Random, task: str, lang: str, spec: SceneSpec = SceneSpec(), *,
               heldout: bool = False, max_tries: int = 100) -> TaskResult:
    """Sample scene(s) and ask `task` about them, resampling while the task does not apply.

    `heldout=True` allows languages that are evaluation-only (Chinese grounding).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {sorted(TASKS)}")
    tdef = TASKS[task]
    if lang not in (("en", "zh") if heldout else tdef.langs):
        raise ValueError(f"{task=} is not trained in {lang=} (training langs {tdef.langs}; "
                         f"pass heldout=True for eval sets)")
    spec = task_spec(task, spec)
    for _ in range(max_tries):
        scenes = tuple(sample_scene(rng, spec) for _ in range(rng.randint(*tdef.n_images)))
        try:
            return tdef.fn(scenes, rng, lang)
        except NotApplicable:
            continue
    raise RuntimeError(f"{task=} did not apply to any of {max_tries} scenes from {spec}")


def answer_is_right(task: str, fields: dict, answer: str) -> bool:
    """Whether `answer` to a task instance (its `TaskResult.task` and `.fields`) is right, as the demo model's
    checks count it: grounding by IoU >= 0.5 with the true pixel box (answers in the world's /1000 boxes), every
    other task by exact match after trimming spaces, a final full stop and case.
    Example: ("vqa_colour", {"answer": "red"}, " Red.") -> True."""
    if task == "grounding":
        from qwenvl.evaluation.refcoco import grounding_iou      # torch-based; the world itself does not need it

        return grounding_iou(answer, fields["bbox"], fields["width"], fields["height"], scale=1000) >= 0.5
    return answer.strip().strip(".。").lower() == str(fields["answer"]).strip().lower()
