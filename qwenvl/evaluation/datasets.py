"""The data files the official scripts read, turned into `Sample`s: the official prompt (with its
`<img>path</img>` spans), the image files in span order, and what the metric needs.

    read_caption      COCO caption json {images: [{id, image}], annotations}   (Flickr30K, NoCaps, COCO)
    read_vqa          jsonl {image | images | -, question, question_id, answer | answers}
                      (VQAv2, OK-VQA, TextVQA, VizWiz, DocVQA, ChartQA, GQA, OCR-VQA, AI2D)
    read_refcoco      jsonl {image, sent, bbox (pixel x1,y1,x2,y2), width, height}
    read_choice       jsonl {image, hint, question, choices, answer (index)} (+ index for MMBench)
    read_seed         jsonl from seed_bench/trans.py {question_id, prompt, answer}, or SEED-Bench's own
                      fields {question_id, image | frames, question, choice_a..d, answer}
    read_mme          a folder of <subtask>.txt (image TAB question TAB Yes/No), or jsonl {image,
                      question, answer, category}
    read_touchstone   the TouchStone tsv (base64 image) or jsonl (image path)

Relative image paths are resolved against `image_root` (default: the data file's folder). Every
problem is a DataError naming the file and line. The prompts are the official ones (qwen_vl.md §12);
with `chat=True` (`--chat`) generation tasks ask the ChatML way instead: "Picture 1: <img>…</img>\\n" +
the bare question, as Qwen-VL-Chat (and the demo model) is asked.
"""
from __future__ import annotations

import base64
import binascii
import csv
import math
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .jsonio import DataError, field as get, read_json, read_jsonl
from .multiple_choice import LETTERS, answer_index, options_text

CAPTION_PROMPT = "<img>{}</img>Describe the image in English:"
VQA_PROMPT = "<img>{}</img>{} Answer:"
GROUNDING_PROMPT = "<img>{}</img><ref>{}</ref><box>"
CHOICE_PROMPT = "<img>{}</img>Context: {}\nQuestion: {}\nOptions: {}\nAnswer:"
SEED_PROMPT = "Question: {}\nOptions: {}\nAnswer:"                  # after "<img>frame</img>\n" per frame
MME_PROMPT = "<img>{}</img>\n{}"                                      # asked through ChatML (model.chat)
IMAGE_SPAN = re.compile(r"<img>(.*?)</img>", re.DOTALL)


@dataclass(frozen=True)
class Sample:
    """One question: `prompt` holds `<img>name</img>` spans; `images` the sources (paths or bytes) in order."""

    id: str
    prompt: str
    images: tuple = ()
    target: Any = None
    choices: tuple[str, ...] = ()
    chat: bool = False
    meta: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        n = len(IMAGE_SPAN.findall(self.prompt))
        if n != len(self.images):
            raise ValueError(f"sample {self.id}: the prompt has {n} image spans but {len(self.images)} images")


@dataclass(frozen=True)
class ReadOptions:
    image_root: Path | None = None
    chat: bool = False
    few_shot: int = 0
    train: Path | None = None
    seed: int = 0


# ---------------------------------------------------------------------------------------- helpers


def resolve_image(name: Any, path: Path, line: int, root: Path | None) -> Path:
    """The image file a record names, or a DataError saying where it was looked for."""
    if not isinstance(name, str) or not name:
        raise DataError(f"{path}: line {line}: image should be a non-empty path, got {name!r}")
    p = Path(name)
    resolved = p if p.is_absolute() else (root or path.parent) / p
    if not resolved.is_file():
        raise DataError(f"{path}: line {line}: image {name!r} not found at {resolved} (set --image-root)")
    return resolved


def picture_prefix(names: list[str]) -> str:
    """e.g. picture_prefix(["a.png", "b.png"]) == "Picture 1: <img>a.png</img>\\nPicture 2: <img>b.png</img>\\n"."""
    return "".join(f"Picture {k}: <img>{n}</img>\n" for k, n in enumerate(names, start=1))


def _record_images(rec: dict, path: Path, line: int, root: Path | None) -> tuple[list[str], list[Path]]:
    """(names as written, resolved files) from "image" (one), "images" (a list) or neither."""
    if "image" in rec and rec["image"] is not None:
        names = [rec["image"]]
    elif "images" in rec:
        names = get(rec, "images", path, line, list)
    else:
        names = []
    return names, [resolve_image(n, path, line, root) for n in names]


