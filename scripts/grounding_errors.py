"""Where the demo model's boxes go wrong: each grounding answer of an eval_demo run against every shape in its scene.

    .venv/bin/python scripts/grounding_errors.py out/eval_demo                 # float, 224 px, chat prompts
    .venv/bin/python scripts/grounding_errors.py out/eval_demo --quant int8 --json out/eval_demo/boxes.json

The RefCOCO-style sets keep only the referred shape's box, so the scene behind sample i is drawn again from the
sets' seed as `write_eval_sets` drew it (`sample_rng(seed, "eval-grounding", i)`, checked against the file's box).
Every IoU is the official one (`refcoco.grounding_iou`: the first "(a,b),(c,d)", divided by 999). Each answer is:

    right        IoU >= 0.5 with the referred shape (what P@1 counts)
    other shape  IoU >= 0.5 with another shape of the scene: a box was read off a shape, the wrong one
    loose        overlaps the referred shape, IoU < 0.5 (and no other shape's box)
    elsewhere    no overlap with the referred shape and no other shape's box (unparsable answers too)

split by the number of shapes in the scene. Example (the shipped model on the fresh English set, n = 300): right 19,
other shape 26, loose 118, elsewhere 137; on the 71 one-shape scenes right 10, loose 52, elsewhere 9.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from qwenvl.evaluation.refcoco import grounding_iou
from qwenvl.synthetic import SceneSpec, build_task, sample_rng

OUTCOMES = ("right", "other shape", "loose", "elsewhere")
THRESHOLD = 0.5


def outcome(answer: str, target: list[int], others: list[tuple[int, int, int, int]], width: int, height: int) -> str:
    """One of OUTCOMES for an answer, given the referred shape's pixel box and the other shapes' boxes.

    Example on a 224 x 224 canvas, target (0, 0, 112, 112), another shape at (112, 112, 224, 224):
    "<box>(0,0),(499,499)</box>" -> "right"; "(500,500),(999,999)" -> "other shape";
    "(0,0),(999,999)" -> "loose" (IoU 0.25); "(600,0),(999,400)" -> "elsewhere".
    """
    on_target = grounding_iou(answer, target, width, height)
    if on_target >= THRESHOLD:                                 # NaN (a degenerate box) compares False throughout
        return "right"
    if any(grounding_iou(answer, box, width, height) >= THRESHOLD for box in others):
        return "other shape"
    return "loose" if on_target > 0 else "elsewhere"


def scene_boxes(seed: int, i: int, lang: str, record: dict) -> list[tuple[int, int, int, int]]:
    """The pixel boxes of every shape in grounding sample i except the referred one (whose box must be the record's)."""
    result = build_task(sample_rng(seed, "eval-grounding", i), "grounding", lang, SceneSpec(), heldout=True)
    if list(result.fields["bbox"]) != list(record["bbox"]):
        raise SystemExit(f"error: sample {i}: the scene drawn again from seed {seed} refers to {result.fields['bbox']},"
                         f" the file to {record['bbox']}: these sets were not written by write_eval_sets")
    shapes = [tuple(s.bbox) for s in result.scenes[0].objects]
    shapes.remove(tuple(record["bbox"]))
    return shapes


def read_jsonl(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"error: {path}: {e}") from None


def tally(out: Path, lang: str, quant: str, px: int, mode: str) -> dict[int, Counter]:
    """{number of shapes: Counter of outcomes} over one set's logged answers."""
    seed = json.loads((out / "data" / "sets.json").read_text())["seed"]
    records = {r["id"]: r for r in read_jsonl(out / "data" / f"grounding_{lang}.jsonl")}
    answers = read_jsonl(out / "runs" / mode / quant / f"grounding_{lang}@{px}" / "predictions.jsonl")
    counts: dict[int, Counter] = {}
    for a in answers:
        i = int(a["id"])
        record = records[i]
        others = scene_boxes(seed, i, lang, record)
        kind = outcome(a["prediction"], record["bbox"], others, record["width"], record["height"])
        counts.setdefault(len(others) + 1, Counter())[kind] += 1
    return dict(sorted(counts.items()))


def table(by_lang: dict[str, dict[int, Counter]]) -> str:
    """Markdown: a row per (language, shapes in the scene) and a total row per language."""
    lines = ["| set | shapes | n | " + " | ".join(OUTCOMES) + " |", "|---|---:|---:|" + "---:|" * len(OUTCOMES)]
    for lang, counts in by_lang.items():
        rows = [(str(k), c) for k, c in counts.items()] + [("all", sum(counts.values(), Counter()))]
        for shapes, c in rows:
            n = sum(c.values())
            cells = " | ".join(f"{c[o]} ({100 * c[o] / n:.0f}%)" for o in OUTCOMES)
            lines.append(f"| grounding {lang} | {shapes} | {n} | {cells} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="an eval_demo.py --out folder with the grounding sets run")
    parser.add_argument("--quant", default="none")
    parser.add_argument("--px", type=int, default=224)
    parser.add_argument("--mode", default="chat")
    parser.add_argument("--langs", nargs="+", default=["en", "zh"])
    parser.add_argument("--json", type=Path, help="also write the counts here")
    args = parser.parse_args(argv)
    by_lang = {lang: tally(args.out, lang, args.quant, args.px, args.mode) for lang in args.langs}
    print(table(by_lang))
    if args.json:
        args.json.write_text(json.dumps({lang: {str(k): dict(c) for k, c in counts.items()}
                                         for lang, counts in by_lang.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
