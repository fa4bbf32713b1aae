"""The VQA accuracy of VQAv2 / OK-VQA / TextVQA / VizWiz, as the official `eval_mm/vqa_eval.py` computes it.

Per question: for each of the (usually 10) annotators i, acc_i = min(1, #{j != i : gt_j == pred} / 3);
the question's accuracy is the mean over i. Overall and per-type values are round(100 * mean, 2).

Official quirks, reproduced by default (`corrected=False`); `corrected=True` fixes all four:
  Q1 asymmetric normalisation: the prediction is always normalised (punctuation, lower case, number
     words -> digits, articles dropped, contractions restored), the ground truths get the punctuation
     step only, and only when the annotators disagree. So a unanimous "two", "t-shirt" or "dont know"
     can never be matched ("Two" -> "2", "t-shirt" -> "t shirt", "dont" -> "don't").
  Q2 "none" and "one" are number words: "none" -> "0", "the red one" -> "red 1".
  Q3 the period regex is `(?!<=\\d)(\\.)(?!\\d)` (a broken look-behind: every "." not followed by a
     digit goes) and `re.UNICODE` (= 32) is passed as the *count* of `sub`, so at most 32 periods go.
  Q4 leave-one-out compares answer dicts, which differ by `answer_id`; here annotators are simply
     left out by position (what the official code does on real annotation files).
The contraction table is the official one, oddities included: its keys "Im", "Ive", "Id've" are never
hit (words are lower-cased first) and "somebody'd" maps to "somebodyd".
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")    # sic: "(?!<=" is a look-ahead, not a look-behind (Q3)
COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
OFFICIAL_PERIOD_COUNT = 32                           # re.UNICODE passed as sub()'s count (Q3)
ARTICLES = ("a", "an", "the")
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}

# word -> replacement, one pair per line (the official table, including its dead and backwards entries)
_CONTRACTION_LINES = """
aint ain't|arent aren't|cant can't|couldve could've|couldnt couldn't|couldn'tve couldn't've
couldnt've couldn't've|didnt didn't|doesnt doesn't|dont don't|hadnt hadn't|hadnt've hadn't've
hadn'tve hadn't've|hasnt hasn't|havent haven't|hed he'd|hed've he'd've|he'dve he'd've|hes he's
howd how'd|howll how'll|hows how's|Id've I'd've|I'dve I'd've|Im I'm|Ive I've|isnt isn't|itd it'd
itd've it'd've|it'dve it'd've|itll it'll|let's let's|maam ma'am|mightnt mightn't|mightnt've mightn't've
mightn'tve mightn't've|mightve might've|mustnt mustn't|mustve must've|neednt needn't|notve not've
oclock o'clock|oughtnt oughtn't|ow's'at 'ow's'at|'ows'at 'ow's'at|'ow'sat 'ow's'at|shant shan't
shed've she'd've|she'dve she'd've|she's she's|shouldve should've|shouldnt shouldn't
shouldnt've shouldn't've|shouldn'tve shouldn't've|somebody'd somebodyd|somebodyd've somebody'd've
somebody'dve somebody'd've|somebodyll somebody'll|somebodys somebody's|someoned someone'd
someoned've someone'd've|someone'dve someone'd've|someonell someone'll|someones someone's
somethingd something'd|somethingd've something'd've|something'dve something'd've
somethingll something'll|thats that's|thered there'd|thered've there'd've|there'dve there'd've
therere there're|theres there's|theyd they'd|theyd've they'd've|they'dve they'd've|theyll they'll
theyre they're|theyve they've|twas 'twas|wasnt wasn't|wed've we'd've|we'dve we'd've|weve we've
werent weren't|whatll what'll|whatre what're|whats what's|whatve what've|whens when's|whered where'd
wheres where's|whereve where've|whod who'd|whod've who'd've|who'dve who'd've|wholl who'll|whos who's
whove who've|whyll why'll|whyre why're|whys why's|wont won't|wouldve would've|wouldnt wouldn't
wouldnt've wouldn't've|wouldn'tve wouldn't've|yall y'all|yall'll y'all'll|y'allll y'all'll
yall'd've y'all'd've|y'alld've y'all'd've|y'all'dve y'all'd've|youd you'd|youd've you'd've
you'dve you'd've|youll you'll|youre you're|youve you've
"""
CONTRACTIONS = dict(pair.split(" ") for line in _CONTRACTION_LINES.strip().splitlines() for pair in line.split("|"))


def process_punctuation(text: str, period_count: int = OFFICIAL_PERIOD_COUNT) -> str:
    """The official punctuation step: each mark is deleted when some mark-space pair or a digit,digit
    occurs in the text, else replaced by a space; then periods not followed by a digit are deleted
    (at most `period_count` of them; 0 = all).

    Examples: "red/white" -> "red white"; "1,000" -> "1000"; "Yes." -> "Yes"; "(yes)" -> " yes ".
    """
    out = text
    for p in PUNCT:
        if p + " " in text or " " + p in text or COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out, count=period_count)


def process_digit_article(text: str) -> str:
    """Lower-case, number words -> digits, drop articles, restore contractions, single spaces.

    Examples: "A dog" -> "dog"; "Two" -> "2"; "the red one" -> "red 1"; "dont know" -> "don't know".
    """
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(text: str, period_count: int = OFFICIAL_PERIOD_COUNT) -> str:
    """What the official code does to a prediction: newlines/tabs -> spaces, strip, punctuation, digits/articles.

    Example: "  No, it is not.\\n" -> "no it is not".
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text, period_count))