def _question_prompt(names: list[str], question: str, chat: bool, raw_template: str = VQA_PROMPT) -> str:
    """Raw: the official template for one image (several: Picture k prefixes, none: the bare text);
    chat: the Picture k prefixes + the bare question.

    Examples: (["a.png"], "Why?", False) -> "<img>a.png</img>Why? Answer:"; ([], "Why?", False) -> "Why? Answer:";
    (["a.png"], "Why?", True) -> "Picture 1: <img>a.png</img>\\nWhy?".
    """
    if chat:
        return picture_prefix(names) + question
    if len(names) == 1:
        return raw_template.format(names[0], question)
    return picture_prefix(names) + raw_template.format("", question).replace("<img></img>", "", 1)


def _check_unique(samples: list[Sample], path: Path) -> list[Sample]:
    seen: dict[str, int] = {}
    for s in samples:
        if s.id in seen:
            raise DataError(f"{path}: line {s.meta.get('line')}: id {s.id!r} repeats line {seen[s.id]}")
        seen[s.id] = s.meta.get("line")
    if not samples:
        raise DataError(f"{path}: no samples")
    return samples


def _few_shot(opts: ReadOptions, train: list[dict], key: str, make) -> tuple[str, list[Path]]:
    """The official --few-shot prefix: `few_shot` random training examples, each its prompt + " " + answer.

    Drawn with random.Random(f"{seed}/{key}") per sample (the official draws from one global stream, so
    its prompts depend on the batch order); training images resolve against the training file's folder.
    """
    if not train:
        return "", []
    if opts.few_shot > len(train):
        raise DataError(f"{opts.train}: --few-shot {opts.few_shot} needs that many examples; it has {len(train)}")
    examples = random.Random(f"{opts.seed}/{key}").sample(train, opts.few_shot)
    files = [resolve_image(ex.get("image"), opts.train, 0, None) for ex in examples]
    return "".join(make(ex) for ex in examples), files


def _train_records(opts: ReadOptions, caption: bool) -> list[dict]:
    if not opts.few_shot:
        return []
    if opts.train is None:
        raise DataError("--few-shot needs --train FILE (training examples in the same format)")
    if caption:
        return [a for a in read_json(opts.train).get("annotations", []) if "image" in a and "caption" in a]
    records = read_jsonl(opts.train)
    for n, rec in records:                       # the few-shot prompt reads these three
        for key, kind in (("image", str), ("question", str), ("answer", None)):
            get(rec, key, opts.train, n, kind)
    return [rec for _, rec in records]


# ---------------------------------------------------------------------------------------- readers


def read_caption(path: Path, opts: ReadOptions) -> list[Sample]:
    """COCO caption json -> one sample per image (id = image id)."""
    data = read_json(path)
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list) or not isinstance(data.get("annotations"), list):
        raise DataError(f"{path}: a caption file needs 'images' and 'annotations' lists (COCO format)")
    train = _train_records(opts, caption=True)
    out = []
    for n, img in enumerate(images, start=1):
        image_id, name = get(img, "id", path, n), get(img, "image", path, n, str)
        file = resolve_image(name, path, n, opts.image_root)
        prompt = picture_prefix([name]) + "Describe the image in English:" if opts.chat else CAPTION_PROMPT.format(name)
        prefix, shots = _few_shot(opts, train, str(image_id),
                                  lambda ex: CAPTION_PROMPT.format(ex["image"]) + f" {ex['caption']}")
        out.append(Sample(str(image_id), prefix + prompt, (*shots, file), chat=opts.chat,
                          meta={"image_id": image_id, "line": n}))
    return _check_unique(out, path)


def read_vqa(path: Path, opts: ReadOptions) -> list[Sample]:
    """VQA-style jsonl -> samples; target = the gt answers as a list (ANLS/ChartQA/exact match use all)."""
    train = _train_records(opts, caption=False)
    out = []
    for n, rec in read_jsonl(path):
        names, files = _record_images(rec, path, n, opts.image_root)
        question = get(rec, "question", path, n, str)
        qid = rec.get("question_id", rec.get("questionId", n))
        prefix, shots = _few_shot(opts, train, str(qid),
                                  lambda ex: VQA_PROMPT.format(ex["image"], ex["question"]) + f" {ex['answer']}")
        out.append(Sample(str(qid), prefix + _question_prompt(names, question, opts.chat), (*shots, *files),
                          _answers(rec, path, n), chat=opts.chat,
                          meta={"question_id": qid, "line": n, "question_type": rec.get("question_type"),
                                "answer_type": rec.get("answer_type"), "task": rec.get("task")}))
    return _check_unique(out, path)


