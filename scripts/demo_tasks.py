"""The demo model's tasks on the synthetic world, and the mix each training stage draws from.

Each task turns scene(s) into one conversation in the official fine-tune format
(`Picture k: <img>NAME</img>\\n...`, boxes `<ref>..</ref><box>(x1,y1),(x2,y2)</box>` in [0,1000)) plus
what scoring needs. Images travel next to the text as PIL images; the `<img>` spans only name them.
Prompts follow the official evaluation prompts where one exists (captions: "Describe the image in
English:", VQA: "{question} Answer:", grounding: "<ref>{phrase}</ref><box>"), so the evaluation code
users get works on this model unchanged. Referring grounding is English-only in training (Chinese
grounding is measured zero-shot, the paper's claim).
"""
from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from qwenvl.synthetic_scenes import Scene, SceneSpec, box_1000, box_text, render_scene, sample_scene
from qwenvl.synthetic_world import (BACKGROUNDS, COLOURS, EN_WORDS, SHAPES, ZH_WORDS, colour_name, counted_phrase,
                                    join_list, object_phrase, picture_name, shape_name, text_phrase)


@dataclass
class Sample:
    id: str
    task: str
    lang: str
    conversations: list[dict]
    scenes: list[Scene] = field(default_factory=list)
    answer: str = ""                       # the reference answer of the first question (scoring)
    box: tuple[int, int, int, int] | None = None   # [0,1000) target box for grounding tasks
    weight: float = 1.0

    @property
    def images(self) -> list:
        return [render_scene(s) for s in self.scenes]


def _user(scenes: list[Scene], question: str, official_style: bool) -> str:
    """`<img>0</img>{question}` (the official eval prompt style) or `Picture 1: <img>0</img>\\n{question}`."""
    if official_style and len(scenes) == 1:
        return f"<img>0</img>{question}"
    return "".join(f"Picture {k + 1}: <img>{k}</img>\n" for k in range(len(scenes))) + question


def _conv(user: str, answer: str) -> list[dict]:
    return [{"from": "user", "value": user}, {"from": "assistant", "value": answer}]


# --------------------------------------------------------------------------- captions
def _groups(scene: Scene) -> list[tuple[str, str, list]]:
    """Objects grouped by (colour, kind), groups ordered left to right by their first member."""
    groups: dict[tuple[str, str], list] = {}
    for o in sorted(scene.objects, key=lambda o: (o.center[0], o.center[1])):
        groups.setdefault((o.colour, o.kind), []).append(o)
    return [(c, k, objs) for (c, k), objs in groups.items()]


def caption(scene: Scene, lang: str) -> str:
    """e.g. "Two red circles and a blue star on a striped background. It says "cat"." """
    parts = [counted_phrase(len(objs), c, k, lang) for c, k, objs in _groups(scene)]
    bg_en, bg_zh = BACKGROUNDS[scene.background.kind]
    texts = [text_phrase(t.text, t.lang, lang) for t in scene.texts]
    if lang == "en":
        out = f"{join_list(parts, 'en') or 'Nothing'} on a {bg_en} background."
        out = out[0].upper() + out[1:]
        return out + (f" It shows {join_list(texts, 'en')}." if texts else "")
    out = f"{bg_zh}背景上有{join_list(parts, 'zh') or '空白'}。"
    return out + (f"图中写着{join_list(texts, 'zh')}。" if texts else "")


def grounded_caption(scene: Scene) -> str:
    """English caption with every object group as <ref>phrase</ref> followed by one <box> per member."""
    parts = []
    for c, k, objs in _groups(scene):
        boxes = "".join(box_text(o.bbox, scene.width, scene.height) for o in objs)
        parts.append(f"<ref>{counted_phrase(len(objs), c, k, 'en')}</ref>{boxes}")
    return join_list(parts, "en") + "."


def task_caption(rng: random.Random, lang: str, spec: SceneSpec) -> Sample:
    scene = sample_scene(rng, spec)
    q = "Describe the image in English:" if lang == "en" else "用中文描述这张图片："
    answer = caption(scene, lang)
    return Sample("", "caption", lang, _conv(_user([scene], q, rng.random() < 0.5), answer), [scene], answer)


def task_grounded_caption(rng: random.Random, lang: str, spec: SceneSpec) -> Sample:
    scene = sample_scene(rng, spec)
    answer = grounded_caption(scene)
    q = "Generate the caption in English with grounding:"
    return Sample("", "grounded_caption", "en", _conv(_user([scene], q, True), answer), [scene], answer)


# --------------------------------------------------------------------------- VQA
def _unique(scene: Scene, key) -> list:
    counts = Counter(key(o) for o in scene.objects)
    return [o for o in scene.objects if counts[key(o)] == 1]


