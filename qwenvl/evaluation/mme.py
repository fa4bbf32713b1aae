"""MME: acc and acc+ per subtask, perception and cognition totals, as MME's own `calculation.py`
scores the files that `eval_mm/mme/eval.py` writes (`<subtask>.txt`: image TAB question TAB gt TAB response).

Per subtask: acc = share of questions answered right; acc+ = share of images whose two questions are
both right; score = 100 * acc + 100 * acc+ (at most 200). Perception = sum over its 10 subtasks (max
2000), cognition over its 4 (max 800). Reported for Qwen-VL-Chat: perception 1487.58, cognition 360.71.

Quirks of the official scorer, reproduced:
  M1 an answer is read from its first 4 characters after lower-casing: exactly "yes"/"no", else "yes"
     if "yes" occurs in them, else "no" if "no" does ("nothing", "know", "not sure" count as "no"),
     else "other" (always wrong);
  M2 the two questions of an image are paired by position (lines 1-2, 3-4, ...), not by image name;
     an odd number of lines is an error. `pair_by_image=True` groups by image name instead.
  M3 (deviation) the official eval.py writes the raw response, so a response with a newline breaks
     the file; here responses are kept whole in memory and written with newlines/tabs as spaces.
The official run samples with top_p=0.01 (practically greedy); here decoding is greedy.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


@dataclass(frozen=True)
class MMERow:
    image: str
    question: str
    answer: str        # "Yes" / "No"
    response: str


def parse_yes_no(response: str) -> str:
    """"yes", "no" or "other" (M1). Examples: "Yes." -> "yes"; "No, it isn't" -> "no"; "nothing" -> "no";
    "The answer is yes" -> "other"."""
    text = response.lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def subtask_scores(rows: Sequence[MMERow], pair_by_image: bool = False) -> dict:
    """{"acc", "acc_plus", "score", "other", "questions", "images"} of one subtask.

    Example: rows (img1 yes->"Yes", img1 no->"Yes", img2 yes->"yes", img2 no->"no") -> acc 0.75,
    acc+ 0.5, score 125.0.
    """
    gts = [r.answer.lower() for r in rows]
    bad = [g for g in gts if g not in ("yes", "no")]
    if bad:
        raise ValueError(f"MME answers must be Yes or No; got {bad[:3]}")
    preds = [parse_yes_no(r.response) for r in rows]
    right = [g == p for g, p in zip(gts, preds)]
    groups = _image_groups(rows, pair_by_image)
    acc = sum(right) / len(right)
    acc_plus = sum(all(right[i] for i in g) for g in groups) / len(groups)
    return {"acc": acc, "acc_plus": acc_plus, "score": acc * 100 + acc_plus * 100,
            "other": preds.count("other"), "questions": len(rows), "images": len(groups)}


def _image_groups(rows: Sequence[MMERow], pair_by_image: bool) -> list[list[int]]:
    if not rows:
        raise ValueError("an MME subtask has no questions")
    if pair_by_image:
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(rows):
            groups.setdefault(r.image, []).append(i)
        return list(groups.values())
    if len(rows) % 2:
        raise ValueError(f"MME pairs the questions of an image by position (two per image); got {len(rows)} lines")
    return [[i, i + 1] for i in range(0, len(rows), 2)]


def mme_scores(rows_by_subtask: dict[str, Sequence[MMERow]], pair_by_image: bool = False) -> dict:
    """{"subtasks": {name: scores}, "perception", "cognition", "missing": [...], "other_subtasks": [...]}.

    Totals sum the subtasks present (the official script fails on a missing file; here they are listed).
    """
    subtasks = {name: subtask_scores(rows, pair_by_image) for name, rows in rows_by_subtask.items()}
    out: dict = {"subtasks": subtasks}
    for total, names in (("perception", PERCEPTION), ("cognition", COGNITION)):
        score = 0
        for name in names:                              # summed in the official order
            if name in subtasks:
                score += subtasks[name]["score"]
        out[total] = score
    known = set(PERCEPTION) | set(COGNITION)
    out["missing"] = [n for n in PERCEPTION + COGNITION if n not in subtasks]
    out["other_subtasks"] = sorted(n for n in subtasks if n not in known)
    return out


def result_line(row: MMERow) -> str:
    """One line of the official result file (M3: newlines and tabs in the response become spaces)."""
    response = row.response.replace("\r", " ").replace("\n", " ").replace("\t", " ")
    return f"{row.image}\t{row.question}\t{row.answer}\t{response}"