def _answers(rec: dict, path: Path, line: int) -> list:
    """The gt answers: "answers" (strings or {"answer"} dicts) else "answer" (a string or a list)."""
    value = rec.get("answers", rec.get("answer"))
    if value is None:
        return []                                    # test splits: predictions only
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(a, str) for a in value):
        return value
    if isinstance(value, list) and all(isinstance(a, dict) and "answer" in a for a in value):
        return [a["answer"] for a in value]
    raise DataError(f"{path}: line {line}: answers should be a string or a list of strings, got {value!r:.80}")


def read_refcoco(path: Path, opts: ReadOptions) -> list[Sample]:
    """RefCOCO jsonl -> samples; target = (gt pixel box, (width, height))."""
    out = []
    for n, rec in read_jsonl(path):
        name = get(rec, "image", path, n, str)
        file = resolve_image(name, path, n, opts.image_root)
        sent = get(rec, "sent", path, n, str)
        bbox, size = _refcoco_box(rec, path, n)
        prompt = picture_prefix([name]) + f"<ref>{sent}</ref>" if opts.chat else GROUNDING_PROMPT.format(name, sent)
        out.append(Sample(str(rec.get("id", n)), prompt, (file,), (bbox, size), chat=opts.chat, meta={"line": n}))
    return _check_unique(out, path)


def _refcoco_box(rec: dict, path: Path, n: int) -> tuple[list, tuple]:
    """(bbox, (width, height)): finite numbers, x1 <= x2 and y1 <= y2, a positive size (a swapped or NaN box
    would score as a miss without a word). Example: bbox [5, 5, 1, 1] -> "x1 <= x2 and y1 <= y2"."""
    bbox = get(rec, "bbox", path, n, list)
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
    if len(bbox) != 4 or not all(map(number, bbox)):
        raise DataError(f"{path}: line {n}: bbox should be 4 pixel numbers x1,y1,x2,y2, got {bbox!r}")
    if bbox[0] > bbox[2] or bbox[1] > bbox[3]:
        raise DataError(f"{path}: line {n}: bbox {bbox} should have x1 <= x2 and y1 <= y2 (pixel x1,y1,x2,y2)")
    size = (get(rec, "width", path, n, (int, float)), get(rec, "height", path, n, (int, float)))
    if not all(number(v) and v > 0 for v in size):
        raise DataError(f"{path}: line {n}: width and height should be positive numbers, got {size}")
    return bbox, size


def read_choice(path: Path, opts: ReadOptions) -> list[Sample]:
    """ScienceQA-IMG / MMBench jsonl -> samples; target = answer index; choices as given."""
    out = []
    for n, rec in read_jsonl(path):
        name = get(rec, "image", path, n, str)
        file = resolve_image(name, path, n, opts.image_root)
        choices = get(rec, "choices", path, n, list)
        if not 2 <= len(choices) <= len(LETTERS):
            raise DataError(f"{path}: line {n}: expected 2 to {len(LETTERS)} choices, got {len(choices)}")
        try:
            answer = answer_index(get(rec, "answer", path, n), len(choices))
        except ValueError as e:
            raise DataError(f"{path}: line {n}: {e}") from None
        hint = rec.get("hint") or "N/A"
        prompt = CHOICE_PROMPT.format(name, hint, get(rec, "question", path, n, str), options_text(choices))
        sid = rec.get("index", rec.get("id", n))
        out.append(Sample(str(sid), prompt, (file,), answer, tuple(str(c) for c in choices),
                          meta={"line": n, "index": sid, "category": rec.get("category")}))
    return _check_unique(out, path)


