"""`qwenvl eval`: one benchmark file, a local model or an OpenAI-compatible endpoint, a summary.

    qwenvl eval --task vqa --data eval/vqa_en.jsonl --model DIR --batch-size 8 --out runs/eval/vqa_en
    torchrun --nproc_per_node 2 -m qwenvl.cli eval --task refcoco --data eval/grounding_en.jsonl --model DIR
    qwenvl eval --task caption --data eval/caption_en.json --endpoint http://127.0.0.1:8000
    qwenvl eval --task touchstone --data touchstone.tsv --endpoint URL --judge-url URL --judge-model gpt-4

Re-running the same command resumes (logged samples are skipped); re-running it with other scoring
options (--corrected, --chartqa-order, --box-scale) rescores the logged predictions without the model.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from .jsonio import DataError

USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, IsADirectoryError, TypeError, RuntimeError)


def add_eval_parser(sub) -> None:
    """Add the `eval` subcommand to the `qwenvl` subparsers."""
    from .tasks import ALIASES, TASKS

    p = sub.add_parser("eval", help="evaluate on a benchmark file with the official prompts and metrics",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, help=f"one of {', '.join(TASKS)} (or an alias: {', '.join(ALIASES)})")
    p.add_argument("--data", type=Path, required=True, help="the benchmark file (or MME's folder of .txt files)")
    src = p.add_argument_group("what answers (one of)")
    src.add_argument("--model", type=Path, help="a Qwen-VL checkpoint folder (default: the bundled demo model)")
    src.add_argument("--endpoint", help="an OpenAI-compatible server URL instead (e.g. `qwenvl serve`)")
    src.add_argument("--endpoint-model", help="the model name to send to the endpoint (default: none)")
    src.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the endpoint key")
    p.add_argument("--batch-size", type=int, default=8, help="samples per forward (endpoint: parallel requests)")
    p.add_argument("--out", type=Path, help="output folder (default: runs/eval/<task>-<data name>)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--limit", type=int, help="only the first N samples")
    p.add_argument("--image-root", type=Path, help="folder relative image paths start from (default: the data file's)")
    p.add_argument("--chat", action="store_true", help="ask generation tasks in ChatML (Qwen-VL-Chat style) "
                                                        "instead of the official raw prompts")
    p.add_argument("--max-new-tokens", type=int, help="override the task's official answer length")
    p.add_argument("--few-shot", type=int, default=0, help="official few-shot prompting (caption / VQA tasks)")
    p.add_argument("--train", type=Path, help="training examples for --few-shot")
    p.add_argument("--seed", type=int, default=0, help="few-shot draw and MMBench tie-break seed")
    p.add_argument("--no-progress", action="store_true")
    score = p.add_argument_group("scoring (official behaviour by default)")
    score.add_argument("--corrected", action="store_true",
                       help="VQA / ANLS / GQA: the corrected variants instead of the official quirks")
    score.add_argument("--chartqa-order", choices=["official", "corrected"], default="official")
    score.add_argument("--box-scale", type=int, choices=[999, 1000], default=999,
                       help="RefCOCO: divide model coordinates by 999 (official) or 1000")
    score.add_argument("--annotation", type=Path, help="VQA: the official annotation json (with --questions)")
    score.add_argument("--questions", type=Path, help="VQA: the official questions json")
    score.add_argument("--mme-pair-by-image", action="store_true", help="MME acc+: pair questions by image name")
    score.add_argument("--spice", action="store_true", help="caption: also SPICE (downloads Stanford CoreNLP)")
    judge = p.add_argument_group("TouchStone judge")
    judge.add_argument("--judge-url", help="an OpenAI-compatible server that judges the answers")
    judge.add_argument("--judge-model", default="gpt-4")
    judge.add_argument("--judge-key-env", default="OPENAI_API_KEY", help="environment variable holding the judge key")
    judge.add_argument("--judge-wait", type=float, default=5.0, help="seconds between judge retries")


def run_eval(args: argparse.Namespace) -> int:
    """Run `qwenvl eval`; prints the summary's metrics (rank 0) and returns the exit code."""
    from .runner import finish_distributed, init_distributed, run_task

    d = init_distributed()
    try:
        task, samples, ctx, info = _prepare(args)
        summary = run_task(task, samples, lambda: _backend(args), ctx, args.batch_size, d, info,
                           progress=not args.no_progress)
    except (DataError, *USER_ERRORS) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        finish_distributed(d)
    if summary is not None:
        print(json.dumps(summary["metrics"], indent=2, ensure_ascii=False, default=str))
        print(f"(summary: {ctx.out_dir / 'summary.json'})", file=sys.stderr)
    return 0


def _prepare(args: argparse.Namespace):
    from .datasets import ReadOptions
    from .tasks import Context, EvalOptions, get_task

    task = get_task(args.task)
    if args.max_new_tokens is not None and not task.is_choice:
        task = dataclasses.replace(task, max_new_tokens=args.max_new_tokens)
    if args.model and args.endpoint:
        raise ValueError("give --model or --endpoint, not both")
    if args.few_shot < 0 or (args.limit is not None and args.limit < 1):
        raise ValueError("--few-shot must be >= 0 and --limit >= 1")
    for flag, value in (("--batch-size", args.batch_size), ("--max-new-tokens", args.max_new_tokens)):
        if value is not None and value < 1:                   # 0 new tokens used to mean "the task's default"
            raise ValueError(f"{flag} {value}: must be >= 1")
    read = ReadOptions(image_root=args.image_root, chat=args.chat, few_shot=args.few_shot, train=args.train,
                       seed=args.seed)
    samples = task.read(args.data, read)[: args.limit]
    options = EvalOptions(read=read, corrected=args.corrected, chartqa_order=args.chartqa_order,
                          box_scale=args.box_scale, annotation=args.annotation, questions=args.questions,
                          circular_seed=args.seed, mme_pair_by_image=args.mme_pair_by_image, spice=args.spice,
                          judge_url=args.judge_url, judge_model=args.judge_model,
                          judge_key=os.environ.get(args.judge_key_env), judge_wait_s=args.judge_wait)
    out_dir = args.out or Path("runs") / "eval" / f"{task.name}-{args.data.stem}"
    info = {"task": task.name, "data": str(args.data.resolve()), "model": str(args.model) if args.model else None,
            "endpoint": args.endpoint, "limit": args.limit, "chat": args.chat, "few_shot": args.few_shot,
            "seed": args.seed, "max_new_tokens": task.max_new_tokens, "image_root": str(args.image_root or "")}
    return task, samples, Context(options, args.data, out_dir), info


def _backend(args: argparse.Namespace):
    if args.endpoint:
        from .endpoint import EndpointModel

        return EndpointModel(args.endpoint, args.endpoint_model, os.environ.get(args.api_key_env),
                             workers=args.batch_size)
    from .local import LocalModel

    model_dir = args.model
    if model_dir is None:
        from ..cli import default_model_dir

        model_dir = default_model_dir()
    return LocalModel.from_dir(model_dir, args.dtype)
