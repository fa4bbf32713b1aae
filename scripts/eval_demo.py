"""Measure a Qwen-VL checkpoint (the demo model by default) on the held-out synthetic sets, end to end,
with the project's own evaluation code, in float and quantized, and write the README's table.

    .venv/bin/python scripts/eval_demo.py --model qwenvl/assets/demo_model --n 200 --out out/eval_demo \\
        --quant none int8 int4 --resolutions 224 112
    .venv/bin/python scripts/eval_demo.py --model M --n 8 --sets vqa_en ocr_en   # a quick look at two sets

What runs (one `qwenvl.evaluation` run per set, quantization and resolution, in-process: `task.read` ->
`runner.run_task` with a `LocalModel`, exactly what `qwenvl eval --task T --data FILE --model DIR --chat`
does; rerunning the same command resumes every run from its per-sample log):

    set                    file (write_eval_sets)        eval task   metric (points, 0-100)
    grounding en / zh      grounding_{en,zh}.jsonl       refcoco     Precision@1, IoU >= 0.5 (official /999)
    vqa en / zh            vqa_{en,zh}.jsonl             vqa         VQA accuracy, official and --corrected
    ocr en / zh            ocr_{en,zh}.jsonl             ocrvqa      exact match
    multi-image en / zh    multi_image_{en,zh}.jsonl     ocrvqa      exact match (= accuracy: one answer each)
    caption en / zh        caption_{en,zh}.json          caption     CIDEr x 100 (pycocoevalcap; needs Java)
    text en / zh           text_{en,zh}.jsonl            ocrvqa      exact match (no image: the LM alone)

The sets are written once to OUT/data by `qwenvl.synthetic.write_eval_sets(OUT/data, --seed, --n)`: eval
seed 1234 (training uses seed 0 and other split names), `heldout=True` (this is what admits Chinese
grounding, which is never trained). Sample i depends only on (seed, set, i), so a larger --n later extends
the same sets and every logged answer stays valid.

Prompt mode: ChatML (`--chat`: "Picture 1: <img>…</img>\\n" + the question, system "You are a helpful
assistant.", answer up to <|im_end|>). The demo model's last stage (stage 3) is chat SFT in exactly this
form, and it saw the raw official prompts only partly, in stage 2: its raw samples are `<img>0</img>question`
with no " Answer:" suffix (the official VQA / OCR-VQA prompt adds one), and the `<box>`-terminated
grounding prompt. Measured on the previous (weak) checkpoint, n=16 per set, float, chat vs raw: grounding en
12.5 vs 0, VQA en 50 vs 0, VQA zh 50 vs 0, multi-image en 50 vs 0, zh 43.8 vs 0, text 12.5 vs 0 (both langs),
caption zh CIDEr 45.7 vs 40.4, ties at 0 elsewhere; only caption en is better raw (93.2 vs 60.9). With raw
prompts the chat-tuned model rarely stops (it runs on into "user\n..." turns), and the official
min_new_tokens=8 of captions forbids <|endoftext|> before a Chinese caption (~7 demo tokens) can end.
Nothing else is chosen on the eval data: generation lengths and metrics are the official ones.

Two departures from the official scripts, both forced by Chinese sets the official ones never had:
  * caption_zh is asked "用中文描述这张图片：" (the training prompt's Chinese counterpart) instead of
    "Describe the image in English:";
  * caption_zh's CIDEr is computed on characters (references and answers split into CJK characters and
    Latin words before the PTB tokenizer), since PTB leaves unsegmented Chinese as one token per clause.

Resolution ablation (`--resolutions`): the OCR sets are also fed at other sizes; the ViT interpolates its
16x16 position table bicubically to the patch grid (`vision.resize_pos_table`, the reference's get_abs_pos),
as it did in stage 1 at 112 px; the resampler keeps its 64 queries.

Quantization (`--quant`): the LLM block linears are swapped in memory by `qwenvl.quantize.quantize_model`, the
code behind `qwenvl quantize` (int8 per output channel; int4 group-wise, symmetric, or with zero points as
`int4-asym` = `--asym`; `int4-gptq`: codes chosen by GPTQ on 128 samples of the training distribution, written
to OUT/calibration, = `--calibration FILE`); the ViT, adapter and lm_head stay float. The int4 group size is `qwenvl quantize`'s 128 where it divides every LLM linear's input
size; the demo model's MLP c_proj has 704 = 11 x 64 inputs, so it gets 64 (recorded in summary.json and stated
above the table). A --group-size that does not divide them is refused before anything runs.

Output (OUT):
    data/                                  the eval sets (+ data/sets.json: seed and n)
    runs/<mode>/<quant>/<set>@<px>/        one `qwenvl eval` folder: predictions, summary.json, official files
    summary.json                           every number with n, seed, mode, model, int4 group size, and the
                                           wall / CPU minutes per quantization (per set in "results")
    table.md                               the Markdown table (also printed): one row per (task, language),
                                           its metric, a column per quantization, the drop vs float in points

A run folder's run.json binds its settings only once a prediction is logged, so a run whose model failed to
load can be rerun with other arguments into the same OUT.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from qwenvl.evaluation import runner, tasks
from qwenvl.evaluation.datasets import ReadOptions, Sample
from qwenvl.evaluation.jsonio import DataError
from qwenvl.evaluation.local import LocalModel
from qwenvl.images import TRUSTED, load_image, preprocess_v1
from qwenvl.model import QWenLMHeadModel
from qwenvl.gptq_quantize import calibration_batches, collect_hessians, gptq_quantize_model
from qwenvl.quantize import quantize_model
from qwenvl.synthetic import (STAGE_MIXES, STAGE_SPECS, SceneSpec, make_sample, sample_rng,
                              write_eval_sets)
from qwenvl.tokenizer import QWenTokenizer
from qwenvl.weights import load_config, load_model

EVAL_SEED = 1234
QUANT_BITS = {"none": None, "int8": 8, "int4": 4, "int4-asym": 4, "int4-gptq": 4}
SYMMETRIC = {"int4-asym": False}                  # every other quantization is symmetric
COLUMN = {"none": "float", "int8": "int8", "int4": "int4", "int4-asym": "int4-asym", "int4-gptq": "int4-gptq"}
CALIBRATION = 128                 # int4-gptq: samples of the training distribution (stage 3's mix, seed 0)
EN_CAPTION_PROMPT = "Describe the image in English:"  # the official prompt, as evaluation.datasets.read_caption asks
ZH_CAPTION_PROMPT = "用中文描述这张图片："          # synthetic_tasks.CAPTION_PROMPTS["zh"][0]
JAVA_MISSING = "CIDEr skipped: `java` is not on PATH (pycocoevalcap's PTB tokenizer and METEOR need a JRE, " \
               "e.g. apt-get install default-jre-headless)"


# --------------------------------------------------------------------------- the sets
@dataclass(frozen=True)
class EvalSet:
    name: str           # file stem, e.g. "vqa_en"
    suffix: str         # ".jsonl" or ".json"
    task: str           # a qwenvl.evaluation task
    metric: str         # what the table prints

    @property
    def lang(self) -> str:
        return self.name.rsplit("_", 1)[1]

    @property
    def family(self) -> str:
        return self.name.rsplit("_", 1)[0]


SETS = [EvalSet(f"{family}_{lang}", suffix, task, metric)
        for family, suffix, task, metric in (
            ("grounding", ".jsonl", "refcoco", "P@1 (IoU≥0.5)"),
            ("vqa", ".jsonl", "vqa", "VQA acc."),
            ("ocr", ".jsonl", "ocrvqa", "exact match"),
            ("multi_image", ".jsonl", "ocrvqa", "accuracy"),
            ("caption", ".json", "caption", "CIDEr"),
            ("text", ".jsonl", "ocrvqa", "exact match"))
        for lang in ("en", "zh")]
RESOLUTION_SETS = ("ocr_en", "ocr_zh")


def ensure_data(folder: Path, seed: int, n: int) -> None:
    """Write the sets unless folder holds them for this seed with at least n items (prefix-stable)."""
    meta_path = folder / "sets.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else None
    if meta is not None and meta["seed"] != seed:
        raise SystemExit(f"error: {folder} holds eval sets of seed {meta['seed']}, not {seed}; use another --out")
    if meta is not None and meta["n"] >= n:
        return
    print(f"writing the held-out sets (seed {seed}, {n} per set) to {folder}", file=sys.stderr, flush=True)
    counts = write_eval_sets(folder, seed, n)
    meta_path.write_text(json.dumps({"seed": seed, "n": n, "counts": counts}, indent=1))


# --------------------------------------------------------------------------- models
class LocalModelAt(LocalModel):
    """A LocalModel that feeds images at `image_size` px instead of the checkpoint's size."""

    def __init__(self, model, tokenizer, image_size: int):
        super().__init__(model, tokenizer)
        self.image_size = image_size

    def pixels(self, samples, repeat=None):
        out = []
        for i, s in enumerate(samples):
            one = [preprocess_v1(load_image(src, TRUSTED), self.image_size) for src in s.images]
            out += one * (1 if repeat is None else repeat[i])
        return torch.stack(out) if out else None                                  # [N, 3, S, S]


