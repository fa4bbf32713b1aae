"""The synthetic world: determinism, exact boxes, unique references, and valid training/eval formats."""
from __future__ import annotations

import io
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, strategies as st

from qwenvl.synthetic import (
    TASKS, Ref, Scene, SceneSpec, Shape, answer_is_right, box_1000, build_task, described_scene_qa, describe_scene,
    make_sample, matching, object_mask, refer, render_scene, sample_rng, sample_scene, to_1000, world_text,
    write_eval_sets,
)
from qwenvl.synthetic_scenes import shape_mask, text_mask
from qwenvl.synthetic_world import COLOURS, SHAPES, colour_name, shape_name

SMALL = SceneSpec(width=128, height=128, n_objects=(1, 5), n_texts=(0, 2))
CJK = re.compile(r"[\u4e00-\u9fff]")
BOX = re.compile(r"<box>\((\d+),(\d+)\),\((\d+),(\d+)\)</box>")
PICTURES = re.compile(r"^((?:Picture \d+: <img>[^<>]+</img>\n)*)")
TRAIN_PAIRS = [(t, lang) for t, d in TASKS.items() for lang in d.langs]


def png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


# --------------------------------------------------------------------------- determinism

def test_same_seed_same_scene_pixels_and_png():
    a, b = sample_scene(random.Random(7), SMALL), sample_scene(random.Random(7), SMALL)
    assert a == b
    assert png_bytes(render_scene(a)) == png_bytes(render_scene(b))


def test_different_seeds_differ():
    scenes = [sample_scene(random.Random(s), SMALL) for s in range(5)]
    assert len({repr(s) for s in scenes}) == 5
    assert not np.array_equal(np.asarray(render_scene(scenes[0])), np.asarray(render_scene(scenes[1])))


def test_make_sample_is_deterministic(tmp_path):
    items = []
    for run in ("a", "b"):
        out = tmp_path / run
        items.append([make_sample(sample_rng(3, "train", i), task, lang, out / "images", out, f"s{i}", SMALL)
                      for i, (task, lang) in enumerate(TRAIN_PAIRS)])
    assert json.dumps(items[0], ensure_ascii=False) == json.dumps(items[1], ensure_ascii=False)
    pngs = sorted(p.name for p in (tmp_path / "a" / "images").iterdir())
    assert pngs and all((tmp_path / "a/images" / n).read_bytes() == (tmp_path / "b/images" / n).read_bytes() for n in pngs)


def test_world_text_is_deterministic_and_covers_the_vocabulary():
    spec = SceneSpec(width=96, height=96)
    texts = list(world_text(random.Random(1), 1500, spec))
    assert texts == list(world_text(random.Random(1), 1500, spec))
    blob = "\n".join(texts)
    for c in COLOURS:
        assert colour_name(c, "en") in blob and colour_name(c, "zh") in blob
    for k in SHAPES:
        assert shape_name(k, "en") in blob and shape_name(k, "zh") in blob
    assert "<|im_start|>assistant\n" in blob and "<img>" not in blob


# --------------------------------------------------------------------------- boxes and pixels

def test_to_1000_rule():
    assert (to_1000(0, 224), to_1000(112, 224), to_1000(223, 224), to_1000(224, 224)) == (0, 500, 995, 999)
    assert box_1000((10, 20, 30, 40), 100, 200) == (100, 100, 300, 200)
    with pytest.raises(ValueError, match="outside"):
        to_1000(225, 224)


@given(st.integers(16, 999).flatmap(lambda w: st.tuples(st.just(w), st.integers(0, w - 1), st.integers(1, w))))
def test_normalised_boxes_keep_order(case):
    w, x1, width = case
    x2 = min(w, x1 + width)
    assert 0 <= to_1000(x1, w) < to_1000(x2, w) <= 999


@pytest.mark.parametrize("kind", sorted(SHAPES))
def test_shape_masks_are_filled_and_centred(kind):
    m = shape_mask(kind, 41)
    assert m[20, 20] and m.sum() > 0.3 * 41 * 41
    ys, xs = np.nonzero(m)
    assert (xs.min() == 0 and xs.max() == 40) or (ys.min() == 0 and ys.max() == 40)


