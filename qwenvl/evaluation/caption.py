"""COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr; SPICE on request) via `pycocoevalcap`,
as `eval_mm/evaluate_caption.py` runs them (`COCO(gt).loadRes(results)` + `COCOEvalCap.evaluate()`).

Ground truth: a COCO caption json `{"images": [{"id", ...}], "annotations": [{"image_id", "caption"}]}`
(Flickr30K Karpathy test, NoCaps val, COCO); results: `[{"image_id", "caption"}]`, one per image.
Every gt image is scored (pycocoevalcap evaluates `coco.getImgIds()`), so a missing prediction is an
error here (it crashes BLEU there). Text is tokenised by the Stanford PTB tokenizer (Java) first.

Facts worth knowing (all official, reproduced): scores are 0-1 (papers print CIDEr x 100); CIDEr is
CIDEr-D with document frequencies from the references of the evaluated set only, so every image's
CIDEr depends on the whole set; BLEU overall is corpus BLEU; METEOR overall is the jar's aggregate.
SPICE is off by default: pycocoevalcap's Spice downloads Stanford CoreNLP when constructed.
"""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence

METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")


def _scorers(spice: bool):
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.meteor.meteor import Meteor
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError as e:
        raise RuntimeError(f"caption metrics need pycocoevalcap and Java ({e}); pip install pycocoevalcap") from None
    out = [(Bleu(4), ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"]), (Meteor(), "METEOR"), (Rouge(), "ROUGE_L"),
           (Cider(), "CIDEr")]
    if spice:
        from pycocoevalcap.spice.spice import Spice

        out.append((Spice(), "SPICE"))
    return out


def caption_inputs(gt: dict, results: Sequence[dict]) -> tuple[dict, dict]:
    """(gts, res): image id -> list of {"caption"} dicts, in the gt's image order (as COCOEvalCap builds them).

    Raises ValueError naming the images with no prediction, several predictions, or an unknown id.
    """
    image_ids = [img["id"] for img in gt["images"]]
    gts: dict = {i: [] for i in image_ids}
    for ann in gt["annotations"]:
        if ann["image_id"] not in gts:
            raise ValueError(f"annotation {ann.get('id')} refers to image {ann['image_id']}, which is not in 'images'")
        gts[ann["image_id"]].append({"caption": ann["caption"]})
    res: dict = {i: [] for i in image_ids}
    for r in results:
        if r["image_id"] not in res:
            raise ValueError(f"a result names image {r['image_id']!r}, which is not in the ground truth")
        res[r["image_id"]].append({"caption": r["caption"]})
    missing = [i for i, v in res.items() if len(v) != 1]
    if missing:
        raise ValueError(f"every image needs exactly one predicted caption; not so for images {missing[:10]}")
    return gts, res


def tokenize(captions: dict) -> dict:
    """PTB-tokenise {id: [{"caption"}]} -> {id: [str]} (lower-cased, punctuation tokens removed; needs Java)."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    with contextlib.redirect_stdout(sys.stderr):
        return PTBTokenizer().tokenize(captions)


def caption_scores(gt: dict, results: Sequence[dict], spice: bool = False) -> dict:
    """{"overall": {metric: value}, "per_image": [{"image_id", metric: value}]} on the 0-1 scale."""
    gts, res = caption_inputs(gt, results)
    gts, res = tokenize(gts), tokenize(res)
    overall: dict = {}
    per_image: dict = {i: {"image_id": i} for i in gts}
    with contextlib.redirect_stdout(sys.stderr):        # the scorers print progress; keep stdout clean
        for scorer, names in _scorers(spice):
            score, scores = scorer.compute_score(gts, res)
            if isinstance(names, str):
                score, scores, names = [score], [scores], [names]
            for value, values, name in zip(score, scores, names):
                overall[name] = value
                for image_id, v in zip(gts, values):
                    per_image[image_id][name] = v
            _close(scorer)
    return {"overall": overall, "per_image": list(per_image.values())}


def _close(scorer) -> None:
    """Stop METEOR's Java process now rather than at garbage collection."""
    proc = getattr(scorer, "meteor_p", None)
    if proc is not None:
        with contextlib.suppress(Exception):
            proc.stdin.close()
            proc.kill()
            proc.wait()
