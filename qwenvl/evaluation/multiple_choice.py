"""Multiple choice by likelihood ranking (ScienceQA-IMG, SEED-Bench, MMBench), as
`eval_mm/evaluate_multiple_choice.py`, `mmbench/evaluate_multiple_choice_mmbench.py` and
`seed_bench/eval.py` do it, and MMBench's two circular scorers.

Ranking: for each option letter L the row `prompt + tokenizer(" " + L)` is scored; the option's loss is
the mean cross-entropy of its target tokens; the prediction is the argmin (the first one on a tie).

MMBench (`index` offsets k * 1e6 mark the rotated copies of one question, k = 0..3):
  * `circular_strict`: the official `mmbench_evaluation.py` — a question counts only if every copy
    present is answered right (despite its "global top-1 accuracy" comment, this is CircularEval);
  * `circular_vote`: the official `mmbench_evaluation_tricky.py` ("the same algorithm as the OpenCompass
    server") — the copies vote with the *text* of the chosen option; a tie is broken at random.
    Quirk B1: the official tie-break is unseeded; here it is `random.Random(seed)` over the questions
    in increasing index order, so a run is reproducible.
"""
from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Sequence

import torch
from torch import Tensor

LETTERS = "ABCDE"
CYCLE = 1_000_000


def options_text(choices: Sequence[str]) -> str:
    """e.g. options_text(["cat", "dog"]) == "A. cat\\nB. dog"."""
    if len(choices) > len(LETTERS):
        raise ValueError(f"at most {len(LETTERS)} choices are supported, got {len(choices)}")
    return "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))


def target_losses(logits: Tensor, input_ids: Tensor, target_lengths: Sequence[int]) -> Tensor:
    """Mean CE of each row's last `target_lengths[r]` tokens: logits [R, T, V] of input_ids [R, T] -> [R].

    Position t predicts token t + 1 (the official code feeds ids[:, :-1] and scores ids[:, 1:]).
    Example: one row whose last token has probability 0.5 under the previous position -> [log 2].
    """
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:],
                                           reduction="none")                    # [R, T-1]
    return torch.stack([ce[r, -n:].mean() for r, n in enumerate(target_lengths)])


def rank(losses: Sequence[float]) -> int:
    """Index of the smallest loss, the first on a tie. Example: rank([2.0, 0.5, 0.5]) == 1."""
    if not losses:
        raise ValueError("no options to rank")
    return int(torch.tensor(list(losses), dtype=torch.float64).argmin())


_LEADING_LETTER = re.compile(r"^\W*([A-E])(?![A-Za-z])")
_ANY_LETTER = re.compile(r"(?<![A-Za-z])([A-E])(?![A-Za-z])")


def choice_from_text(text: str, n_choices: int) -> int:
    """The option a free-form answer names (for endpoints, which give no likelihoods), or -1.

    Examples: choice_from_text("B. a dog", 4) == 1; choice_from_text("The answer is C", 4) == 2;
    choice_from_text("none", 4) == -1.
    """
    for pattern in (_LEADING_LETTER, _ANY_LETTER):
        m = pattern.search(text.strip())
        if m and LETTERS.index(m.group(1)) < n_choices:
            return LETTERS.index(m.group(1))
    return -1


def answer_index(answer, n_choices: int) -> int:
    """A gt answer given as an index (ScienceQA/MMBench jsonl) or a letter (SEED-Bench) -> index."""
    if isinstance(answer, bool):
        raise ValueError(f"answer {answer!r} is neither an option index nor a letter")
    if isinstance(answer, int):
        idx = answer
    elif isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().upper() in LETTERS:
        idx = LETTERS.index(answer.strip().upper())
    else:
        raise ValueError(f"answer {answer!r} is neither an option index nor a letter")
    if not 0 <= idx < n_choices:
        raise ValueError(f"answer {answer!r} is out of range for {n_choices} choices")
    return idx


def circular_copies(index: int, choices: Sequence[str], answer: int) -> list[tuple[int, list[str], int]]:
    """The CircularEval copies of a question: copy k has its choices rotated left by k.

    Example: circular_copies(7, ["x", "y", "z"], 2) == [(7, ["x", "y", "z"], 2), (1000007, ["y", "z", "x"], 1),
    (2000007, ["z", "x", "y"], 0)].
    """
    n = len(choices)
    return [(index + k * CYCLE, list(choices[k:]) + list(choices[:k]), (answer - k) % n) for k in range(n)]


def _groups(indexes) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for idx in sorted(indexes):
        groups.setdefault(int(idx % CYCLE), []).append(idx)
    return groups


def circular_strict(predictions: dict[int, int], answers: dict[int, int]) -> dict:
    """Official `mmbench_evaluation.py`: a question is right when all its present copies are right."""
    groups = _groups(predictions)
    correct = sum(all(predictions[i] == answers[i] for i in copies) for copies in groups.values())
    return {"accuracy": correct / len(groups), "correct": correct, "total": len(groups)}


def circular_vote(predictions: dict[int, int], choices: dict[int, Sequence[str]], answers: dict[int, int],
                  seed: int = 0) -> dict:
    """Official `mmbench_evaluation_tricky.py`: majority vote on the chosen option's text (B1: seeded tie-break)."""
    rng = random.Random(seed)
    correct, groups = 0, _groups(predictions)
    for copies in groups.values():
        voted = [choices[i][predictions[i]] if predictions[i] >= 0 else None for i in copies]   # -1: no answer
        truth = choices[copies[-1]][answers[copies[-1]]]
        counts = Counter(voted)
        top = max(counts.values())
        pick = voted[0] if len(counts) == 1 else rng.choice([v for v, c in counts.items() if c == top])
        correct += pick == truth
    return {"accuracy": correct / len(groups), "correct": correct, "total": len(groups)}
