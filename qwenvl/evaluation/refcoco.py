"""RefCOCO / RefCOCO+ / RefCOCOg Precision@1 (IoU >= 0.5), as `eval_mm/evaluate_grounding.py` computes it.

The model continues the prompt `<img>…</img><ref>{sent}</ref><box>`; its decoded answer (special
tokens skipped) is searched with `\\((.*?)\\),\\((.*?)\\)`, the first match is read as (x1,y1),(x2,y2),
divided by 999, scaled by the image width/height and compared with the gt pixel box in float32.

Official quirks, all reproduced (R1 is the only one with a switch, `scale=1000`):
  R1 the model's [0, 1000) coordinates are divided by 999, not 1000 (999 lands on the image edge);
  R2 only the FIRST match counts, and the corners must be written "(a,b),(c,d)" with no space between;
     an earlier "(" makes the lazy regex swallow text, which then fails to parse;
  R3 any parse failure (no match, no comma, not two numbers, float() error) gives the box (0,0,0,0);
     float() is lenient (spaces, decimals, negatives, "1e2" pass);
  R4 no clipping, no corner reordering: swapped corners give zero intersection, a one-axis swap a
     negative area; a zero union gives NaN, which is a miss.
  R5 (not reproduced) the official data loader uses drop_last=True, which silently skips the last
     incomplete batch of every rank; here every sample is scored.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
from torch import Tensor

BOX_PATTERN = re.compile(r"\((.*?)\),\((.*?)\)")
OFFICIAL_SCALE = 999
ZERO_BOX = (0.0, 0.0, 0.0, 0.0)


def parse_first_box(answer: str) -> tuple[float, float, float, float]:
    """(x1, y1, x2, y2) in model units from the first "(a,b),(c,d)", or (0, 0, 0, 0) on any failure.

    Examples: "<ref>dog</ref><box>(100,200),(500,800)</box>" -> (100.0, 200.0, 500.0, 800.0);
    "(100,200), (500,800)" -> (0.0, 0.0, 0.0, 0.0) (a space between the corners: no match).
    """
    found = BOX_PATTERN.findall(answer)
    if not found:
        return ZERO_BOX
    first, second = found[0]
    if "," not in first or "," not in second:
        return ZERO_BOX
    try:
        x1, y1 = (float(v) for v in _exactly_two(first.split(",")))
        x2, y2 = (float(v) for v in _exactly_two(second.split(",")))
    except ValueError:
        return ZERO_BOX
    return (x1, y1, x2, y2)


def _exactly_two(parts: list[str]) -> list[str]:
    if len(parts) != 2:
        raise ValueError(f"expected two numbers, got {len(parts)}")
    return parts


def to_pixel_box(box: Sequence[float], width: float, height: float, scale: int = OFFICIAL_SCALE) -> Tensor:
    """float32 [1, 4]: box / scale, x times width, y times height (the official op order, in float32).

    Example: (0, 0, 999, 999) at 500x400 -> [[0, 0, 500, 400]] with scale 999.
    """
    px = torch.tensor(box, dtype=torch.float32).view(-1, 4) / scale
    px[:, 0::2] *= width
    px[:, 1::2] *= height
    return px


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU [N, M] of xyxy boxes a [N, 4] and b [M, 4], torchvision's formula (areas may be negative)."""
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = torch.max(a[:, None, :2], b[:, :2])                                     # [N, M, 2]
    rb = torch.min(a[:, None, 2:], b[:, 2:])                                     # [N, M, 2]
    wh = (rb - lt).clamp(min=0)
    inter = wh[:, :, 0] * wh[:, :, 1]
    return inter / (area_a[:, None] + area_b - inter)


def grounding_iou(answer: str, gt_bbox: Sequence[float], width: float, height: float,
                  scale: int = OFFICIAL_SCALE) -> float:
    """IoU (float32 value as a Python float; NaN possible) of the answer's first box with the gt pixel box."""
    pred = to_pixel_box(parse_first_box(answer), width, height, scale)
    gt = torch.tensor(gt_bbox, dtype=torch.float32).view(-1, 4)
    return box_iou(pred, gt).item()


def precision_at_1(answers: Sequence[str], gt_bboxes: Sequence[Sequence[float]], sizes: Sequence[tuple[int, int]],
                   scale: int = OFFICIAL_SCALE, threshold: float = 0.5) -> dict:
    """{"precision@1", "correct", "total", "ious"}; sizes are (width, height); NaN IoU is a miss."""
    if not (len(answers) == len(gt_bboxes) == len(sizes)) or not answers:
        raise ValueError(f"{len(answers)=}, {len(gt_bboxes)=}, {len(sizes)=} must be equal and non-zero")
    ious = [grounding_iou(a, g, w, h, scale) for a, g, (w, h) in zip(answers, gt_bboxes, sizes)]
    correct = sum(1 for iou in ious if not math.isnan(iou) and iou >= threshold)
    return {"precision@1": correct / len(ious), "correct": correct, "total": len(ious),
            "ious": [None if math.isnan(i) else i for i in ious]}