class Models:
    """Loads the checkpoint once per quantization, on first use (a finished run needs no model)."""

    def __init__(self, model_dir: Path, group_size: int | None, calibration_dir: Path | None = None):
        self.model_dir, self.loaded, self.group_size = model_dir, {}, group_size    # group_size: int4 only
        self.calibration_dir = calibration_dir                                       # int4-gptq only
        self.tokenizer = QWenTokenizer.from_pretrained(model_dir)

    def get(self, quant: str):
        if quant not in self.loaded:
            self.loaded.clear()                                   # one model in memory at a time
            model = load_model(self.model_dir, "float32")
            if QUANT_BITS[quant] is not None:
                if model.config.quantization_config:
                    raise SystemExit(f"error: {self.model_dir} is already quantized; give a float checkpoint")
                if quant == "int4-gptq":
                    batches = calibration_batches(write_calibration(self.calibration_dir), self.tokenizer,
                                                  model.config.visual.image_size, CALIBRATION)
                    gptq_quantize_model(model, collect_hessians(model, batches), self.group_size)
                else:
                    quantize_model(model, QUANT_BITS[quant], self.group_size, sym=SYMMETRIC.get(quant, True))
            self.loaded[quant] = model
        return self.loaded[quant]

    def scheme(self, quant: str) -> dict | None:
        bits = QUANT_BITS[quant]
        return None if bits is None else {"bits": bits, "group_size": self.group_size if bits == 4 else None,
                                          "sym": SYMMETRIC.get(quant, True), "lm_head": False}