def read_seed(path: Path, opts: ReadOptions) -> list[Sample]:
    """SEED-Bench (image or multi-frame video) -> samples with the choices A-D; target = answer index."""
    out = []
    for n, rec in read_jsonl(path):
        if "prompt" in rec:
            prompt = get(rec, "prompt", path, n, str)
            files = [resolve_image(name, path, n, opts.image_root) for name in IMAGE_SPAN.findall(prompt)]
            choices = tuple(LETTERS[:4])
        else:
            key = next((k for k in ("frames", "images") if rec.get(k)), None)
            names = get(rec, key, path, n, list) if key else [get(rec, "image", path, n, str)]
            files = [resolve_image(name, path, n, opts.image_root) for name in names]
            choices = tuple(get(rec, "choices", path, n, list)) if "choices" in rec else \
                tuple(get(rec, f"choice_{c}", path, n) for c in "abcd")
            spans = "".join(f"<img>{name}</img>\n" for name in names)
            prompt = spans + SEED_PROMPT.format(get(rec, "question", path, n, str), options_text(choices))
        try:
            answer = answer_index(get(rec, "answer", path, n), len(choices))
        except ValueError as e:
            raise DataError(f"{path}: line {n}: {e}") from None
        qid = rec.get("question_id", n)
        out.append(Sample(str(qid), prompt, tuple(files), answer, tuple(str(c) for c in choices),
                          meta={"line": n, "question_id": qid, "question_type": rec.get("question_type_id")}))
    return _check_unique(out, path)


def read_mme(path: Path, opts: ReadOptions) -> list[Sample]:
    """MME: a folder of <subtask>.txt (images under image_root/<subtask>/, default <folder>/../images),
    or a jsonl with "category"; always asked through ChatML, as mme/eval.py does."""
    if path.is_dir():
        return _check_unique(_read_mme_folder(path, opts), path)
    out = []
    for n, rec in read_jsonl(path):
        name = get(rec, "image", path, n, str)
        file = resolve_image(name, path, n, opts.image_root)
        question, answer = get(rec, "question", path, n, str), get(rec, "answer", path, n, str)
        subtask = get(rec, "category", path, n, str)
        out.append(Sample(f"{subtask}/{n}", MME_PROMPT.format(name, question), (file,), answer, chat=True,
                          meta={"line": n, "subtask": subtask, "image": name, "question": question}))
    return _check_unique(out, path)


def _read_mme_folder(folder: Path, opts: ReadOptions) -> list[Sample]:
    root = opts.image_root or folder.parent / "images"
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise DataError(f"{folder}: no <subtask>.txt files (MME's Your_Results layout)")
    out = []
    for txt in files:
        subtask = txt.stem
        for n, line in enumerate(txt.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            parts = line.strip().split("\t")
            if len(parts) != 3:
                raise DataError(f"{txt}: line {n}: expected image<TAB>question<TAB>answer, got {len(parts)} fields")
            name, question, answer = parts
            file = resolve_image(name, txt, n, root / subtask)
            out.append(Sample(f"{subtask}/{n}", MME_PROMPT.format(f"images/{subtask}/{name}", question), (file,),
                              answer, chat=True, meta={"line": n, "subtask": subtask, "image": name,
                                                       "question": question}))
    return out


TOUCHSTONE_FIELDS = ("question", "human_annotation", "gpt4_ha_answer", "category")


def read_touchstone(path: Path, opts: ReadOptions) -> list[Sample]:
    """TouchStone tsv (image as base64) or jsonl (image path) -> chat samples; target = judge inputs."""
    rows = _tsv_rows(path) if path.suffix.lower() in (".tsv", ".csv") else read_jsonl(path)
    out = []
    for n, rec in rows:
        for key in TOUCHSTONE_FIELDS:
            get(rec, key, path, n)
        image = _touchstone_image(get(rec, "image", path, n, str), path, n, opts.image_root)
        prompt = picture_prefix(["image"]) + rec["question"]
        target = {"question": rec["question"], "description": rec["human_annotation"],
                  "reference": rec["gpt4_ha_answer"], "category": rec["category"], "task_name": rec.get("task_name")}
        out.append(Sample(str(rec.get("index", n)), prompt, (image,), target, chat=True, meta={"line": n}))
    return _check_unique(out, path)


def _tsv_rows(path: Path) -> list[tuple[int, dict]]:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    csv.field_size_limit(sys.maxsize)                 # base64 images are long fields
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        return [(n, row) for n, row in enumerate(reader, start=2)]


def _touchstone_image(value: str, path: Path, line: int, root: Path | None):
    """A path (when such a file exists) or base64 image bytes."""
    candidate = Path(value) if Path(value).is_absolute() else (root or path.parent) / value
    if len(value) < 1024 and candidate.is_file():
        return candidate
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise DataError(f"{path}: line {line}: image is neither a file nor base64 data") from None