def _vqa(rng: random.Random, scene: Scene, lang: str) -> tuple[str, str, str]:
    """(kind of question, question, short answer) about one scene."""
    options = ["count", "yesno"]
    if _unique(scene, lambda o: o.kind):
        options += ["colour", "position"]
    if _unique(scene, lambda o: o.colour):
        options.append("shape")
    if len(_unique(scene, lambda o: (o.colour, o.kind))) >= 2:
        options.append("relation")
    kind = rng.choice(options)
    return (kind, *globals()[f"_q_{kind}"](rng, scene, lang))


def _q_colour(rng, scene, lang):
    o = rng.choice(_unique(scene, lambda o: o.kind))
    if lang == "en":
        return f"What colour is the {shape_name(o.kind, 'en')}?", colour_name(o.colour, "en")
    return f"这个{shape_name(o.kind, 'zh')}是什么颜色？", colour_name(o.colour, "zh")


def _q_shape(rng, scene, lang):
    o = rng.choice(_unique(scene, lambda o: o.colour))
    if lang == "en":
        return f"What shape is the {colour_name(o.colour, 'en')} object?", shape_name(o.kind, "en")
    return f"{colour_name(o.colour, 'zh')}的图形是什么形状？", shape_name(o.kind, "zh")


def _q_count(rng, scene, lang):
    kind = rng.choice([o.kind for o in scene.objects] + list(SHAPES))
    n = sum(o.kind == kind for o in scene.objects)
    if lang == "en":
        return f"How many {shape_name(kind, 'en', plural=True)} are there?", str(n)
    return f"图中有几个{shape_name(kind, 'zh')}？", str(n)


def _q_position(rng, scene, lang):
    o = rng.choice(_unique(scene, lambda o: o.kind))
    horizontal = rng.random() < 0.5
    cx, cy = o.center
    side = ("left" if cx < scene.width / 2 else "right") if horizontal else ("top" if cy < scene.height / 2 else "bottom")
    name = shape_name(o.kind, lang)
    if lang == "en":
        q = f"Is the {name} on the left or on the right?" if horizontal else f"Is the {name} at the top or at the bottom?"
        return q, side
    q = f"{name}在左边还是右边？" if horizontal else f"{name}在上面还是下面？"
    return q, {"left": "左边", "right": "右边", "top": "上面", "bottom": "下面"}[side]


def _q_relation(rng, scene, lang):
    a, b = rng.sample(_unique(scene, lambda o: (o.colour, o.kind)), 2)
    horizontal = rng.random() < 0.5
    yes = a.center[0] < b.center[0] if horizontal else a.center[1] < b.center[1]
    pa, pb = object_phrase(a.colour, a.kind, lang), object_phrase(b.colour, b.kind, lang)
    if lang == "en":
        rel = "to the left of" if horizontal else "above"
        return f"Is {pa} {rel} {pb}?", "yes" if yes else "no"
    rel = "左边" if horizontal else "上面"
    return f"{pa}在{pb}的{rel}吗？", "是" if yes else "不是"


def _q_yesno(rng, scene, lang):
    if rng.random() < 0.5:
        o = rng.choice(scene.objects)
        colour, kind = o.colour, o.kind
    else:
        colour, kind = rng.choice(list(COLOURS)), rng.choice(list(SHAPES))
    present = any(o.colour == colour and o.kind == kind for o in scene.objects)
    if lang == "en":
        return f"Is there {counted_phrase(1, colour, kind, 'en')}?", "yes" if present else "no"
    return f"图中有{object_phrase(colour, kind, 'zh')}吗？", "有" if present else "没有"


def task_vqa(rng: random.Random, lang: str, spec: SceneSpec) -> Sample:
    scene = sample_scene(rng, spec)
    kind, q, a = _vqa(rng, scene, lang)
    q = f"{q} Answer:" if lang == "en" else q
    return Sample("", f"vqa_{kind}", lang, _conv(_user([scene], q, rng.random() < 0.5), a), [scene], a)


# --------------------------------------------------------------------------- grounding
def referring_phrase(scene: Scene, o, lang: str) -> str | None:
    """A phrase that picks out `o` alone: colour + kind, or with its size, else None."""
    if sum((x.colour, x.kind) == (o.colour, o.kind) for x in scene.objects) == 1:
        return object_phrase(o.colour, o.kind, lang)
    if sum((x.colour, x.kind, x.size) == (o.colour, o.kind, o.size) for x in scene.objects) == 1:
        return object_phrase(o.colour, o.kind, lang, size=o.size)
    return None