def write_calibration(out: Path) -> Path:
    """CALIBRATION training-distribution samples (stage 3's task mix, training seed 0, split "calibration": never
    an eval sample) in the fine-tune format, written once under `out`; the file's path."""
    path = out / "calibration.json"
    if path.is_file():
        return path
    mix = STAGE_MIXES["stage3"]
    samples = []
    for i in range(CALIBRATION):
        rng = sample_rng(0, "calibration", i)
        task, lang = rng.choices(list(mix), weights=list(mix.values()))[0]
        samples.append(make_sample(rng, task, lang, out / "images", out, f"c{i}", SceneSpec(**STAGE_SPECS["stage3"])))
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(samples, ensure_ascii=False))
    return path


def int4_group_size(model_dir: Path, requested: int | None = None) -> int:
    """128 (the `qwenvl quantize` default) when it divides the input size of every LLM linear, else the largest
    of 64, 32 that does. The demo model's MLP c_proj takes 704 = 11 x 64 inputs, so it gets 64. A `requested`
    size is checked here, before any run, rather than by `quantize_model` after the float runs."""
    with torch.device("meta"):                                     # shapes only, no weights read
        model = QWenLMHeadModel(load_config(model_dir))
    sizes = {m.in_features for m in model.transformer.h.modules() if isinstance(m, torch.nn.Linear)}
    if requested is not None:
        if requested < 2 or requested % 2 or any(size % requested for size in sizes):
            fits = [g for g in (128, 64, 32, 16) if all(size % g == 0 for size in sizes)]
            raise SystemExit(f"error: --group-size {requested} does not divide the LLM linears' input sizes "
                             f"{sorted(sizes)}" + (f"; use --group-size {fits[0]}" if fits else ""))
        return requested
    for group in (128, 64, 32):
        if all(size % group == 0 for size in sizes):
            if group != 128:
                print(f"note: int4 group size {group}: the LLM linears' input sizes {sorted(sizes)} are not all "
                      "multiples of 128", file=sys.stderr)
            return group
    raise SystemExit(f"error: no int4 group size of 128, 64, 32 divides the input sizes {sorted(sizes)}; "
                     "give --group-size")


# --------------------------------------------------------------------------- scoring tweaks
def cjk_tokens(text: str) -> str:
    """Space-separated CJK characters and Latin/digit words, other symbols dropped.

    Example: cjk_tokens('条纹背景上有两个red圆形。') == '条 纹 背 景 上 有 两 个 red 圆 形'."""
    return " ".join(re.findall(r"[\u4e00-\u9fff]|[A-Za-z0-9]+", text))


