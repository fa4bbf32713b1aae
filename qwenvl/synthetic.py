"""The synthetic world the demo model is trained on: samples, eval sets and a text corpus.

    synthetic_world.py   vocabulary (shapes, colours, sizes, words) and en/zh phrasing
    synthetic_scenes.py  Scene, sample_scene, render_scene, boxes in [0, 1000)
    synthetic_refs.py    TaskResult, NotApplicable, unique referring expressions (Ref, refer, matching)
    synthetic_vqa.py     the VQA tasks (colour, shape, count, position, relation, yes/no)
    synthetic_tasks.py   the other tasks, the TASKS table, build_task
    synthetic.py         (this file) training items in the official fine-tune JSON format,
                         evaluation files in the standard formats, world_text for the LM and BPE

Every random choice comes from a `random.Random` passed in; `sample_rng(seed, split, i)` gives each
sample its own stream, so outputs do not depend on order or on how many workers produce them.

A training item (paths relative to the folder of the JSON file; extra keys are allowed):

    {"id": "stage2-000007", "task": "vqa_count", "lang": "zh",
     "conversations": [
        {"from": "user", "value": "Picture 1: <img>images/stage2/stage2-000007-1.png</img>\\n图中有几个三角形？"},
        {"from": "assistant", "value": "2"}]}
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Iterator

from qwenvl.synthetic_scenes import (  # noqa: F401  (re-exported: the public API lives here)
    Background, BBox, Scene, SceneSpec, Shape, TextItem, box_1000, box_text, object_mask, render_scene,
    sample_scene, shape_mask, to_1000, with_objects,
)
from qwenvl.synthetic_refs import NotApplicable, Ref, TaskResult, matching, refer  # noqa: F401
from qwenvl.synthetic_tasks import TASKS, VQA_TASKS, answer_is_right, build_task, caption_text  # noqa: F401
from qwenvl.synthetic_world import (COLOURS, EN_WORDS, SHAPES, ZH_WORDS, colour_name, object_phrase, shape_name,
                                    zh_number)

SYSTEM = "You are a helpful assistant."

# (task, lang) -> weight of each training stage (make_world.py writes them; train_demo.py samples them).
# Stage 1 is image-text pairs (captions, a little OCR; 77/23 en/zh as in the paper), stage 2 the paper's
# pre-training tasks, stage 3 chat-style SFT incl. several images. Nothing Chinese ever carries a box, so
# Chinese grounding is measured zero-shot.
STAGE_MIXES: dict[str, dict[tuple[str, str], float]] = {
    "stage1": {("caption", "en"): 0.62, ("caption", "zh"): 0.18, ("ocr", "en"): 0.12, ("ocr", "zh"): 0.08},
    "stage2": {("caption", "en"): 0.09, ("caption", "zh"): 0.04, ("grounded_caption", "en"): 0.08,
               ("grounding", "en"): 0.16, ("ocr", "en"): 0.06, ("ocr", "zh"): 0.04, ("ocr_box", "en"): 0.06,
               ("multi_image", "en"): 0.03, ("multi_image", "zh"): 0.02, ("text", "en"): 0.03, ("text", "zh"): 0.03,
               **{(t, "en"): 0.045 for t in VQA_TASKS}, **{(t, "zh"): 0.02 for t in VQA_TASKS}},
    "stage3": {("chat", "en"): 0.2, ("chat", "zh"): 0.1, ("multi_image", "en"): 0.1, ("multi_image", "zh"): 0.05,
               ("grounding", "en"): 0.1, ("caption", "en"): 0.04, ("caption", "zh"): 0.02, ("ocr_box", "en"): 0.04,
               ("ocr", "en"): 0.03, ("ocr", "zh"): 0.03, ("text", "en"): 0.05, ("text", "zh"): 0.05,
               **{(t, "en"): 0.022 for t in VQA_TASKS}, **{(t, "zh"): 0.015 for t in VQA_TASKS}},
}
STAGE_MIXES["stage2_easy"] = STAGE_MIXES["stage2"]
# Opens stage 2: one object, a few attributes and its box. With lr 3e-4 the LM reads one object's colour
# within 50 steps; with 1-3 objects and several tasks at once it had not started after 100 (measured).
# Before anything else, two attributes the LM can only get from the image (100 steps read them from
# the image at all; a mix with boxes and captions from the first step had not after 250; measured).
STAGE_MIXES["stage2_read"] = {("vqa_colour", "en"): 0.35, ("vqa_colour", "zh"): 0.15, ("vqa_shape", "en"): 0.35,
                              ("vqa_shape", "zh"): 0.15}
STAGE_MIXES["stage2_warmup"] = {("vqa_colour", "en"): 0.2, ("vqa_colour", "zh"): 0.1, ("vqa_shape", "en"): 0.15,
                                ("vqa_shape", "zh"): 0.05, ("vqa_position", "en"): 0.1, ("grounding", "en"): 0.2,
                                ("caption", "en"): 0.15, ("caption", "zh"): 0.05}
# Then two shapes and questions naming one of them: the LM must retrieve the asked shape's colour (a one-hop
# retrieval on the short questions, see train_demo.py's SHORT_QUESTIONS). With ideal image tokens colour questions
# alone about exactly 2 shapes were learned in 600 steps x 32 (0.96-0.98 held out); 2-4 shapes with shape questions
# mixed in were not (0.57 / 0.49; experiments/oracle_lm.py, session 14).
STAGE_MIXES["stage2_pairs"] = {("vqa_colour", "en"): 0.8, ("vqa_colour", "zh"): 0.2}
# Then every VQA kind about the same two-shape scenes, once colour retrieval works: with the ViT trained along in
# stage2_easy, shape and position answers about 1-2 shapes stayed at the blank-image level (0.06 / 0.5; session 16).
STAGE_MIXES["stage2_pairs_all"] = {("vqa_colour", "en"): 0.2, ("vqa_colour", "zh"): 0.1, ("vqa_shape", "en"): 0.15,
                                   ("vqa_shape", "zh"): 0.05, ("vqa_position", "en"): 0.15, ("vqa_position", "zh"): 0.05,
                                   ("vqa_count", "en"): 0.1, ("vqa_relation", "en"): 0.1, ("vqa_yesno", "en"): 0.1}
# Then boxes on one shape, with a few questions about it so the answers stay: boxes need the adapter to train (with it
# frozen, 0.31 teacher-forced after 900 steps x 24 one-object scenes; trained, 0.63 but colour fell 0.88 -> 0.13
# without questions mixed in; session 17), and they are sample-hungry (~20k one-object box samples for ~0.6).
STAGE_MIXES["stage2_ground1"] = {("grounding", "en"): 0.7, ("vqa_colour", "en"): 0.1, ("vqa_colour", "zh"): 0.05,
                                 ("vqa_shape", "en"): 0.08, ("vqa_position", "en"): 0.07}
# Then boxes on the same two-shape scenes, the VQA kinds kept at half the weight so the retrieval stays: boxes are
# the one answer read off where a shape is, which the full mix's busy scenes never taught (grounding 0 of 100).
STAGE_MIXES["stage2_ground"] = {("grounding", "en"): 0.5,
                                **{key: w / 2 for key, w in STAGE_MIXES["stage2_pairs_all"].items()}}
STAGE_SPECS = {  # fewer objects early so captions stay short and the first boxes are easy
    "stage1": dict(n_objects=(1, 3), n_texts=(0, 1)),
    "stage2_read": dict(n_objects=(1, 1), n_texts=(0, 0)),
    "stage2_warmup": dict(n_objects=(1, 1), n_texts=(0, 0)),
    "stage2_pairs": dict(n_objects=(2, 2), n_texts=(0, 0), max_occlusion=0.0),
    "stage2_pairs_all": dict(n_objects=(2, 2), n_texts=(0, 0), max_occlusion=0.0),
    "stage2_ground1": dict(n_objects=(1, 1), n_texts=(0, 0), max_occlusion=0.0),
    "stage2_ground": dict(n_objects=(1, 2), n_texts=(0, 0), max_occlusion=0.0),
    "stage2_easy": dict(n_objects=(1, 2), n_texts=(0, 1), max_occlusion=0.0),
    "stage2": dict(n_objects=(1, 5), n_texts=(0, 2)),
    "stage3": dict(n_objects=(1, 5), n_texts=(0, 2)),
}
for _mix in STAGE_MIXES.values():
    for _task, _lang in _mix:
        assert _lang in TASKS[_task].langs, f"{_task=} {_lang=} is not a training pair"


def sample_rng(seed: int, split: str, i: int) -> random.Random:
    """The RNG of sample i of a split: random.Random("seed/split/i") (string seeds hash with SHA-512,
    so this is stable across runs and Python processes)."""
    return random.Random(f"{seed}/{split}/{i}")


def picture_prefix(paths: list[str]) -> str:
    """e.g. picture_prefix(["a.png", "b.png"]) == "Picture 1: <img>a.png</img>\\nPicture 2: <img>b.png</img>\\n"."""
    return "".join(f"Picture {k}: <img>{p}</img>\n" for k, p in enumerate(paths, start=1))


def to_conversations(result: TaskResult, paths: list[str]) -> list[dict]:
    """Official fine-tune turns; the pictures go in front of the first user message."""
    if len(paths) != len(result.scenes):
        raise ValueError(f"{len(paths)=} != {len(result.scenes)=} for task {result.task!r}")
    out = []
    for k, (user, assistant) in enumerate(result.turns):
        out.append({"from": "user", "value": (picture_prefix(paths) if k == 0 else "") + user})
        out.append({"from": "assistant", "value": assistant})
    return out


def save_images(scenes: tuple[Scene, ...], image_dir: Path, stem: str, rel_to: Path) -> list[str]:
    """Render and save `stem-1.png`, `stem-2.png`, … and return their paths relative to `rel_to`."""
    image_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, scene in enumerate(scenes, start=1):
        path = image_dir / f"{stem}-{k}.png"
        render_scene(scene).save(path, format="PNG", compress_level=1)
        rel = os.path.relpath(path, rel_to).replace(os.sep, "/")
        if len(rel.encode()) > 255:  # the <img> span holds at most 255 path bytes (qwen_vl.md §6.3)
            raise ValueError(f"image path {rel!r} is {len(rel.encode())} bytes; the limit is 255")
        paths.append(rel)
    return paths


def make_sample(rng: random.Random, task: str, lang: str, image_dir: str | Path, json_dir: str | Path,
                sample_id: str, spec: SceneSpec = SceneSpec()) -> dict:
    """Build one training item of `task` in `lang`, saving its picture(s) under `image_dir`.

    Example: make_sample(sample_rng(0, "train", 7), "vqa_count", "en", "out/images/train", "out",
    "train-7") writes out/images/train/train-7-1.png and returns something like {"id": "train-7", "task":
    "vqa_count", "lang": "en", "conversations": [{"from": "user", "value": "Picture 1: <img>images/
    train/train-7-1.png</img>\\nHow many stars are there?"}, {"from": "assistant", "value": "2"}]}.
    """
    result = build_task(rng, task, lang, spec)
    paths = save_images(result.scenes, Path(image_dir), sample_id, Path(json_dir))
    return {"id": sample_id, "task": task, "lang": lang, "conversations": to_conversations(result, paths)}


# ---------------------------------------------------------------------------------------------
# Evaluation sets (image paths relative to the folder of the eval file)
# ---------------------------------------------------------------------------------------------

def _write_jsonl(path: Path, records: list[dict]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return len(records)


def _eval_results(out_dir: Path, family: str, lang: str, seed: int, n: int, tasks: tuple[str, ...],
                  spec: SceneSpec):
    """Yield (i, result, image paths) for n eval samples; task i cycles through `tasks`.

    The RNG key has no language, so en and zh sets of a family ask about the same scenes/objects.
    """
    image_dir = out_dir / "images" / f"{family}_{lang}"
    for i in range(n):
        result = build_task(sample_rng(seed, f"eval-{family}", i), tasks[i % len(tasks)], lang, spec, heldout=True)
        yield i, result, save_images(result.scenes, image_dir, f"{i:05d}", out_dir)


def write_grounding_eval(out_dir: Path, lang: str, seed: int, n: int, spec: SceneSpec = SceneSpec()) -> int:
    """`grounding_{lang}.jsonl`, RefCOCO style: {image, sent, bbox: pixel [x1,y1,x2,y2], width, height}."""
    records = [{"image": paths[0], "sent": r.fields["sent"], "bbox": r.fields["bbox"], "width": r.fields["width"],
                "height": r.fields["height"], "id": i}
               for i, r, paths in _eval_results(out_dir, "grounding", lang, seed, n, ("grounding",), spec)]
    return _write_jsonl(out_dir / f"grounding_{lang}.jsonl", records)


def _qa_record(i: int, r: TaskResult, paths: list[str]) -> dict:
    a = r.fields["answer"]
    rec = {"image": paths[0]} if len(paths) == 1 else {"images": paths}
    rec.update({"question": r.fields["question"], "question_id": i, "answer": a, "answers": [a] * 10, "task": r.task})
    return rec


def write_vqa_eval(out_dir: Path, lang: str, seed: int, n: int, spec: SceneSpec = SceneSpec()) -> int:
    """`vqa_{lang}.jsonl`: {image, question, question_id, answer, answers (10 copies), task}; tasks cycle."""
    records = [_qa_record(i, r, p) for i, r, p in _eval_results(out_dir, "vqa", lang, seed, n, VQA_TASKS, spec)]
    return _write_jsonl(out_dir / f"vqa_{lang}.jsonl", records)


def write_ocr_eval(out_dir: Path, lang: str, seed: int, n: int, spec: SceneSpec = SceneSpec()) -> int:
    """`ocr_{lang}.jsonl`: the VQA fields plus texts [{text, lang, bbox}] in reading order."""
    records = [{**_qa_record(i, r, p), "texts": r.fields["texts"]}
               for i, r, p in _eval_results(out_dir, "ocr", lang, seed, n, ("ocr",), spec)]
    return _write_jsonl(out_dir / f"ocr_{lang}.jsonl", records)


def write_multi_image_eval(out_dir: Path, lang: str, seed: int, n: int, spec: SceneSpec = SceneSpec()) -> int:
    """`multi_image_{lang}.jsonl`: {images: [...], question, question_id, answer, answers, task, mode}."""
    records = [{**_qa_record(i, r, p), "mode": r.fields["mode"]}
               for i, r, p in _eval_results(out_dir, "multi_image", lang, seed, n, ("multi_image",), spec)]
    return _write_jsonl(out_dir / f"multi_image_{lang}.jsonl", records)


def write_text_eval(out_dir: Path, lang: str, seed: int, n: int) -> int:
    """`text_{lang}.jsonl`: {question, question_id, answer, answers} with no image."""
    records = []
    for i in range(n):
        r = build_task(sample_rng(seed, "eval-text", i), "text", lang)
        a = r.fields["answer"]
        records.append({"question": r.fields["question"], "question_id": i, "answer": a, "answers": [a] * 10})
    return _write_jsonl(out_dir / f"text_{lang}.jsonl", records)


def write_caption_eval(out_dir: Path, lang: str, seed: int, n: int, spec: SceneSpec = SceneSpec()) -> int:
    """`caption_{lang}.json`, COCO style: {images: [{id, image}], annotations: [{image_id, caption, id}]},
    4 reference captions per image (one per template)."""
    images, annotations = [], []
    for i, r, paths in _eval_results(out_dir, "caption", lang, seed, n, ("caption",), spec):
        images.append({"id": i, "image": paths[0]})
        for cap in r.fields["captions"]:
            annotations.append({"image_id": i, "caption": cap, "id": len(annotations)})
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / f"caption_{lang}.json", "w", encoding="utf-8") as f:
        json.dump({"images": images, "annotations": annotations}, f, ensure_ascii=False)
    return len(images)


EVAL_WRITERS = {
    "grounding": write_grounding_eval, "vqa": write_vqa_eval, "caption": write_caption_eval,
    "ocr": write_ocr_eval, "multi_image": write_multi_image_eval,
}


def write_eval_sets(out_dir: str | Path, seed: int, n: int, spec: SceneSpec = SceneSpec()) -> dict[str, int]:
    """All eval files, en and zh (grounding_zh is the zero-shot set), n items each; returns counts."""
    out_dir = Path(out_dir)
    counts = {}
    for family, write in EVAL_WRITERS.items():
        for lang in ("en", "zh"):
            counts[f"{family}_{lang}"] = write(out_dir, lang, seed, n, spec)
    for lang in ("en", "zh"):
        counts[f"text_{lang}"] = write_text_eval(out_dir, lang, seed, n)
    return counts


# ---------------------------------------------------------------------------------------------
# Text corpus for LM pre-training and the BPE
# ---------------------------------------------------------------------------------------------

def chatml(turns: list[tuple[str, str]], system: str = SYSTEM) -> str:
    """e.g. chatml([("hi", "hello")]) == "<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n"
    "<|im_start|>user\\nhi<|im_end|>\\n<|im_start|>assistant\\nhello<|im_end|>"."""
    parts = [f"<|im_start|>system\n{system}<|im_end|>"]
    for user, assistant in turns:
        parts += [f"<|im_start|>user\n{user}<|im_end|>", f"<|im_start|>assistant\n{assistant}<|im_end|>"]
    return "\n".join(parts)


def _vocabulary_line(rng: random.Random) -> str:
    """One line pairing world words in both languages, e.g. "red 红色 circle 圆形 apple 苹果 12 十二"."""
    c, k, w = rng.choice(list(COLOURS)), rng.choice(list(SHAPES)), rng.randrange(len(EN_WORDS))
    n = rng.randint(0, 99)
    return (f"{colour_name(c, 'en')} {colour_name(c, 'zh')} {shape_name(k, 'en')} {shape_name(k, 'zh')} "
            f"{EN_WORDS[w]} {ZH_WORDS[w]} {n} {zh_number(n)}")


TEXT_TASKS = tuple(TASKS)


def world_text(rng: random.Random, n: int, spec: SceneSpec = SceneSpec()) -> Iterator[str]:
    """n texts about the world: task Q&A as plain text or ChatML (train languages only, so no
    Chinese grounding leaks in), plus bilingual vocabulary lines. No image tags.

    Example: next(world_text(random.Random(0), 1)) is a string such as
    "How many circles are there?\\n2" or a ChatML conversation.
    """
    for _ in range(n):
        if rng.random() < 0.15:
            yield _vocabulary_line(rng)
            continue
        task = rng.choice(TEXT_TASKS)
        lang = rng.choice(TASKS[task].langs)
        result = build_task(rng, task, lang, spec)
        if rng.random() < 0.5:
            yield chatml(result.turns)
        else:
            yield "\n".join(f"{q}\n{a}" for q, a in result.turns)


# ---------------------------------------------------------------------------------------------
# Scenes written out in words: retrieval from context, for the LM's pretraining
# ---------------------------------------------------------------------------------------------

# The image tasks' questions, answered from a description of the scene in the context. An LM that has not learned to
# fetch a value bound to a key in its context answers questions about several shapes at chance, with images or
# without (docs/demo_model.md, issue #3); on text it learns that cheaply. Chinese descriptions carry no boxes (a
# Chinese phrase never meets a box, so Chinese grounding stays zero-shot) and so only the questions they answer.
DESCRIBED_TASKS = {"en": (*VQA_TASKS, "grounding"), "zh": ("vqa_colour", "vqa_shape", "vqa_count", "vqa_yesno")}
DESCRIBED_SPEC = SceneSpec(n_objects=(1, 5), n_texts=(0, 0))


def describe_scene(scene: Scene, lang: str, boxes: bool | None = None) -> str:
    """The shapes in drawing order, with their boxes in [0, 1000) if `boxes` (default: in English only).

    e.g. "Scene: a small red circle <box>(100,120),(300,340)</box>; a large blue square <box>(…)</box>." or
    "场景：红色的小圆形；蓝色的大正方形。"
    """
    boxes = lang == "en" if boxes is None else boxes
    parts = [object_phrase(o.colour, o.kind, lang, size=o.size, article="a" if lang == "en" else "")
             + (" " + box_text(o.bbox, scene.width, scene.height) if boxes else "") for o in scene.objects]
    return "Scene: " + "; ".join(parts) + "." if lang == "en" else "场景：" + "；".join(parts) + "。"


def described_scene_qa(rng: random.Random, short: float = 0.3, spec: SceneSpec = DESCRIBED_SPEC) -> tuple[str, str]:
    """(context, answer): a scene description and a question about it, as plain text or ChatML, and what follows
    (supervise only that: a description is ~100 tokens of noise around a one-token answer). With probability `short`
    the question loses its final '?', which puts the asked word where the answer is predicted (a one-hop version the
    LM learns first; measured with experiments/recall_probe.py --gap 0 1).

    e.g. ("Scene: a small red circle <box>(100,120),(300,340)</box>; a large blue square <box>(…)</box>.\n"
          "What colour is the square?\n", "blue")
    """
    lang = rng.choice(("en", "zh"))
    result = build_task(rng, rng.choice(DESCRIBED_TASKS[lang]), lang, spec)
    question, answer = result.turns[0]
    if rng.random() < short:
        question = question.rstrip("?？")
    user = describe_scene(result.scenes[0], lang) + "\n" + question
    if rng.random() < 0.5:
        return chatml([(user, "")])[:-len("<|im_end|>")], answer + "<|im_end|>"
    return user + "\n", answer
