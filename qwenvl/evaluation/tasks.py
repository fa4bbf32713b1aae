"""The task table: for each benchmark, its reader, generation lengths (official values), how a batch
is answered, how the merged predictions are scored, and the official result files written next to them.

    name        data format (datasets.py)       answer by                     metric
    caption     COCO caption json               generate 30 (min 8)           BLEU/METEOR/ROUGE-L/CIDEr
    vqa         VQA jsonl (+ official json)     generate 10 (min 1)           VQA accuracy
    docvqa      VQA jsonl (answers list)        generate 100 (min 1)          ANLS
    chartqa     VQA jsonl                       generate 100 (min 1)          relaxed accuracy
    gqa         VQA jsonl                       generate 10 (min 1)           exact match after cleaning
    ocrvqa      VQA jsonl                       generate 100 (min 1)          exact match
    ai2d        VQA jsonl                       generate 10 (min 1)           exact match
    refcoco     RefCOCO jsonl                   generate 28 (min 10)          Precision@1, IoU >= 0.5
    scienceqa   choice jsonl                    option likelihood             accuracy
    mmbench     choice jsonl (index)            option likelihood             accuracy, circular (strict, vote)
    seedbench   SEED jsonl (image / frames)     option likelihood             accuracy (+ per question type)
    mme         MME folder or jsonl             ChatML generate               acc, acc+, totals
    touchstone  TouchStone tsv / jsonl          ChatML generate + judge       judge score x 100
Aliases name the official datasets (flickr, nocaps, vqav2, okvqa, textvqa, vizwiz, refcoco+, ...).
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import anls, caption, chartqa, exact_match, mme, multiple_choice, refcoco, touchstone
from . import vqa_accuracy as vqa
from .datasets import (ReadOptions, Sample, read_caption, read_choice, read_mme, read_refcoco, read_seed,
                       read_touchstone, read_vqa)
from .jsonio import DataError, read_json, read_log


@dataclass(frozen=True)
class EvalOptions:
    """Everything a task's reading and scoring may depend on (all from the command line)."""

    read: ReadOptions = field(default_factory=ReadOptions)
    corrected: bool = False            # VQA / ANLS / GQA: the corrected variants instead of the official quirks
    chartqa_order: str = "official"
    box_scale: int = refcoco.OFFICIAL_SCALE
    annotation: Path | None = None     # official VQA annotation json (with --questions)
    questions: Path | None = None
    circular_seed: int = 0
    mme_pair_by_image: bool = False
    spice: bool = False
    judge_url: str | None = None
    judge_model: str = "gpt-4"
    judge_key: str | None = None
    judge_wait_s: float = 5.0


@dataclass(frozen=True)
class Context:
    options: EvalOptions
    data: Path
    out_dir: Path


@dataclass(frozen=True)
class Task:
    name: str
    read: Callable[[Path, ReadOptions], list[Sample]]
    score: Callable[[Context, list[Sample], dict[str, dict]], dict]
    max_new_tokens: int = 0            # 0: answered by option likelihood
    min_new_tokens: int = 0
    write: Callable[[Context, list[Sample], dict[str, dict]], None] | None = None

    @property
    def is_choice(self) -> bool:
        return self.max_new_tokens == 0


# ------------------------------------------------------------------------------------ answering

CHOICE_ANSWER_TOKENS = 8          # endpoints: a short answer to read the letter from


def answer_batch(task: Task, backend, samples: Sequence[Sample]) -> list[dict]:
    """One log record per sample: {"id", "prediction"} (+ "losses" or "text" for choice tasks)."""
    if not task.is_choice:
        texts = backend.generate(samples, task.max_new_tokens, task.min_new_tokens)
        return [{"id": s.id, "prediction": t} for s, t in zip(samples, texts)]
    if backend.has_likelihood:
        losses = backend.option_losses(samples)
        return [{"id": s.id, "prediction": multiple_choice.rank(ls), "losses": ls} for s, ls in zip(samples, losses)]
    texts = backend.generate(samples, CHOICE_ANSWER_TOKENS, 0)
    return [{"id": s.id, "prediction": multiple_choice.choice_from_text(t, len(s.choices)), "text": t}
            for s, t in zip(samples, texts)]


# ------------------------------------------------------------------------------------ scoring


def _predictions(samples: Sequence[Sample], preds: dict[str, dict]) -> list:
    return [preds[s.id]["prediction"] for s in samples]


def _targets_required(samples: Sequence[Sample], ctx: Context) -> None:
    empty = [s.meta.get("line") for s in samples if not s.target]
    if empty:
        raise DataError(f"{ctx.data}: lines {empty[:5]} have no answers to score against (a test split?); "
                        "the predictions are in predictions.jsonl")