def compared_gt_answers(gt_answers: Sequence[str], corrected: bool = False) -> list[str]:
    """The ground truths as they are compared: officially punctuation-processed only when they disagree (Q1).

    Examples: ["t-shirt"] * 10 -> unchanged; ["t-shirt"] * 9 + ["shirt"] -> ["t shirt"] * 9 + ["shirt"].
    """
    if corrected:
        return [normalize_answer(a, period_count=0) for a in gt_answers]
    if len(set(gt_answers)) > 1:
        return [process_punctuation(a) for a in gt_answers]
    return list(gt_answers)


def question_accuracy(prediction: str, gt_answers: Sequence[str], corrected: bool = False) -> float:
    """Mean over annotators of min(1, matches among the others / 3).

    Example: prediction "no" with gts 7 x "yes" + 3 x "no" -> (7 * 1 + 3 * 2/3) / 10 = 0.9.
    """
    if not gt_answers:
        raise ValueError("VQA accuracy needs at least one ground-truth answer")
    pred = normalize_answer(prediction, period_count=0 if corrected else OFFICIAL_PERIOD_COUNT)
    gts = compared_gt_answers(gt_answers, corrected)
    accs = []
    for i in range(len(gts)):
        matches = sum(1 for j, a in enumerate(gts) if j != i and a == pred)
        accs.append(min(1, float(matches) / 3))
    return float(sum(accs)) / len(accs)


@dataclass(frozen=True)
class VQAEntry:
    question_id: object
    prediction: str
    answers: tuple[str, ...]
    question_type: str | None = None
    answer_type: str | None = None


def vqa_accuracy(entries: Sequence[VQAEntry], corrected: bool = False, digits: int = 2) -> dict:
    """{"overall", "perQuestionType", "perAnswerType", "perQuestion"} like the official `VQAEval.accuracy`
    (+ per-question raw values). The types are skipped when the entries carry none."""
    if not entries:
        raise ValueError("no VQA entries to score")
    raw = [question_accuracy(e.prediction, e.answers, corrected) for e in entries]
    out = {"overall": _percent(raw, digits)}
    for key, attr in (("perQuestionType", "question_type"), ("perAnswerType", "answer_type")):
        groups: dict[str, list[float]] = {}
        for e, acc in zip(entries, raw):
            if getattr(e, attr) is not None:
                groups.setdefault(getattr(e, attr), []).append(acc)
        if groups:
            out[key] = {k: _percent(v, digits) for k, v in groups.items()}
    out["perQuestion"] = {str(e.question_id): acc for e, acc in zip(entries, raw)}
    return out


def _percent(values: Sequence[float], digits: int) -> float:
    """round(100 * sum / n, digits), in the official order of operations (it matters in the last bit)."""
    return round(100 * float(sum(values)) / len(values), digits)
