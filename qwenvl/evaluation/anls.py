"""ANLS (Average Normalized Levenshtein Similarity) of DocVQA / InfographicVQA, as the official
`eval_mm/infographicsvqa_eval.py` computes it (threshold 0.5).

Per question: nl = distance / length for every gt answer; score = 1 - min(nl), set to 0 when below
the threshold (exactly 0.5 is kept). Overall = sum of scores / number of questions.

The distance is taken on normalised strings (strip, lower, whitespace collapsed; no punctuation removal).
Official quirk A1, reproduced by default: the denominator `length` is max(len(gt.upper()),
len(pred.upper())) of the RAW strings, so extra spaces in a prediction raise its score ("abd      " vs
"abc" scores 1 - 1/9) and characters whose upper case is longer count twice ("ﬁ" -> "FI").
`corrected=True` measures the length on the normalised strings.
"""
from __future__ import annotations

from collections.abc import Sequence

THRESHOLD = 0.5


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insert, delete, substitute; cost 1 each). Example: levenshtein("abcd", "abxy") == 2."""
    if len(a) > len(b):
        a, b = b, a
    row = list(range(len(a) + 1))
    for j, cb in enumerate(b):
        new = [j + 1]
        for i, ca in enumerate(a):
            new.append(row[i] if ca == cb else 1 + min(row[i], row[i + 1], new[-1]))
        row = new
    return row[-1]


def _norm(s: str) -> str:
    return " ".join(s.strip().lower().split())


def normalized_distance(prediction: str, gt: str, corrected: bool = False) -> float:
    """distance(normalised) / length (A1: raw upper-cased lengths unless corrected); 0.0 when both are empty.

    Examples: ("1,235", "1,234") -> 0.2; ("abd      ", "abc") -> 1/9 (official) or 1/3 (corrected).
    """
    p, g = _norm(prediction), _norm(gt)
    length = max(len(g), len(p)) if corrected else max(len(gt.upper()), len(prediction.upper()))
    return 0.0 if length == 0 else float(levenshtein(g, p)) / float(length)


def anls_score(prediction: str, answers: Sequence[str], threshold: float = THRESHOLD,
               corrected: bool = False) -> float:
    """1 - min over answers of the normalised distance; 0 when that is below `threshold`.

    Example: anls_score("1998.", ["1998", "the year 1998"]) == 0.8.
    """
    if not answers:
        raise ValueError("ANLS needs at least one ground-truth answer")
    score = 1 - min(normalized_distance(prediction, a, corrected) for a in answers)
    return 0 if score < threshold else score


def anls(predictions: Sequence[str], answers: Sequence[Sequence[str]], threshold: float = THRESHOLD,
         corrected: bool = False) -> dict:
    """{"anls": overall, "per_question": [scores]} for parallel lists of predictions and gt answer lists."""
    if len(predictions) != len(answers) or not answers:
        raise ValueError(f"{len(predictions)=} and {len(answers)=} must be equal and non-zero")
    scores = [anls_score(p, a, threshold, corrected) for p, a in zip(predictions, answers)]
    total = 0
    for s in scores:                                    # summed in order, as the official loop does
        total += s
    return {"anls": total / len(scores), "per_question": scores}