def task_grounding(rng: random.Random, lang: str, spec: SceneSpec) -> Sample | None:
    scene = sample_scene(rng, spec)
    choices = [(o, p) for o in scene.objects if o.visible > 0.7 and (p := referring_phrase(scene, o, lang))]
    if not choices:
        return None
    o, phrase = rng.choice(choices)
    box = box_1000(o.bbox, scene.width, scene.height)
    coords = f"({box[0]},{box[1]}),({box[2]},{box[3]})"
    if rng.random() < 0.5:      # the official grounding prompt: the model continues the box
        conv = _conv(_user([scene], f"<ref>{phrase}</ref><box>", True), f"{coords}</box>")
    else:
        q = f"Find <ref>{phrase}</ref> in the picture." if lang == "en" else f"框出<ref>{phrase}</ref>的位置。"
        conv = _conv(_user([scene], q, False), f"<ref>{phrase}</ref><box>{coords}</box>")
    return Sample("", "grounding", lang, conv, [scene], coords, box)


# --------------------------------------------------------------------------- OCR
OCR_SPEC_CHANGES = dict(n_texts=(1, 1))


def task_ocr(rng: random.Random, lang: str, spec: SceneSpec, with_box: bool = False) -> Sample | None:
    scene = sample_scene(rng, spec.replace(**OCR_SPEC_CHANGES))
    if not scene.texts:
        return None
    t = scene.texts[0]
    if with_box:
        box = box_1000(t.bbox, scene.width, scene.height)
        answer = f"<ref>{t.text}</ref>{box_text(t.bbox, scene.width, scene.height)}"
        conv = _conv(_user([scene], "Read the text in the image and give its position.", False), answer)
        return Sample("", "ocr_box", "en", conv, [scene], answer, box)
    q = "What is written in the image? Answer:" if lang == "en" else "图中写了什么字？"
    return Sample("", "ocr", lang, _conv(_user([scene], q, lang == "en" and rng.random() < 0.5), t.text), [scene], t.text)


# --------------------------------------------------------------------------- multi-image
def task_multi_image(rng: random.Random, lang: str, spec: SceneSpec) -> Sample:
    n = rng.choice((2, 2, 3))
    scenes = [sample_scene(rng, spec) for _ in range(n)]
    kind = rng.choice(list(SHAPES))
    counts = [sum(o.kind == kind for o in s.objects) for s in scenes]
    if rng.random() < 0.5 and len(set(counts)) == n:
        best = max(range(n), key=lambda i: counts[i])
        q = (f"Which picture has the most {shape_name(kind, 'en', plural=True)}?" if lang == "en"
             else f"哪张图片里的{shape_name(kind, 'zh')}最多？")
        a = picture_name(best + 1, lang)
    else:
        q = (f"How many {shape_name(kind, 'en', plural=True)} are there in all the pictures together?" if lang == "en"
             else f"这些图片里一共有几个{shape_name(kind, 'zh')}？")
        a = str(sum(counts))
    return Sample("", "multi_image", lang, _conv(_user(scenes, q, False), a), scenes, a)


# --------------------------------------------------------------------------- pure text
def task_text(rng: random.Random, lang: str, spec: SceneSpec | None = None) -> Sample:
    if rng.random() < 0.5:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        q = f"What is {a} plus {b}?" if lang == "en" else f"{a}加{b}等于几？"
        ans = str(a + b)
    else:
        i = rng.randrange(len(EN_WORDS))
        q = f'How do you say "{EN_WORDS[i]}" in Chinese?' if lang == "en" else f"“{ZH_WORDS[i]}”用英语怎么说？"
        ans = ZH_WORDS[i] if lang == "en" else EN_WORDS[i]
    return Sample("", "text", lang, _conv(q, ans), [], ans)


# --------------------------------------------------------------------------- chat (stage 3)
def task_chat(rng: random.Random, lang: str, spec: SceneSpec) -> Sample:
    """Several turns about one picture: a caption or a question first, then follow-ups (grounding in English)."""
    scene = sample_scene(rng, spec)
    turns = []
    for k in range(rng.randint(2, 3)):
        roll = rng.random()
        if roll < 0.25:
            q, a = ("What is in the picture?", caption(scene, "en")) if lang == "en" else ("图里有什么？", caption(scene, "zh"))
        elif roll < 0.5 and lang == "en":
            choices = [(o, p) for o in scene.objects if o.visible > 0.7 and (p := referring_phrase(scene, o, "en"))]
            if not choices:
                continue
            o, p = rng.choice(choices)
            q, a = f"Where is {p}?", f"<ref>{p}</ref>{box_text(o.bbox, scene.width, scene.height)}"
        else:
            _, q, a = _vqa(rng, scene, lang)
        turns.append((q, a))
    if not turns:
        turns = [(_q_count(rng, scene, lang))]
    conv = [{"from": "user", "value": f"Picture 1: <img>0</img>\n{turns[0][0]}"}, {"from": "assistant", "value": turns[0][1]}]
    for q, a in turns[1:]:
        conv += [{"from": "user", "value": q}, {"from": "assistant", "value": a}]
    return Sample("", "chat", lang, conv, [scene], turns[0][1])