def java_ok() -> bool:
    return shutil.which("java") is not None


def caption_score(lang: str):
    """tasks.score_caption; for zh on CJK characters (segmented references in the run folder); None without Java."""
    def score(ctx: tasks.Context, samples, preds) -> dict:
        if not java_ok():
            return {"CIDEr": None, "skipped": JAVA_MISSING}
        if lang != "zh":
            return tasks.score_caption(ctx, samples, preds)
        gt = json.loads(ctx.data.read_text(encoding="utf-8"))
        gt["annotations"] = [{**a, "caption": cjk_tokens(a["caption"])} for a in gt["annotations"]]
        seg = ctx.out_dir / "caption_gt_chars.json"
        seg.write_text(json.dumps(gt, ensure_ascii=False), encoding="utf-8")
        seg_preds = {k: {**v, "prediction": cjk_tokens(v["prediction"])} for k, v in preds.items()}
        return {**tasks.score_caption(dataclasses.replace(ctx, data=seg), samples, seg_preds), "tokens": "cjk characters"}
    return score


def read_set(s: EvalSet, path: Path, chat: bool, n: int) -> tuple[tasks.Task, list[Sample]]:
    task = tasks.get_task(s.task)
    samples = task.read(path, ReadOptions(chat=chat))[:n]
    if s.task == "caption":
        task = dataclasses.replace(task, score=caption_score(s.lang))
        if s.lang == "zh":
            samples = [zh_caption_prompt(x) for x in samples]
    return task, samples


def zh_caption_prompt(sample: Sample) -> Sample:
    """The sample asked ZH_CAPTION_PROMPT where `read_caption` asks the official English one."""
    if EN_CAPTION_PROMPT not in sample.prompt:
        raise ValueError(f"caption sample {sample.id}: no {EN_CAPTION_PROMPT!r} in {sample.prompt!r} to replace")
    return dataclasses.replace(sample, prompt=sample.prompt.replace(EN_CAPTION_PROMPT, ZH_CAPTION_PROMPT))


def headline(s: EvalSet, metrics: dict) -> float | None:
    """The table's number for one run's metrics, in points (0-100; CIDEr x 100; None when not scored)."""
    if s.task == "refcoco":
        return 100 * metrics["precision@1"]
    if s.task == "vqa":
        return metrics["overall"]                                   # already round(100 * mean, 2)
    if s.task == "caption":
        return None if metrics.get("CIDEr") is None else 100 * metrics["CIDEr"]
    return 100 * metrics["accuracy"]


# --------------------------------------------------------------------------- one run
def run_one(s: EvalSet, quant: str, size: int, args, models: Models, native: int) -> list[dict]:
    """One `qwenvl eval` run (resumed from its log if any); returns one result row per reported number."""
    path = args.out / "data" / f"{s.name}{s.suffix}"
    task, samples = read_set(s, path, args.mode == "chat", args.n)
    out_dir = args.out / "runs" / args.mode / quant / f"{s.name}@{size}"
    opts = tasks.EvalOptions(read=ReadOptions(chat=args.mode == "chat"))
    ctx = tasks.Context(opts, path, out_dir)
    info = {"task": task.name, "data": str(path.resolve()), "model": str(args.model.resolve()), "mode": args.mode,
            "quant": models.scheme(quant), "image_size": size, "seed": args.seed,
            "max_new_tokens": task.max_new_tokens,
            "prompt_override": ZH_CAPTION_PROMPT if s.name == "caption_zh" else None}

    def backend():
        model = models.get(quant)
        return LocalModel(model, models.tokenizer) if size == native else LocalModelAt(model, models.tokenizer, size)

    summary = runner.run_task(task, samples, backend, ctx, args.batch_size, runner.Dist(), info,
                              progress=not args.no_progress)
    rows = [("", summary["metrics"])]
    if s.task == "vqa":                                              # the same answers, scored --corrected
        corrected = dataclasses.replace(ctx, options=dataclasses.replace(opts, corrected=True))
        rows.append((" corrected", task.score(corrected, samples, runner.load_predictions(out_dir))))
    out = []
    for variant, metrics in rows:
        out.append({"set": s.name, "family": s.family, "lang": s.lang, "task": task.name, "variant": variant.strip(),
                    "metric": s.metric + variant, "quant": quant, "image_size": size, "value": headline(s, metrics),
                    "n": len(samples), "metrics": _small(metrics), "out": str(out_dir)})
    return out