def score_caption(ctx: Context, samples, preds) -> dict:
    gt = read_json(ctx.data)
    results = [{"image_id": s.meta["image_id"], "caption": preds[s.id]["prediction"]} for s in samples]
    kept = {s.meta["image_id"] for s in samples}
    if len(kept) != len(gt["images"]):                       # --limit: score the images that were asked
        gt = {"images": [i for i in gt["images"] if i["id"] in kept],
              "annotations": [a for a in gt["annotations"] if a["image_id"] in kept]}
    out = caption.caption_scores(gt, results, spice=ctx.options.spice)
    _write_json(ctx.out_dir / "caption_per_image.json", out["per_image"])
    return out["overall"]


def write_caption(ctx: Context, samples, preds) -> None:
    _write_json(ctx.out_dir / "results_coco.json",
                [{"image_id": s.meta["image_id"], "caption": preds[s.id]["prediction"]} for s in samples])


def _vqa_entries(ctx: Context, samples: Sequence[Sample], preds: dict) -> list[vqa.VQAEntry]:
    opts = ctx.options
    if opts.annotation is None:
        _targets_required(samples, ctx)
        return [vqa.VQAEntry(s.id, preds[s.id]["prediction"], tuple(s.target), s.meta.get("question_type"),
                             s.meta.get("answer_type")) for s in samples]
    anns = {str(a["question_id"]): a for a in read_json(opts.annotation)["annotations"]}
    if opts.questions is not None:
        known = {str(q["question_id"]) for q in read_json(opts.questions)["questions"]}
        anns = {k: v for k, v in anns.items() if k in known}
    missing = [s.id for s in samples if s.id not in anns]
    if missing:
        raise DataError(f"{opts.annotation}: no annotation for question ids {missing[:5]}")
    return [vqa.VQAEntry(s.id, preds[s.id]["prediction"], tuple(a["answer"] for a in anns[s.id]["answers"]),
                         anns[s.id].get("question_type"), anns[s.id].get("answer_type")) for s in samples]


def score_vqa(ctx: Context, samples, preds) -> dict:
    entries = _vqa_entries(ctx, samples, preds)
    out = vqa.vqa_accuracy(entries, corrected=ctx.options.corrected)
    per_question = out.pop("perQuestion")
    by_task: dict[str, list[float]] = {}
    for s in samples:
        if s.meta.get("task"):
            by_task.setdefault(s.meta["task"], []).append(per_question[s.id])
    if by_task:
        out["perTask"] = {k: round(100 * sum(v) / len(v), 2) for k, v in sorted(by_task.items())}
    return out


def write_vqa(ctx: Context, samples, preds) -> None:
    _write_json(ctx.out_dir / "results_vqa.json",
                [{"question_id": s.meta["question_id"], "answer": preds[s.id]["prediction"]} for s in samples])


def score_docvqa(ctx: Context, samples, preds) -> dict:
    _targets_required(samples, ctx)
    out = anls.anls(_predictions(samples, preds), [s.target for s in samples], corrected=ctx.options.corrected)
    return {"anls": out["anls"]}


def write_docvqa(ctx: Context, samples, preds) -> None:
    _write_json(ctx.out_dir / "results_docvqa.json",
                [{"questionId": s.meta["question_id"], "answer": preds[s.id]["prediction"]} for s in samples])


def score_chartqa(ctx: Context, samples, preds) -> dict:
    _targets_required(samples, ctx)
    answers, anns = _predictions(samples, preds), [s.target for s in samples]
    out = {"relaxed_accuracy": chartqa.relaxed_accuracy(answers, anns, ctx.options.chartqa_order)["relaxed_accuracy"],
           "order": ctx.options.chartqa_order}
    other = "corrected" if ctx.options.chartqa_order == "official" else "official"
    out[f"relaxed_accuracy_{other}_order"] = chartqa.relaxed_accuracy(answers, anns, other)["relaxed_accuracy"]
    return out


def _exact(gqa: bool):
    def score(ctx: Context, samples, preds) -> dict:
        _targets_required(samples, ctx)
        out = exact_match.exact_match_accuracy(_predictions(samples, preds), [s.target for s in samples], gqa=gqa,
                                               corrected=ctx.options.corrected and gqa)
        return {"accuracy": out["accuracy"]}
    return score


def score_refcoco(ctx: Context, samples, preds) -> dict:
    out = refcoco.precision_at_1(_predictions(samples, preds), [s.target[0] for s in samples],
                                 [tuple(s.target[1]) for s in samples], scale=ctx.options.box_scale)
    return {"precision@1": out["precision@1"], "correct": out["correct"], "total": out["total"],
            "box_scale": ctx.options.box_scale}


def score_choice(ctx: Context, samples, preds) -> dict:
    right = [preds[s.id]["prediction"] == s.target for s in samples]
    out: dict = {"accuracy": sum(right) / len(right), "unanswered": sum(preds[s.id]["prediction"] < 0 for s in samples)}
    types: dict[str, list[bool]] = {}
    for s, r in zip(samples, right):
        key = s.meta.get("question_type") or s.meta.get("category")
        if key is not None:
            types.setdefault(str(key), []).append(r)
    if types:
        out["per_type"] = {k: sum(v) / len(v) for k, v in sorted(types.items())}
    return out


