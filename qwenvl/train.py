"""Training helpers shared by the recipes (demo-model stages, fine-tuning): which parts train, the compute dtype,
the LR schedule, atomic resumable checkpoints, and the loss log (CSV + a PNG plot drawn with PIL).

The loops themselves live in scripts/, top to bottom, where they can be read.
"""
from __future__ import annotations

import csv
import math
import random
import statistics
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from .model import QWenLMHeadModel
from .quant_kernels import bf16_is_native
from .text import RMSNorm
from .weights import atomic_write


def set_trainable(model: QWenLMHeadModel, vit: bool, adapter: bool, llm: bool) -> None:
    """Freeze or unfreeze the three parts of Qwen-VL (the paper's stages, `fix_vit` of finetune.py).

    ViT = conv1, positional_embedding, ln_pre, resblocks, ln_post, proj; adapter = attn_pool (the
    resampler; its sin-cos `pos_embed` always stays frozen); LLM = everything outside `transformer.visual`.
    """
    visual = model.transformer.visual
    for name, p in model.named_parameters():
        if not name.startswith("transformer.visual."):
            p.requires_grad_(llm)
    visual.requires_grad_(vit)
    visual.attn_pool.requires_grad_(adapter)
    visual.attn_pool.pos_embed.requires_grad_(False)


def bypass_final_norm(model: QWenLMHeadModel) -> None:
    """Replace the LM's final norm `ln_f` by an identity, for its first steps from scratch; undo with
    `restore_final_norm`.

    With ln_f the demo LM (4 layers, width 256) did not learn in-context retrieval (associative recall with the query
    one token before its answer) in 1000 steps, and without it, token embeddings at N(0, 1) and matrices at N(0, 0.05),
    it did (held-out 0.88); put back at step 1000 with its weight at the residual's RMS, training went on to 0.96-1.00
    by step 1400 (experiments/recall_probe.py, docs/demo_model.md).
    """
    model.transformer.ln_f = nn.Identity()