# --------------------------------------------------------------------------- mixes
EASY = SceneSpec(n_objects=(1, 3), n_texts=(0, 1), max_occlusion=0.0)
FULL = SceneSpec(n_objects=(1, 5), n_texts=(0, 2))
TASKS = {
    "caption": task_caption, "grounded_caption": task_grounded_caption, "vqa": task_vqa,
    "grounding": task_grounding, "ocr": task_ocr, "ocr_box": lambda r, l, s: task_ocr(r, l, s, with_box=True),
    "multi_image": task_multi_image, "text": task_text, "chat": task_chat,
}
# (task, weight in the mix, languages, scene spec)
MIXES: dict[str, list[tuple[str, float, tuple[str, ...], SceneSpec]]] = {
    "stage1": [("caption", 1.0, ("en", "zh"), FULL)],
    "stage2_easy": [("vqa", 3, ("en", "zh"), EASY), ("grounding", 3, ("en",), EASY), ("ocr", 2, ("en", "zh"), EASY),
                    ("caption", 1, ("en", "zh"), EASY), ("text", 0.5, ("en", "zh"), EASY)],
    "stage2": [("vqa", 3, ("en", "zh"), FULL), ("grounding", 3, ("en",), FULL), ("ocr", 2, ("en", "zh"), FULL),
               ("ocr_box", 1, ("en",), FULL), ("caption", 1, ("en", "zh"), FULL),
               ("grounded_caption", 1, ("en",), FULL), ("multi_image", 1.5, ("en", "zh"), FULL),
               ("text", 0.5, ("en", "zh"), FULL)],
    "stage3": [("chat", 3, ("en", "zh"), FULL), ("vqa", 2, ("en", "zh"), FULL), ("grounding", 2, ("en",), FULL),
               ("ocr", 1.5, ("en", "zh"), FULL), ("multi_image", 1.5, ("en", "zh"), FULL),
               ("caption", 1, ("en", "zh"), FULL), ("text", 1, ("en", "zh"), FULL)],
}
MIXES["stage2_full"] = MIXES["stage2"]


def sample_one(rng: random.Random, task: str, lang: str, spec: SceneSpec) -> Sample:
    for _ in range(50):
        s = TASKS[task](rng, lang, spec)
        if s is not None:
            s.id = f"{task}-{lang}-{rng.getrandbits(32):08x}"
            return s
    raise RuntimeError(f"could not make a {task} sample in 50 tries")


def sample_mix(rng: random.Random, mix: str, n: int) -> list[Sample]:
    entries = MIXES[mix]
    picks = rng.choices(entries, weights=[e[1] for e in entries], k=n)
    return [sample_one(rng, task, rng.choice(langs), spec) for task, _, langs, spec in picks]


# --------------------------------------------------------------------------- text corpus, eval
def world_text(rng: random.Random, n: int) -> Iterator[str]:
    """Texts of the world for the BPE and the LM stage: every task's language, image spans removed."""
    mixes = ("stage2", "stage3")
    for i in range(n):
        s = sample_mix(rng, mixes[i % 2], 1)[0]
        yield "\n".join(re.sub(r"(Picture \d+: )?<img>[^<]*</img>\n?", "", t["value"]) for t in s.conversations)


EVAL_TASKS = ("vqa_en", "vqa_zh", "grounding_en", "grounding_zh", "ocr_en", "ocr_zh", "multi_image_en", "multi_image_zh")


def sample_task(rng: random.Random, name: str, n: int) -> list[Sample]:
    task, lang = name.rsplit("_", 1)
    return [sample_one(rng, task, lang, FULL) for _ in range(n)]


def score(name: str, sample: Sample, answer: str) -> float:
    """1.0 for a right answer: normalised exact match, or IoU >= 0.5 for boxes."""
    if name.startswith("grounding"):
        nums = [int(x) for x in re.findall(r"\d+", answer)[:4]]
        return float(len(nums) == 4 and _iou(nums, sample.box) >= 0.5)
    return float(answer.strip().strip(".。").lower() == sample.answer.strip().lower())


def _iou(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