def test_boxes_are_tight_and_land_on_the_drawn_shapes():
    for seed in range(40):
        scene = sample_scene(random.Random(seed), SMALL)
        pixels = np.asarray(render_scene(scene))
        masks = [object_mask(o, scene.width, scene.height) for o in scene.objects]
        for i, (o, m) in enumerate(zip(scene.objects, masks)):
            ys, xs = np.nonzero(m)
            assert o.bbox == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            above = np.zeros_like(m)
            for later in masks[i + 1:]:
                above |= later
            visible = m & ~above
            assert abs(o.visible - visible.sum() / m.sum()) <= 5e-5
            assert o.visible >= 1 - SMALL.max_occlusion - 1e-9
            assert (pixels[visible] == o.rgb).all()                       # every uncovered pixel has its colour
            if o.kind == "circle" and o.visible == 1.0:
                cx, cy = (o.bbox[0] + o.bbox[2]) // 2, (o.bbox[1] + o.bbox[3]) // 2
                assert tuple(pixels[cy, cx]) == o.rgb


def test_text_boxes_are_tight_and_clear_of_shapes():
    n = 0
    for seed in range(30):
        scene = sample_scene(random.Random(seed), SMALL.replace(n_texts=(1, 3)))
        pixels = np.asarray(render_scene(scene))
        for t in scene.texts:
            ink = text_mask(t.text, t.font_px)
            x1, y1, x2, y2 = t.bbox
            assert ink.shape == (y2 - y1, x2 - x1)
            assert ink[0].any() and ink[-1].any() and ink[:, 0].any() and ink[:, -1].any()
            full = ink == 255
            assert (pixels[y1:y2, x1:x2][full] == t.rgb).all()
            for o in scene.objects:
                assert o.bbox[2] <= x1 or o.bbox[0] >= x2 or o.bbox[3] <= y1 or o.bbox[1] >= y2
            n += 1
    assert n >= 30


def test_no_occlusion_means_no_overlap():
    for seed in range(20):
        scene = sample_scene(random.Random(seed), SMALL.replace(n_objects=(4, 6), max_occlusion=0.0))
        total = sum(object_mask(o, scene.width, scene.height).astype(int) for o in scene.objects)
        assert total.max() <= 1 and all(o.visible == 1.0 for o in scene.objects)


def test_scene_spec_rejects_bad_values():
    with pytest.raises(ValueError, match="kinds"):
        SceneSpec(kinds=("blob",))
    with pytest.raises(ValueError, match="n_objects"):
        SceneSpec(n_objects=(3, 1))
    with pytest.raises(ValueError, match="canvas"):
        SceneSpec(width=2000)


# --------------------------------------------------------------------------- referring expressions

def _brute_matches(scene, ref: Ref) -> list[int]:
    """An independent reading of a description: filter, then take the clear extreme for a position."""
    idx = [i for i, o in enumerate(scene.objects)
           if o.colour == ref.colour and o.kind == ref.kind and ref.size in (None, o.size)]
    if ref.position is None:
        return idx
    axis = 0 if ref.position in ("left", "right") else 1
    sign = 1 if ref.position in ("left", "top") else -1
    order = sorted(idx, key=lambda i: sign * scene.objects[i].center[axis])
    extent = scene.width if axis == 0 else scene.height
    gap = abs(scene.objects[order[1]].center[axis] - scene.objects[order[0]].center[axis])
    return order[:1] if gap >= 0.12 * extent else order


def test_every_referring_expression_is_unique_in_its_scene():
    crowded = SMALL.replace(n_objects=(4, 8), kinds=("circle", "square"), colours=("red", "blue"))
    n_refs = n_qualified = 0
    for seed in range(60):
        scene = sample_scene(random.Random(seed), crowded)
        for i in range(len(scene.objects)):
            ref = refer(scene, i)
            if ref is not None:
                assert matching(scene, ref) == [i] == _brute_matches(scene, ref)
                n_refs += 1
                n_qualified += ref.size is not None or ref.position is not None
    assert n_refs > 50 and n_qualified > 10


def test_grounding_box_is_the_object_box_under_the_rule():
    for seed in range(30):
        for lang in ("en", "zh"):
            r = build_task(random.Random(seed), "grounding", lang, SMALL, heldout=True)
            scene = r.scenes[0]
            box = tuple(int(v) for v in BOX.search(r.turns[0][1]).groups())
            assert box == box_1000(tuple(r.fields["bbox"]), scene.width, scene.height)
            (i,) = r.fields["objects"]
            assert list(scene.objects[i].bbox) == r.fields["bbox"]
            assert matching(scene, refer(scene, i)) == [i]