def _small(metrics: dict) -> dict:
    """The summary's metrics without per-question lists."""
    return {k: v for k, v in metrics.items() if k not in ("ious", "per_question", "cleaned")}


# --------------------------------------------------------------------------- the table
def row_cells(r: dict, native: int) -> tuple[str, str]:
    """(task, language) cells, e.g. ("multi-image", "zh"), ("ocr", "en @ 112 px"): one table row each."""
    px = "" if r["image_size"] == native else f" @ {r['image_size']} px"
    return r["family"].replace("_", "-"), r["lang"] + px


def fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f}"


def make_table(results: list[dict], quants: list[str], native: int) -> tuple[str, dict]:
    """Markdown: one row per (task, language[, size]) with its metric, a column per quantization, then the drop
    of each quantization vs float (float - quantized, points). VQA's --corrected scores go in a note below.

    Returns the text and {"rows": {label: {"metric", "float", "int8", ..., "drop int8", ...}}, "drops": {...}}."""
    table: dict[str, dict] = {}
    corrected: dict[str, dict[str, float | None]] = {}
    for r in results:
        task, lang = row_cells(r, native)
        label = f"{task} {lang}"
        if r.get("variant"):
            corrected.setdefault(label, {})[COLUMN[r["quant"]]] = r["value"]
        else:
            row = table.setdefault(label, {"task": task, "lang": lang, "metric": r["metric"]})
            row[COLUMN[r["quant"]]] = r["value"]
    cols = [COLUMN[q] for q in quants]
    drop_cols = [c for c in cols if c != "float"] if "float" in cols else []
    for vals in table.values():
        for c in drop_cols:
            both = vals.get("float") is not None and vals.get(c) is not None
            vals[f"drop {c}"] = round(vals["float"] - vals[c], 2) if both else None
    heads = ["task", "lang", "metric", *cols, *(f"{c} drop" for c in drop_cols)]
    lines = ["| " + " | ".join(heads) + " |", "|---|---|---|" + "---:|" * (len(heads) - 3)]
    for vals in table.values():
        cells = [vals["task"], vals["lang"], vals["metric"], *(fmt(vals.get(c)) for c in cols),
                 *(fmt(vals[f"drop {c}"]) for c in drop_cols)]
        lines.append("| " + " | ".join(cells) + " |")
    drops = {}
    for c in drop_cols:
        per_row = {k: v[f"drop {c}"] for k, v in table.items() if v[f"drop {c}"] is not None}
        if per_row:
            worst = max(per_row, key=per_row.get)
            drops[c] = {"max_drop": per_row[worst], "row": worst,
                        "mean_drop": round(sum(per_row.values()) / len(per_row), 2), "per_row": per_row}
            lines.append(f"\n{c}: largest drop vs float {per_row[worst]:.1f} points ({worst}); "
                         f"mean drop {drops[c]['mean_drop']:.1f}")
    for label, vals in corrected.items():
        lines.append(f"\n{label}, VQA acc. with --corrected answers: "
                     + ", ".join(f"{c} {fmt(vals.get(c))}" for c in cols))
    return "\n".join(lines) + "\n", {"rows": table, "corrected": corrected, "drops": drops}


