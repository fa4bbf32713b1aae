"""`qwenvl finetune` and `qwenvl merge-lora`: the command-line face of qwenvl/finetune.py.

    qwenvl finetune --data train.json --model DIR --method lora --out runs/ft --epochs 3 --lr 1e-4
    torchrun --nproc_per_node 2 -m qwenvl.cli finetune --data train.json --model DIR --method full --out runs/ft
    qwenvl merge-lora --model DIR --adapter runs/ft --out merged/
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_finetune_parsers(sub) -> None:
    """Register `finetune` and `merge-lora`; each sets `run` to the function that executes it."""
    ft = sub.add_parser("finetune", help="fine-tune on the official JSON data: full, LoRA or Q-LoRA (torchrun-able)",
                        description="Fine-tune Qwen-VL. Defaults follow the official scripts (lr 1e-5, 5 epochs, "
                                    "batch 1 x accumulation 8, ViT frozen, LoRA r=64 alpha=16 dropout 0.05).")
    ft.add_argument("--data", type=Path, required=True, help="official fine-tune JSON (image paths relative to it)")
    ft.add_argument("--model", type=Path, help="checkpoint folder (default: the bundled demo model)")
    ft.add_argument("--out", type=Path, required=True, help="output folder (rerun the same command to resume)")
    ft.add_argument("--method", choices=["full", "lora", "qlora"], default="lora")
    _training_options(ft)
    _lora_options(ft)
    ft.set_defaults(run=run_finetune)
    merge = sub.add_parser("merge-lora", help="fold a LoRA adapter (PEFT format) into its base: a plain checkpoint")
    merge.add_argument("--model", type=Path, required=True, help="the float base checkpoint the adapter was trained on")
    merge.add_argument("--adapter", type=Path, required=True, help="folder with adapter_config.json + adapter_model.*")
    merge.add_argument("--out", type=Path, required=True, help="folder for the merged checkpoint (official layout)")
    merge.set_defaults(run=run_merge)


def _training_options(ft: argparse.ArgumentParser) -> None:
    ft.add_argument("--epochs", type=float, default=5.0)
    ft.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    ft.add_argument("--batch-size", type=int, default=1, help="samples per process and micro-batch")
    ft.add_argument("--grad-accum", type=int, default=8, help="micro-batches per optimizer step")
    ft.add_argument("--lr", type=float, default=1e-5)
    ft.add_argument("--weight-decay", type=float, default=0.1)
    ft.add_argument("--warmup-ratio", type=float, default=0.01)
    ft.add_argument("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
    ft.add_argument("--max-len", type=int, default=2048, help="longest sample in tokens (longer ones are refused)")
    ft.add_argument("--truncate", action="store_true",
                    help="cut over-long samples at --max-len, as the official script does")
    ft.add_argument("--assistant-only", action="store_true",
                    help="supervise only the replies (the official rule also supervises every "
                         "<|im_start|> and turn end)")
    ft.add_argument("--system", default="You are a helpful assistant.", help="the system message of every sample")
    # train.TRAIN_DTYPES, spelled out: this module stays free of torch imports
    ft.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                    help="bf16: autocast (and bf16 LoRA bases); auto (default): bf16 where the CPU has bf16 "
                         "instructions (AVX512-BF16, AMX), else fp32 (torch emulates bf16 there, ~25x slower to train)")
    ft.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    ft.add_argument("--train", default=None,
                    help="full: parts that train among vit,adapter,llm (default adapter,llm = the official fix_vit); "
                         "lora: 'adapter' also trains the resampler (saved as a module to save)")
    ft.add_argument("--loss", choices=["token", "sample"], default="token",
                    help="average over the step's supervised tokens (default) or over its samples")
    ft.add_argument("--seed", type=int, default=42)
    ft.add_argument("--save-every", type=int, default=1000, help="checkpoint every N optimizer steps (and at the end)")
    ft.add_argument("--distributed", choices=["ddp", "fsdp"], default="ddp", help="under torchrun")
    ft.add_argument("--no-progress", dest="progress", action="store_false")


def _lora_options(ft: argparse.ArgumentParser) -> None:
    ft.add_argument("--lora-r", type=int, default=64)
    ft.add_argument("--lora-alpha", type=float, default=16.0)
    ft.add_argument("--lora-dropout", type=float, default=0.05)
    ft.add_argument("--modules-to-save", default="auto",
                    help="auto: wte,lm_head unless the model path contains 'chat' or Q-LoRA (the official "
                         "rule); none; or a comma list")
    ft.add_argument("--q-group-size", type=int, default=128, help="int4 group size when Q-LoRA quantizes a float base")
    ft.add_argument("--merge", action="store_true", help="also write OUT/merged: the base with the adapter folded in")


def run_finetune(ns: argparse.Namespace) -> int:
    from .cli import USER_ERRORS, default_model_dir
    from .finetune import FinetuneArgs, TrainingInterrupted, finetune

    train = None if ns.train is None else tuple(p for p in ns.train.split(",") if p)
    try:
        args = FinetuneArgs(
            data=ns.data, model=ns.model or default_model_dir(), out=ns.out, method=ns.method, epochs=ns.epochs,
            max_steps=ns.max_steps, batch_size=ns.batch_size, grad_accum=ns.grad_accum, lr=ns.lr,
            weight_decay=ns.weight_decay, warmup_ratio=ns.warmup_ratio, max_grad_norm=ns.max_grad_norm,
            max_len=ns.max_len, dtype=ns.dtype, gradient_checkpointing=ns.gradient_checkpointing, train=train,
            lora_r=ns.lora_r, lora_alpha=ns.lora_alpha, lora_dropout=ns.lora_dropout,
            modules_to_save=ns.modules_to_save, q_group_size=ns.q_group_size, system_message=ns.system,
            assistant_only=ns.assistant_only, truncate=ns.truncate, loss=ns.loss, seed=ns.seed,
            save_every=ns.save_every, distributed=ns.distributed, merge=ns.merge, progress=ns.progress)
        summary = finetune(args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:
        print(f"\nstopped: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:                      # while loading, or while writing the result after the last step
        print(f"\nstopped: interrupted outside a training step; rerun the same command to resume from "
              f"{ns.out / 'checkpoint'} if it exists", file=sys.stderr)
        return 130
    print(json.dumps(summary))
    return 0


def run_merge(ns: argparse.Namespace) -> int:
    from .cli import USER_ERRORS
    from .finetune import merge_adapter

    try:
        out = merge_adapter(ns.model, ns.adapter, ns.out)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}", file=sys.stderr)
    return 0
