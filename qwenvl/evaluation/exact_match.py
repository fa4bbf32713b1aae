"""Exact-match accuracy of GQA, OCR-VQA and AI2D, as `eval_mm/evaluate_vqa.py` computes it.

A question scores 1 when answer.strip().lower() equals some annotation.strip().lower().
GQA answers are first cleaned (`clean_gqa_answer`); OCR-VQA and AI2D get no cleaning at all.

Official quirk G1 (GQA cleaning), reproduced by default: the splits on "is ", "are ", "a ", "an ",
"the " also fire inside words ("this is a cat" -> "", "tennis shoes" -> "shoes", "sofa bed" -> "bed",
"pizza on a plate" -> "on"), and cutting at the first "." drops decimals ("3.5" -> "3").
`corrected=True` splits on whole words and keeps decimals.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

_GQA_WORDS = ("is ", "are ", "a ", "an ", "the ")


def clean_gqa_answer(answer: str, corrected: bool = False) -> str:
    """The official GQA clean-up. Examples: "The man is wearing a hat." -> "hat"; "cup of coffee" -> "cup";
    "This is a cat" -> "" (official) or "cat" (corrected)."""
    if corrected:
        return _clean_gqa_words(answer)
    text = answer.strip().split(".")[0].split(",")[0].split("!")[0].lower()
    for word in _GQA_WORDS:
        if word in text:
            text = text.split(word)[1]
    if " of" in text:
        text = text.split(" of")[0]
    return text.strip()


def _clean_gqa_words(answer: str) -> str:
    """Whole-word variant: sentence cut at ". ", ",", "!" (not inside numbers), then the text after the
    last of the verbs/articles, then before " of "."""
    text = re.split(r"\.(?!\d)|,|!", answer.strip())[0].lower()
    words = text.split()
    last = max((i for i, w in enumerate(words) if w + " " in _GQA_WORDS), default=-1)
    words = words[last + 1:]
    if "of" in words:
        words = words[:words.index("of")]
    return " ".join(words)


def exact_match(answer: str, annotation: str | Sequence[str]) -> float:
    """1.0 if the stripped, lower-cased answer equals any stripped, lower-cased annotation, else 0.0."""
    anns = [annotation] if isinstance(annotation, str) else list(annotation)
    if not anns:
        raise ValueError("exact match needs at least one annotation per question")
    return max(1.0 if answer.strip().lower() == a.strip().lower() else 0.0 for a in anns)


def exact_match_accuracy(answers: Sequence[str], annotations: Sequence, gqa: bool = False,
                         corrected: bool = False) -> dict:
    """{"accuracy", "per_question", "cleaned"} for parallel lists; `gqa` applies the GQA cleaning first."""
    if len(answers) != len(annotations) or not answers:
        raise ValueError(f"{len(answers)=} and {len(annotations)=} must be equal and non-zero")
    cleaned = [clean_gqa_answer(a, corrected) if gqa else a for a in answers]
    scores = [exact_match(a, ann) for a, ann in zip(cleaned, annotations)]
    return {"accuracy": sum(scores) / len(scores), "per_question": scores, "cleaned": cleaned}
