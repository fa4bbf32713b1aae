"""TouchStone: an LLM judge scores the model's answer against a reference answer, twice with the two
positions swapped, as OFA-Sys/TouchStone's `eval.py` does it with GPT-4; any OpenAI-compatible judge works.

Data (the official `touchstone_20230831.tsv`, or jsonl with the same fields): question,
human_annotation (a fine-grained description of the image, the judge never sees the image),
gpt4_ha_answer (the reference), category ("a,b" counts for both), task_name, image.

Protocol (official, reproduced): round 1 puts the reference as Assistant 1 and the model as Assistant 2,
round 2 the other way round; the judge is asked at temperature 0 with stop ["\\n"] and its first line
must be exactly "s1 s2"; a reply that does not parse (or an HTTP failure) is retried up to 5 times,
then the round is dropped ("error"). Score = mean of all the model's non-error round scores x 100
(so the two positions are averaged); the same per category.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from .endpoint import message_text, post_chat

SYSTEM_PROMPT = "You are a helpful and precise assistant for checking the quality of the answer."
INSTRUCTION = (
    "We would like to request your feedback on the performance of two AI assistants in response to the user "
    "question and image description displayed above. AI assistants are provided with detailed image description "
    "and questions.\nPlease rate the helpfulness, relevance, accuracy, comprehensiveness of their responses. Each "
    "assistant receives an overall score on a scale of 1 to 10, where a higher score indicates better overall "
    "performance.\nPlease first output a single line containing only two values indicating the scores for "
    "Assistant 1 and 2, respectively. The two scores are separated by a space. In the subsequent line, please "
    "provide a comprehensive explanation of your evaluation, avoiding any potential bias and ensuring that the "
    "order in which the responses were presented does not affect your judgment.")
TEMPLATE = ("[Detailed Image Description]\n{description}\n\n[Question]\n{question}\n\n"
            "[The Start of Assistant 1's Answer]\n{answer_1}\n\n[The End of Assistant 1's Answer]\n\n"
            "[The Start of Assistant 2's Answer]\n{answer_2}\n\n[The End of Assistant 2's Answer]\n\n"
            "[System]\n{instruction}\n\n")
MAX_TRIES = 5


def judge_query(description: str, question: str, answer_1: str, answer_2: str) -> str:
    """The user message the judge sees for one ordering."""
    return TEMPLATE.format(description=description, question=question, answer_1=answer_1, answer_2=answer_2,
                           instruction=INSTRUCTION)


def parse_judge_reply(content: str) -> tuple[float, float]:
    """The two scores on the reply's first line, "s1 s2" with one space; ValueError otherwise.

    Examples: "8 6\\nBecause…" -> (8.0, 6.0); "7.5 7" -> (7.5, 7.0); "8, 6" -> ValueError.
    """
    first = (content + "\nok").strip().split("\n", 1)[0]
    s1, s2 = first.strip().split(" ")
    return float(s1), float(s2)


def ask_judge(call: Callable[[str], str], query: str, tries: int = MAX_TRIES, wait_s: float = 5.0) -> dict:
    """{"score1", "score2", "reason"}; after `tries` failures {"score1": 0, "score2": 0, "reason": "error"}."""
    for attempt in range(tries):
        try:
            content = call(query)
            s1, s2 = parse_judge_reply(content)
            return {"score1": s1, "score2": s2, "reason": content}
        except Exception as e:           # noqa: BLE001 — the official loop retries on any failure
            last = f"{type(e).__name__}: {e}"
            if attempt + 1 < tries:
                time.sleep(wait_s)
    return {"score1": 0, "score2": 0, "reason": "error", "last_failure": last}


def judge_sample(call: Callable[[str], str], description: str, question: str, reference: str, answer: str,
                 tries: int = MAX_TRIES, wait_s: float = 5.0) -> dict:
    """Both rounds: round1 = (reference, model), round2 = (model, reference)."""
    r1 = ask_judge(call, judge_query(description, question, reference, answer), tries, wait_s)
    r2 = ask_judge(call, judge_query(description, question, answer, reference), tries, wait_s)
    return {"round1": {"model1": "reference", "model2": "model", **r1},
            "round2": {"model1": "model", "model2": "reference", **r2}}


def touchstone_scores(judged: Sequence[dict]) -> dict:
    """{"score", "reference_score", "per_category": {cat: {"score", "reference_score"}}, "errors"}
    from judge_sample outputs that also carry "category"."""
    pooled: dict[str, list[float]] = {"model": [], "reference": []}
    per_cat: dict[str, dict[str, list[float]]] = {}
    errors = 0
    for item in judged:
        for rnd in (item["round1"], item["round2"]):
            if rnd["reason"] == "error":
                errors += 1
                continue
            for who, score in ((rnd["model1"], rnd["score1"]), (rnd["model2"], rnd["score2"])):
                pooled[who].append(score)
                for cat in str(item.get("category", "all")).split(","):
                    per_cat.setdefault(cat, {"model": [], "reference": []})[who].append(score)
    return {"score": _mean100(pooled["model"]), "reference_score": _mean100(pooled["reference"]),
            "per_category": {c: {"score": _mean100(v["model"]), "reference_score": _mean100(v["reference"])}
                             for c, v in per_cat.items()},
            "errors": errors}


def _mean100(values: Sequence[float]) -> float | None:
    return None if not values else sum(values) / len(values) * 100


def openai_judge(url: str, model: str = "gpt-4", api_key: str | None = None, timeout: float = 600.0
                 ) -> Callable[[str], str]:
    """A judge call against any OpenAI-compatible server (official settings: temperature 0, stop at "\\n")."""
    def call(query: str) -> str:
        body = {"model": model, "temperature": 0, "stop": ["\n"],
                "messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": query}]}
        return message_text(post_chat(url, body, api_key, timeout))
    return call
