"""ChartQA relaxed accuracy (pix2struct's `relaxed_correctness`), as called by `eval_mm/evaluate_vqa.py`.

A numeric answer is right within 5 % relative error, any other answer needs a case-insensitive exact
match; "45%" parses as 0.45; the score of a question is the max over its annotations.

Official quirk C1 (argument order), the default: the script calls `relaxed_correctness(prediction, gt)`
although the function's signature is (target, prediction), so the relative error is divided by the
*prediction* (47.3 vs 45 passes, 42.8 vs 45 fails) and the "target is 0 -> compare strings" branch
tests the prediction. `order="corrected"` passes the gt as the target, as the metric is defined.
Quirk C2: only the model answer is stripped; an annotation "Yes " never matches a text answer (but
float("12 ") still parses). Quirk C3: thousands separators make float() fail ("1,000" != "1000").
"""
from __future__ import annotations

from collections.abc import Sequence

ORDERS = ("official", "corrected")


def _to_float(text: str) -> float | None:
    """float of a number or a percentage; None otherwise. Examples: "45%" -> 0.45, "1e3" -> 1000.0, "1,000" -> None."""
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_correctness(target: str, prediction: str, max_relative_change: float = 0.05) -> bool:
    """|prediction - target| / |target| <= max_relative_change for numbers (target != 0), else
    case-insensitive string equality. Example: relaxed_correctness("45", "47") is True."""
    p, t = _to_float(prediction), _to_float(target)
    if p is not None and t:
        return abs(p - t) / abs(t) <= max_relative_change
    return prediction.lower() == target.lower()


def question_score(answer: str, annotation: str | Sequence[str], order: str = "official") -> float:
    """1.0 or 0.0: max over annotations. Example: question_score("2020", ["2019", "2020"]) == 1.0."""
    if order not in ORDERS:
        raise ValueError(f"unknown ChartQA argument order {order!r}; use one of {ORDERS}")
    anns = [annotation] if isinstance(annotation, str) else list(annotation)
    if not anns:
        raise ValueError("ChartQA needs at least one annotation per question")
    a = answer.strip()
    hits = [relaxed_correctness(a, ann) if order == "official" else relaxed_correctness(ann, a) for ann in anns]
    return float(max(hits))


def relaxed_accuracy(answers: Sequence[str], annotations: Sequence, order: str = "official") -> dict:
    """{"relaxed_accuracy", "per_question"} for parallel lists (each annotation a string or a list)."""
    if len(answers) != len(annotations) or not answers:
        raise ValueError(f"{len(answers)=} and {len(annotations)=} must be equal and non-zero")
    scores = [question_score(a, ann, order) for a, ann in zip(answers, annotations)]
    return {"relaxed_accuracy": sum(scores) / len(scores), "per_question": scores}