def test_vqa_fields_name_the_shapes_each_answer_depends_on():
    """fields["objects"] (a training aid: which shapes to look at) agrees with the scene and the answer."""
    seen = set()
    for seed in range(40):
        for task in ("vqa_colour", "vqa_shape", "vqa_count", "vqa_position", "vqa_relation", "vqa_yesno", "grounding"):
            r = build_task(random.Random(seed), task, "en", SMALL)
            scene, objects, answer = r.scenes[0], r.fields["objects"], r.turns[0][1]
            assert all(0 <= i < len(scene.objects) for i in objects) and objects == sorted(set(objects))
            if task == "vqa_colour":
                assert len(objects) == 1 and colour_name(scene.objects[objects[0]].colour, "en") == answer
            elif task == "vqa_shape":
                assert len(objects) == 1 and shape_name(scene.objects[objects[0]].kind, "en") == answer
            elif task == "vqa_count":
                assert len(objects) == int(answer)
            elif task == "vqa_yesno":
                assert bool(objects) == (answer == "yes")
            elif task == "vqa_relation":
                assert len(objects) == 2
            else:
                assert len(objects) == 1
            seen.add((task, len(objects) > 1))
    assert ("vqa_count", True) in seen


def test_chinese_grounding_is_eval_only():
    with pytest.raises(ValueError, match="not trained"):
        build_task(random.Random(0), "grounding", "zh", SMALL)
    with pytest.raises(ValueError, match="unknown task"):
        build_task(random.Random(0), "dance", "en", SMALL)


# --------------------------------------------------------------------------- training format

def _check_tags(text: str) -> None:
    for tag in ("ref", "box", "img"):
        opens, closes = [m.start() for m in re.finditer(f"<{tag}>", text)], [m.start() for m in re.finditer(f"</{tag}>", text)]
        assert len(opens) == len(closes) and all(o < c for o, c in zip(opens, closes)), text
    for m in BOX.finditer(text):
        x1, y1, x2, y2 = map(int, m.groups())
        assert 0 <= x1 < x2 < 1000 and 0 <= y1 < y2 < 1000, text
    assert text.count("<box>") == len(BOX.findall(text)), text