def score_mmbench(ctx: Context, samples, preds) -> dict:
    out = score_choice(ctx, samples, preds)
    try:
        index = {int(s.meta["index"]): s for s in samples}
    except (TypeError, ValueError):
        return out                                         # no integer indexes: no circular evaluation
    p = {i: preds[s.id]["prediction"] for i, s in index.items()}
    a = {i: s.target for i, s in index.items()}
    out["circular_strict"] = multiple_choice.circular_strict(p, a)
    out["circular_vote"] = multiple_choice.circular_vote(p, {i: s.choices for i, s in index.items()}, a,
                                                         seed=ctx.options.circular_seed)
    return out


def write_mmbench(ctx: Context, samples, preds) -> None:
    _write_json(ctx.out_dir / "results_mmbench.json",
                [{"index": s.meta["index"], "prediction": preds[s.id]["prediction"]} for s in samples])


def write_seed(ctx: Context, samples, preds) -> None:
    lines = [json.dumps({"question_id": s.meta["question_id"],
                         "prediction": multiple_choice.LETTERS[p] if (p := preds[s.id]["prediction"]) >= 0 else ""})
             for s in samples]
    (ctx.out_dir / "result.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _mme_rows(samples, preds) -> dict[str, list[mme.MMERow]]:
    rows: dict[str, list[mme.MMERow]] = {}
    for s in samples:
        rows.setdefault(s.meta["subtask"], []).append(
            mme.MMERow(s.meta["image"], s.meta["question"], s.target, preds[s.id]["prediction"]))
    return rows


def score_mme(ctx: Context, samples, preds) -> dict:
    return mme.mme_scores(_mme_rows(samples, preds), pair_by_image=ctx.options.mme_pair_by_image)


def write_mme(ctx: Context, samples, preds) -> None:
    folder = ctx.out_dir / "mme_results"
    folder.mkdir(exist_ok=True)
    for subtask, rows in _mme_rows(samples, preds).items():
        (folder / f"{subtask}.txt").write_text("".join(mme.result_line(r) + "\n" for r in rows), encoding="utf-8")


def score_touchstone(ctx: Context, samples, preds) -> dict:
    """Judge every answer (resumable: judge.jsonl keeps each judged sample), then aggregate."""
    opts = ctx.options
    if not opts.judge_url:
        raise ValueError("touchstone needs --judge-url (any OpenAI-compatible server) to score the answers")
    call = touchstone.openai_judge(opts.judge_url, opts.judge_model, opts.judge_key)
    log_path = ctx.out_dir / "judge.jsonl"
    judged = {r["id"]: r for r in read_log(log_path)}
    with open(log_path, "a", encoding="utf-8") as log:
        for s in samples:
            if s.id in judged:
                continue
            t = s.target
            item = touchstone.judge_sample(call, t["description"], t["question"], t["reference"],
                                           preds[s.id]["prediction"], wait_s=opts.judge_wait_s)
            judged[s.id] = {"id": s.id, "category": t["category"], **item}
            log.write(json.dumps(judged[s.id], ensure_ascii=False) + "\n")
            log.flush()
    return touchstone.touchstone_scores([judged[s.id] for s in samples])


# ------------------------------------------------------------------------------------ the table

TASKS: dict[str, Task] = {t.name: t for t in [
    Task("caption", read_caption, score_caption, 30, 8, write_caption),
    Task("vqa", read_vqa, score_vqa, 10, 1, write_vqa),
    Task("docvqa", read_vqa, score_docvqa, 100, 1, write_docvqa),
    Task("chartqa", read_vqa, score_chartqa, 100, 1),
    Task("gqa", read_vqa, _exact(gqa=True), 10, 1),
    Task("ocrvqa", read_vqa, _exact(gqa=False), 100, 1),
    Task("ai2d", read_vqa, _exact(gqa=False), 10, 1),
    Task("refcoco", read_refcoco, score_refcoco, 28, 10),
    Task("scienceqa", read_choice, score_choice),
    Task("mmbench", read_choice, score_mmbench, write=write_mmbench),
    Task("seedbench", read_seed, score_choice, write=write_seed),
    Task("mme", read_mme, score_mme, 512, 0, write_mme),
    Task("touchstone", read_touchstone, score_touchstone, 512, 0),
]}
ALIASES = {"flickr": "caption", "flickr30k": "caption", "nocaps": "caption", "coco": "caption",
           "vqav2": "vqa", "okvqa": "vqa", "textvqa": "vqa", "vizwiz": "vqa", "infographicsvqa": "docvqa",
           "ai2diagram": "ai2d", "refcoco+": "refcoco", "refcocog": "refcoco", "scienceqa_img": "scienceqa",
           "seed": "seedbench", "seed_bench": "seedbench"}


def get_task(name: str) -> Task:
    """The task of a name or alias; ValueError listing the known names otherwise."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)} (aliases: {', '.join(ALIASES)})")
    return TASKS[key]


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, ensure_ascii=False, indent=1, default=_jsonable), encoding="utf-8")


def _jsonable(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)