@torch.no_grad()
def restore_final_norm(model: QWenLMHeadModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> float:
    """Put `ln_f` back as an RMSNorm whose weight is the mean RMS of the residual stream entering it on this batch
    (so the logits keep their scale on average); returns that weight."""
    seen = []
    hook = model.transformer.ln_f.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    try:
        model(input_ids, attention_mask=attention_mask)
    finally:
        hook.remove()
    rms = seen[0].float().pow(2).mean(-1).sqrt()[attention_mask.bool()].mean().item()         # over real tokens
    norm = RMSNorm(model.config.hidden_size, model.config.layer_norm_epsilon)
    norm.weight.fill_(rms)
    model.transformer.ln_f = norm
    return rms


TRAIN_DTYPES = ("auto", "bf16", "fp32")


def resolve_train_dtype(dtype: str) -> str:
    """A run's compute dtype, "bf16" (autocast) or "fp32", from "auto" | "bf16" | "fp32".

    "auto" is bf16 where the CPU has bf16 matmul instructions (AVX512-BF16 or AMX: quant_kernels.bf16_is_native)
    and fp32 elsewhere. On AVX2-only CPUs torch emulates bf16 and a backward's bf16 matmuls run ~40x slower than
    float32's: a LoRA step of the demo model (8 samples, 224 px) took 8.6 s in bf16 against 0.32 s in fp32 on an AMD
    EPYC Zen 3 (2026-12-04). An explicit "bf16" is kept there, with a warning.
    """
    if dtype not in TRAIN_DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {TRAIN_DTYPES}")
    if dtype == "auto":
        return "bf16" if bf16_is_native() else "fp32"
    if dtype == "bf16" and not bf16_is_native():
        warnings.warn("this CPU has no bf16 matmul instructions: torch emulates bf16 and training runs many times "
                      "slower than in fp32 (use dtype auto or fp32)", stacklevel=2)
    return dtype


def autocast(dtype: str):
    """The forward's context for a resolved dtype: bf16 autocast on the CPU, or nothing for fp32."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def cosine_lr(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up to `peak`, then cosine decay to `floor * peak` at `total`.

    Example (peak 1, warmup 10, total 110): step 4 -> 0.5, step 10 -> 1.0, step 110 -> 0.1.
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def adamw(params: Iterable[nn.Parameter], lr: float, weight_decay: float = 0.05,
          betas: tuple[float, float] = (0.9, 0.98)) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norms, biases and 1-D tables are not decayed)."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=lr, betas=betas, eps=1e-6)


# --------------------------------------------------------------------------------------------- checkpoints

@dataclass
class TrainState:
    """Everything a killed run needs to continue with the same loss curve."""

    step: int
    model: dict
    optimizer: dict
    python_rng: object
    numpy_rng: dict
    torch_rng: torch.Tensor
    extra: dict


def save_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, step: int,
               rng: random.Random, np_rng: np.random.Generator, extra: dict | None = None) -> None:
    """Write the training state atomically (a kill mid-write leaves the previous file intact)."""
    state = {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "python_rng": rng.getstate(), "numpy_rng": np_rng.bit_generator.state,
             "torch_rng": torch.get_rng_state(), "extra": extra or {}}
    atomic_torch_save(state, path)


def load_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, rng: random.Random,
               np_rng: np.random.Generator) -> tuple[int, dict]:
    """Restore what `save_state` wrote; returns (step, extra)."""
    state = torch.load(path, map_location="cpu", weights_only=False)  # our own file: holds RNG states
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    rng.setstate(state["python_rng"])
    np_rng.bit_generator.state = state["numpy_rng"]
    torch.set_rng_state(state["torch_rng"])
    return state["step"], state["extra"]


def atomic_torch_save(obj: object, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


# --------------------------------------------------------------------------------------------- loss log

class LossLog:
    """Appends `step,stage,loss,lr,extra...` rows to a CSV; a resumed run truncates rows past its step."""

    FIELDS = ("step", "stage", "loss", "lr", "samples_per_s")

    def __init__(self, path: Path, resume_step: int = 0, stage: str | None = None):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = self.read(path)
        kept = [r for r in rows if stage is None or r["stage"] != stage or int(r["step"]) <= resume_step]
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, self.FIELDS)
            writer.writeheader()
            writer.writerows(kept)

    def append(self, **row) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.FIELDS).writerow({k: row.get(k, "") for k in self.FIELDS})

    @staticmethod
    def read(path: Path) -> list[dict]:
        if not path.is_file():
            return []
        with open(path, newline="") as f:
            return list(csv.DictReader(f))


def stage_minutes(rows: list[dict], batches: dict[str, int]) -> dict[str, float]:
    """Minutes each stage's logged steps take at the stage's median rate: steps x batch / median samples/s.

    The median makes it the training time alone: a run stopped and resumed, paused, sharing the CPU for a while, or
    probing inside a stage logs a few slow rows, which the median ignores. Stages not in
    `batches` are left out. E.g. rows of stage "a" at steps 10 / 20 / 30 with rates 20 / 5 / 20 samples/s and batch
    4: 30 x 4 / 20 = 6 s = 0.1 min."""
    minutes = {}
    for stage, batch in batches.items():
        own = [r for r in rows if r["stage"] == stage and r["samples_per_s"]]
        if own:
            rate = statistics.median(float(r["samples_per_s"]) for r in own)
            minutes[stage] = max(int(r["step"]) for r in own) * batch / rate / 60
    return minutes


def plot_losses(csv_path: Path, png_path: Path, width: int = 900, height: int = 420) -> None:
    """A loss-vs-step line chart per stage (log-scale loss), drawn with PIL so no plotting library is needed."""
    rows = [r for r in LossLog.read(csv_path) if r["loss"]]
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    if not rows:
        img.save(png_path)
        return
    stages = list(dict.fromkeys(r["stage"] for r in rows))
    x_of = _stage_offsets(rows, stages)
    losses = [max(float(r["loss"]), 1e-4) for r in rows]
    lo, hi = math.log(min(losses)), math.log(max(losses))
    pad, span = 50, max(1e-6, hi - lo)
    x_max = max(x_of[(r["stage"], int(r["step"]))] for r in rows) or 1
    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
               "#17becf"]
    for k, stage in enumerate(stages):
        pts = [(pad + (width - 2 * pad) * x_of[(r["stage"], int(r["step"]))] / x_max,
                height - pad - (height - 2 * pad) * (math.log(max(float(r["loss"]), 1e-4)) - lo) / span)
               for r in rows if r["stage"] == stage]
        if len(pts) > 1:
            draw.line(pts, fill=colours[k % len(colours)], width=2)
        # each name above where its stage starts, on alternating rows so neighbours do not overlap
        draw.text((min(pts[0][0], width - pad - 90), 8 + 16 * (k % 2)), stage, fill=colours[k % len(colours)])
    draw.rectangle((pad, pad, width - pad, height - pad), outline="black")
    draw.text((5, pad - 12), f"{math.exp(hi):.3g}", fill="black")
    draw.text((5, height - pad), f"{math.exp(lo):.3g}", fill="black")
    draw.text((width // 2 - 60, height - 25), "steps (stages in order); loss, log scale", fill="black")
    img.save(png_path)


def _stage_offsets(rows: list[dict], stages: list[str]) -> dict[tuple[str, int], int]:
    offsets, base = {}, 0
    for stage in stages:
        steps = sorted({int(r["step"]) for r in rows if r["stage"] == stage})
        for s in steps:
            offsets[(stage, s)] = base + s
        base += (steps[-1] if steps else 0) + 1
    return offsets