@pytest.mark.parametrize("task,lang", TRAIN_PAIRS)
def test_every_task_writes_the_official_format(tmp_path, task, lang):
    for i in range(6):
        item = make_sample(sample_rng(11, task, i), task, lang, tmp_path / "images", tmp_path, f"{task}-{i}", SMALL)
        assert (item["task"], item["lang"], item["id"]) == (task, lang, f"{task}-{i}")
        conv = item["conversations"]
        assert len(conv) >= 2 and len(conv) % 2 == 0
        assert [c["from"] for c in conv] == ["user", "assistant"] * (len(conv) // 2)
        assert all(isinstance(c["value"], str) and c["value"].strip() for c in conv)
        prefix = PICTURES.match(conv[0]["value"]).group(1)
        paths = re.findall(r"Picture (\d+): <img>([^<>]+)</img>\n", prefix)
        assert [int(k) for k, _ in paths] == list(range(1, len(paths) + 1))
        assert conv[0]["value"].count("<img>") == len(paths)
        assert len(paths) == {"text": 0, "multi_image": len(paths)}.get(task, 1)
        if task == "multi_image":
            assert len(paths) in (2, 3)
        for _, p in paths:
            assert not Path(p).is_absolute() and (tmp_path / p).is_file()
        for c in conv[1:]:
            assert "<img>" not in c["value"]
        for c in conv:
            _check_tags(c["value"])
        if lang == "zh":
            assert CJK.search(conv[0]["value"]), conv
        if lang == "en" and (task.startswith("vqa_") or task in ("grounding", "multi_image")):
            assert not CJK.search(json.dumps(conv, ensure_ascii=False)), conv
    assert json.loads(json.dumps([item]))[0] == item


def test_zh_grounding_never_appears_in_training_text():
    for i in range(200):
        r = build_task(sample_rng(5, "chat", i), "chat", "zh", SMALL)
        assert not any(u.startswith("<ref>") or "框" in u for u, _ in r.turns)


def test_described_scenes_answer_from_the_description_and_never_box_chinese():
    rng = random.Random(3)
    for _ in range(200):
        context, answer = described_scene_qa(rng)
        assert answer and context.endswith("\n") and "<img>" not in context
        if CJK.search(context):
            assert "<box>" not in context + answer                  # Chinese grounding stays zero-shot
            assert "场景：" in context
        else:
            assert context.count("<box>") >= 1 and "Scene: a" in context
    scene = Scene(width=200, height=100, background=None, texts=(), objects=(
        Shape("circle", "red", "small", (255, 0, 0), 10, 20, 20, (10, 20, 30, 40), 1.0),
        Shape("square", "blue", "large", (0, 0, 255), 100, 10, 80, (100, 10, 180, 90), 1.0)))
    assert describe_scene(scene, "en") == ("Scene: a small red circle <box>(50,200),(150,400)</box>; "
                                           "a large blue square <box>(500,100),(900,900)</box>.")
    assert describe_scene(scene, "zh") == "场景：红色的小圆形；蓝色的大正方形。"


def test_multi_image_difference_changes_exactly_one_shape():
    seen = 0
    for i in range(60):
        r = build_task(sample_rng(2, "multi", i), "multi_image", "en", SMALL)
        if r.fields["mode"] != "diff":
            continue
        a, b = r.scenes
        before = {(o.colour, o.kind, o.bbox) for o in a.objects}
        after = {(o.colour, o.kind, o.bbox) for o in b.objects}
        assert len(before - after) == 1 and len(after - before) <= 1
        seen += 1
    assert seen >= 5


# --------------------------------------------------------------------------- eval files

def test_eval_files_have_the_documented_fields(tmp_path):
    counts = write_eval_sets(tmp_path, seed=0, n=3, spec=SceneSpec(width=96, height=96))
    assert set(counts) == {f"{f}_{lang}" for f in ("grounding", "vqa", "caption", "ocr", "multi_image", "text")
                           for lang in ("en", "zh")} and set(counts.values()) == {3}
    read = lambda name: [json.loads(line) for line in (tmp_path / name).read_text(encoding="utf-8").splitlines()]
    for lang in ("en", "zh"):
        for rec in read(f"grounding_{lang}.jsonl"):
            assert {"image", "sent", "bbox", "width", "height"} <= set(rec)
            x1, y1, x2, y2 = rec["bbox"]
            assert 0 <= x1 < x2 <= rec["width"] and 0 <= y1 < y2 <= rec["height"]
            assert (tmp_path / rec["image"]).is_file()
            assert bool(CJK.search(rec["sent"])) == (lang == "zh")
        for name in (f"vqa_{lang}.jsonl", f"ocr_{lang}.jsonl", f"multi_image_{lang}.jsonl", f"text_{lang}.jsonl"):
            for rec in read(name):
                assert {"question", "question_id", "answer", "answers"} <= set(rec)
                assert rec["answers"] == [rec["answer"]] * 10
                for p in rec.get("images", [rec["image"]] if "image" in rec else []):
                    assert (tmp_path / p).is_file()
        assert all(len(r["images"]) >= 2 for r in read(f"multi_image_{lang}.jsonl"))
        assert all(r["texts"] for r in read(f"ocr_{lang}.jsonl"))
        coco = json.loads((tmp_path / f"caption_{lang}.json").read_text(encoding="utf-8"))
        ids = {im["id"] for im in coco["images"]}
        assert len(ids) == 3 and all((tmp_path / im["image"]).is_file() for im in coco["images"])
        assert all(a["image_id"] in ids and a["caption"] for a in coco["annotations"])
        assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])
    en, zh = read("grounding_en.jsonl"), read("grounding_zh.jsonl")
    assert [r["bbox"] for r in en] == [r["bbox"] for r in zh]     # the zero-shot set asks about the same objects


def test_answer_is_right_counts_exact_answers_and_boxes_by_iou():
    assert answer_is_right("vqa_colour", {"answer": "red"}, " Red.")
    assert answer_is_right("vqa_count", {"answer": 3}, "3。")
    assert not answer_is_right("vqa_colour", {"answer": "red"}, "dark red")
    box = {"bbox": (20, 20, 60, 60), "width": 200, "height": 100}            # pixels; answers are /1000
    assert answer_is_right("grounding", box, "<box>(100,200),(300,600)</box>")
    assert answer_is_right("grounding", box, "<ref>it</ref><box>(110,210),(310,610)</box>")
    assert not answer_is_right("grounding", box, "<box>(300,600),(500,1000)</box>")
    assert not answer_is_right("grounding", box, "no box")