def quant_note(quants: list[str], group_size: int | None) -> str:
    """What int8 / int4 mean in this table (group size included), or "" for float alone."""
    parts = {"int8": "int8 per output channel",
             "int4": f"int4 symmetric, group size {group_size} (`qwenvl quantize --bits 4 --group-size {group_size}`)",
             "int4-asym": f"int4 asymmetric, group size {group_size} (`qwenvl quantize --bits 4 --group-size "
                          f"{group_size} --asym`)",
             "int4-gptq": f"int4 symmetric by GPTQ on {CALIBRATION} training-distribution samples, group size "
                          f"{group_size} (`qwenvl quantize --bits 4 --calibration FILE`)"}
    said = [parts[q] for q in quants if q in parts]
    return ("Quantized: " + "; ".join(said) + "; LLM block linears only (ViT, adapter, lm_head float).\n\n"
            if said else "")


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="checkpoint folder (default: the bundled demo model)")
    p.add_argument("--n", type=int, default=200, help="samples per set")
    p.add_argument("--out", type=Path, default=Path("out/eval_demo"))
    p.add_argument("--seed", type=int, default=EVAL_SEED, help="eval-set seed (training uses 0)")
    p.add_argument("--quant", nargs="+", default=["none"], choices=list(QUANT_BITS))
    p.add_argument("--group-size", type=int,
                   help="int4 group size (default: 128 as `qwenvl quantize`, or 64 / 32 where 128 does not divide)")
    p.add_argument("--resolutions", nargs="+", type=int, default=[],
                   help="also evaluate the OCR sets with images fed at these sizes (px)")
    p.add_argument("--mode", choices=["chat", "raw"], default="chat",
                   help="chat: ChatML prompts (--chat; the default, see above); raw: the official base-model prompts")
    p.add_argument("--sets", nargs="+", choices=[s.name for s in SETS], help="only these sets")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.model is None:
        from qwenvl.cli import default_model_dir

        args.model = default_model_dir()
    if args.n < 1:
        p.error(f"--n must be >= 1, got {args.n}")
    args.quant = list(dict.fromkeys(args.quant))
    return args


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the JVMs of caption scoring): on a busy machine
    this, not the wall time, tells how long a run takes on free cores."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    int4 = {"int4", "int4-asym", "int4-gptq"} & set(args.quant)
    group = int4_group_size(args.model, args.group_size) if int4 else None
    t_data = time.monotonic()
    ensure_data(args.out / "data", args.seed, args.n)
    data_minutes = (time.monotonic() - t_data) / 60
    models = Models(args.model, group, args.out / "calibration")
    native = json.loads((args.model / "config.json").read_text())["visual"]["image_size"]
    sets = [s for s in SETS if not args.sets or s.name in args.sets]
    jobs = [(q, s, native) for q in args.quant for s in sets]
    jobs += [(q, s, px) for q in args.quant for px in args.resolutions if px != native
             for s in sets if s.name in RESOLUTION_SETS]
    if not java_ok() and any(s.task == "caption" for _, s, _ in jobs):
        print(f"note: {JAVA_MISSING}", file=sys.stderr)
    results, t0 = [], time.monotonic()
    minutes = {q: {"wall": 0.0, "cpu": 0.0} for q in args.quant}     # this invocation's (a resumed run costs less)
    for k, (quant, s, px) in enumerate(jobs, start=1):
        print(f"[{k}/{len(jobs)}] {s.name} {COLUMN[quant]} {px} px ({(time.monotonic() - t0) / 60:.1f} min so far)",
              file=sys.stderr, flush=True)
        wall, cpu = time.monotonic(), cpu_seconds()                # a mode's first job includes its model load
        try:
            rows = run_one(s, quant, px, args, models, native)
        except (DataError, ValueError) as e:                   # e.g. a run folder made under other settings
            raise SystemExit(f"error: {e}") from None
        wall, cpu = time.monotonic() - wall, cpu_seconds() - cpu
        minutes[quant]["wall"] += wall / 60
        minutes[quant]["cpu"] += cpu / 60
        results += [{**r, "seconds": round(wall, 2), "cpu_seconds": round(cpu, 2)} for r in rows]
    table, extra = make_table(results, args.quant, native)
    header = (f"{args.model} on the held-out synthetic sets (seed {args.seed}, n = {args.n} per set, {args.mode} "
              f"prompts, greedy; points 0-100, CIDEr x 100; drop = float - quantized, in points; a share of "
              f"{args.n} answers at 50 has a standard error of {50 / args.n ** 0.5:.1f} points)\n\n"
              + quant_note(args.quant, group))
    summary = {"model": str(args.model.resolve()), "seed": args.seed, "n": args.n, "mode": args.mode,
               "int4_group_size": group, "quant": {q: models.scheme(q) for q in args.quant},
               "native_image_size": native, "resolutions": args.resolutions, "java": java_ok(),
               "threads": torch.get_num_threads(), "results": results, **extra,
               "wall_minutes": {COLUMN[q]: round(m["wall"], 2) for q, m in minutes.items()},
               "cpu_minutes": {COLUMN[q]: round(m["cpu"], 2) for q, m in minutes.items()},
               "data_minutes": round(data_minutes, 2), "minutes": round((time.monotonic() - t0) / 60, 2)}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False, default=str) + "\n",
                                           encoding="utf-8")
    (args.out / "table.md").write_text(header + table, encoding="utf-8")
    print(header + table)
    return summary


if __name__ == "__main__":
    main()
