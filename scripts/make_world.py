"""Write the synthetic world to disk: training JSON per stage, held-out eval sets, a text corpus.

    .venv/bin/python scripts/make_world.py --out world --seed 0 --size 224 \\
        --n1 20000 --n2 20000 --n3 10000 --n-eval 200 --n-text 20000 --workers 2

Layout of --out (every image path is relative to the folder of the file that names it):

    train_stage1.json  train_stage2.json  train_stage3.json   official fine-tune format + task/lang
    images/stage{1,2,3}/…png
    eval/grounding_{en,zh}.jsonl   RefCOCO style {image, sent, bbox (pixel xyxy), width, height}
    eval/vqa_{en,zh}.jsonl         {image, question, question_id, answer, answers (10), task}
    eval/ocr_{en,zh}.jsonl         VQA fields + texts [{text, lang, bbox}]
    eval/multi_image_{en,zh}.jsonl {images, question, question_id, answer, answers, mode}
    eval/caption_{en,zh}.json      COCO captions {images: [{id, image}], annotations: [...]}
    eval/text_{en,zh}.jsonl        {question, question_id, answer, answers}
    eval/images/…png
    text.jsonl                     {"text": …} lines for LM pre-training and the BPE

Deterministic by --seed: sample i of a split uses its own RNG, so --workers does not change a byte.
grounding_zh is zero-shot: Chinese referring grounding never appears in the training files.
"""
from __future__ import annotations

import argparse
import json
import random
import time
import multiprocessing
from pathlib import Path

from qwenvl.synthetic import (EVAL_WRITERS, STAGE_MIXES, STAGE_SPECS, SceneSpec, make_sample, sample_rng, world_text,
                              write_text_eval)

# ----------------------------------------------------------------------------- arguments
ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--out", type=Path, default=Path("world"))
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--size", type=int, default=224, help="canvas side in pixels (the model sees 224 / 448)")
ap.add_argument("--n1", type=int, default=20000, help="stage-1 samples")
ap.add_argument("--n2", type=int, default=20000, help="stage-2 samples")
ap.add_argument("--n3", type=int, default=10000, help="stage-3 samples")
ap.add_argument("--n-eval", type=int, default=200, help="items per eval file")
ap.add_argument("--n-text", type=int, default=20000, help="lines of text.jsonl")
ap.add_argument("--workers", type=int, default=2)
args = ap.parse_args()
BASE = SceneSpec(width=args.size, height=args.size)
OUT: Path = args.out


# ----------------------------------------------------------------------------- workers
def one_sample(job: tuple[str, int]) -> dict:
    stage, i = job
    mix = STAGE_MIXES[stage]
    rng = sample_rng(args.seed, stage, i)
    task, lang = rng.choices(list(mix), weights=list(mix.values()))[0]
    return make_sample(rng, task, lang, OUT / "images" / stage, OUT, f"{stage}-{i:06d}",
                       BASE.replace(**STAGE_SPECS[stage]))


def one_eval_file(job: tuple[str, str]) -> tuple[str, int]:
    family, lang = job
    if family == "text":
        return f"text_{lang}", write_text_eval(OUT / "eval", lang, args.seed, args.n_eval)
    return f"{family}_{lang}", EVAL_WRITERS[family](OUT / "eval", lang, args.seed, args.n_eval, BASE)


def write_json_list(path: Path, items: list[dict]) -> None:
    """A JSON list with one item per line (easy to grep, still one json.load)."""
    path.write_text("[\n" + ",\n".join(json.dumps(x, ensure_ascii=False) for x in items) + "\n]\n", encoding="utf-8")


# ----------------------------------------------------------------------------- run
OUT.mkdir(parents=True, exist_ok=True)
t0 = time.time()
with multiprocessing.get_context("fork").Pool(args.workers) as pool:  # workers inherit args and the mixes
    for stage, n in (("stage1", args.n1), ("stage2", args.n2), ("stage3", args.n3)):
        t = time.time()
        items = pool.map(one_sample, [(stage, i) for i in range(n)], chunksize=64)
        write_json_list(OUT / f"train_{stage}.json", items)
        tasks: dict[str, int] = {}
        for x in items:
            tasks[f"{x['task']}/{x['lang']}"] = tasks.get(f"{x['task']}/{x['lang']}", 0) + 1
        print(f"{stage}: {n} samples in {time.time() - t:.1f}s  " + " ".join(f"{k}={v}" for k, v in sorted(tasks.items())))
    t = time.time()
    jobs = [(f, lang) for f in (*EVAL_WRITERS, "text") for lang in ("en", "zh")]
    counts = dict(pool.map(one_eval_file, jobs, chunksize=1))
    print(f"eval: {sum(counts.values())} items in {time.time() - t:.1f}s  " + " ".join(f"{k}={v}" for k, v in counts.items()))

t = time.time()
with open(OUT / "text.jsonl", "w", encoding="utf-8") as f:
    for text in world_text(random.Random(f"{args.seed}/text"), args.n_text, BASE):
        f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
print(f"text: {args.n_text} lines in {time.time() - t:.1f}s")
print(f"done in {time.time() - t0:.1f}s -> {OUT}")
