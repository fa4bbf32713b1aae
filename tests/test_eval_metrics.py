"""Evaluation metrics against the official scripts' outputs (tests/fixtures/eval_golden.json), plus
MME, likelihood ranking, MMBench circular evaluation and the TouchStone protocol on hand-computed cases."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from qwenvl.evaluation import anls, caption, chartqa, exact_match, mme, multiple_choice, refcoco, touchstone
from qwenvl.evaluation import vqa_accuracy as vqa

GOLDEN = json.loads((Path(__file__).parent / "fixtures" / "eval_golden.json").read_text())


# ------------------------------------------------------------------ VQA accuracy


def _vqa_entries():
    g = GOLDEN["vqa_accuracy"]["inputs"]
    preds = {r["question_id"]: r["answer"] for r in g["results_file"]}
    return [vqa.VQAEntry(a["question_id"], preds[a["question_id"]], tuple(x["answer"] for x in a["answers"]),
                         a["question_type"], a["answer_type"]) for a in g["annotation_file"]["annotations"]]


def test_vqa_accuracy_matches_the_official_evaluator():
    out = vqa.vqa_accuracy(_vqa_entries())
    expected = GOLDEN["vqa_accuracy"]["outputs"]["accuracy"]
    assert out["overall"] == expected["overall"]
    assert out["perQuestionType"] == expected["perQuestionType"]
    assert out["perAnswerType"] == expected["perAnswerType"]


def test_vqa_per_question_values_and_normalisation():
    for case in GOLDEN["vqa_accuracy"]["outputs"]["per_question"]:
        pred, gts = case["prediction"], case["gt_answers"]
        assert vqa.normalize_answer(pred) == case["normalized_prediction"], case["note"]
        assert vqa.compared_gt_answers(gts) == case["gt_answers_as_compared"], case["note"]
        acc = vqa.question_accuracy(pred, gts)
        assert acc == case["accuracy_raw"], case["note"]
        assert round(100 * acc, 2) == case["evalQA"]


def test_vqa_corrected_variant_fixes_the_quirks():
    assert vqa.question_accuracy("Two", ["two"] * 10, corrected=True) == 1.0          # Q1
    assert vqa.question_accuracy("t-shirt", ["t-shirt"] * 10, corrected=True) == 1.0
    assert vqa.question_accuracy("dont know", ["dont know"] * 10, corrected=True) == 1.0
    assert vqa.question_accuracy("wait" + "." * 40, ["wait"] * 10, corrected=True) == 1.0   # Q3
    assert vqa.question_accuracy("wait" + "." * 40, ["wait"] * 10) == 0.0
    assert len(vqa.CONTRACTIONS) == 120


# ------------------------------------------------------------------ ANLS


def test_anls_matches_the_official_script():
    g = GOLDEN["anls"]
    gt = g["inputs"]["ground_truth_file"]["data"]
    subm = {r["questionId"]: r["answer"] for r in g["inputs"]["submission_file"]}
    out = anls.anls([subm[q["questionId"]] for q in gt], [q["answers"] for q in gt])
    assert out["anls"] == g["outputs"]["overall_anls"]
    for case, score in zip(g["outputs"]["per_question"], out["per_question"]):
        assert score == case["score"], case["note"]
        for d in case["details"]:
            assert anls.levenshtein(d["gt_norm"], d["pred_norm"]) == d["distance"]
            assert anls.normalized_distance(case["prediction"], d["gt"]) == d["nl"]


def test_anls_corrected_length_uses_normalised_strings():
    assert anls.anls_score("abd      ", ["abc"]) == 1 - 1 / 9
    assert anls.anls_score("abd      ", ["abc"], corrected=True) == 1 - 1 / 3


# ------------------------------------------------------------------ ChartQA


def test_chartqa_both_argument_orders():
    g = GOLDEN["chartqa_relaxed_accuracy"]
    entries = g["inputs"]["entries"]
    answers, anns = [e["answer"] for e in entries], [e["annotation"] for e in entries]
    official = chartqa.relaxed_accuracy(answers, anns)
    corrected = chartqa.relaxed_accuracy(answers, anns, order="corrected")
    assert official["relaxed_accuracy"] == g["outputs"]["official_relaxed_accuracy"]
    assert corrected["relaxed_accuracy"] == g["outputs"]["corrected_order_relaxed_accuracy_NOT_OFFICIAL"]
    for case, o, c in zip(g["outputs"]["per_case"], official["per_question"], corrected["per_question"]):
        assert o == case["official_score"], case["note"]
        assert c == case["corrected_order_score"], case["note"]
    with pytest.raises(ValueError, match="argument order"):
        chartqa.question_score("1", "1", order="backwards")


# ------------------------------------------------------------------ exact match


@pytest.mark.parametrize("dataset", ["gqa_testdev", "ocrvqa_test", "ai2diagram_test"])
def test_exact_match_with_official_cleaning(dataset):
    d = GOLDEN["exact_match"]["datasets"][dataset]
    answers = [c["answer"] for c in d["per_case"]]
    anns = [c["annotation"] for c in d["per_case"]]
    out = exact_match.exact_match_accuracy(answers, anns, gqa=dataset.startswith("gqa"))
    assert out["accuracy"] == d["accuracy"]
    for case, cleaned, score in zip(d["per_case"], out["cleaned"], out["per_question"]):
        assert cleaned == case["answer_after_cleaning"], case["note"]
        assert score == case["score"], case["note"]


def test_gqa_corrected_cleaning_splits_whole_words():
    fix = exact_match.clean_gqa_answer
    assert [fix(a, corrected=True) for a in ["This is a cat", "tennis shoes", "sofa bed", "3.5", "cup of coffee",
                                             "The man is wearing a hat."]] == \
        ["cat", "tennis shoes", "sofa bed", "3.5", "cup", "hat"]


# ------------------------------------------------------------------ RefCOCO


def test_grounding_parse_iou_and_precision():
    g = GOLDEN["grounding"]["outputs"]
    for case in g["per_case"]:
        off = case["official_div999"]
        assert list(refcoco.parse_first_box(case["answer"])) == off["parsed_box"], case["note"]
        px = refcoco.to_pixel_box(off["parsed_box"], case["width"], case["height"])
        assert px[0].tolist() == off["pixel_box"], case["note"]
        for scale, ref in ((999, off), (1000, case["variant_div1000_NOT_OFFICIAL"])):
            iou = refcoco.grounding_iou(case["answer"], case["gt_bbox"], case["width"], case["height"], scale)
            if ref["iou_is_nan"]:
                assert math.isnan(iou), case["note"]
            else:
                assert iou == pytest.approx(ref["iou"], rel=1e-6, abs=1e-7), case["note"]
    args = ([c["answer"] for c in g["per_case"]], [c["gt_bbox"] for c in g["per_case"]],
            [(c["width"], c["height"]) for c in g["per_case"]])
    official = refcoco.precision_at_1(*args)
    assert official["precision@1"] == g["official_precision_at_1"] and official["correct"] == g["official_correct"]
    assert refcoco.precision_at_1(*args, scale=1000)["precision@1"] == g["variant_div1000_precision_at_1_NOT_OFFICIAL"]


# ------------------------------------------------------------------ captions (pycocoevalcap, Java)


@pytest.mark.skipif(shutil.which("java") is None, reason="the PTB tokenizer and METEOR need Java")
def test_caption_metrics_match_pycocoevalcap_run_by_the_official_script():
    g = GOLDEN["caption"]
    out = caption.caption_scores(g["inputs"]["ground_truth"], g["inputs"]["results"])
    assert out["overall"] == g["outputs"]["overall"]
    assert out["per_image"] == g["outputs"]["per_image"]


def test_caption_inputs_need_one_prediction_per_image():
    gt = GOLDEN["caption"]["inputs"]["ground_truth"]
    with pytest.raises(ValueError, match="exactly one predicted caption"):
        caption.caption_inputs(gt, GOLDEN["caption"]["inputs"]["results"][:-1])
    with pytest.raises(ValueError, match="not in the ground truth"):
        caption.caption_inputs(gt, [{"image_id": 5, "caption": "x"}])


# ------------------------------------------------------------------ MME (hand-computed)


def _mme(rows):
    return [mme.MMERow(f"{img}.png", q, gt, resp) for img, q, gt, resp in rows]


def test_mme_yes_no_parsing_reads_the_first_four_characters():
    cases = {"Yes": "yes", "no": "no", "Yes, it is.": "yes", "No.": "no", "nothing": "no", "I know": "other",
             "know": "no", "The answer is yes": "other", "": "other", "yesno": "yes", " yes": "yes"}
    assert {r: mme.parse_yes_no(r) for r in cases} == cases


def test_mme_subtask_acc_acc_plus_and_totals():
    # count: image 1 both right, image 2 one right, image 3 none right ("other" is wrong)
    count = _mme([(1, "q", "Yes", "Yes"), (1, "q", "No", "No."), (2, "q", "Yes", "yes"), (2, "q", "No", "Yes"),
                  (3, "q", "Yes", "maybe"), (3, "q", "No", "yes")])
    s = mme.subtask_scores(count)
    assert (s["acc"], s["acc_plus"], s["other"]) == (3 / 6, 1 / 3, 1)
    assert s["score"] == pytest.approx(50 + 100 / 3)
    ocr = _mme([(1, "q", "Yes", "Yes"), (1, "q", "No", "No")])                        # 200
    code = _mme([(1, "q", "Yes", "No"), (1, "q", "No", "No")])                       # acc 0.5, acc+ 0 -> 50
    out = mme.mme_scores({"count": count, "OCR": ocr, "code_reasoning": code, "shapes": ocr})
    assert out["perception"] == pytest.approx(50 + 100 / 3 + 200)
    assert out["cognition"] == 50
    assert "existence" in out["missing"] and out["other_subtasks"] == ["shapes"]


def test_mme_pairs_by_position_unless_asked_by_image():
    rows = _mme([(1, "q", "Yes", "Yes"), (2, "q", "Yes", "Yes"), (1, "q", "No", "Yes"), (2, "q", "No", "No")])
    assert mme.subtask_scores(rows)["acc_plus"] == 0.5                   # pairs (1,2) right, (1,2) half
    assert mme.subtask_scores(rows, pair_by_image=True)["acc_plus"] == 0.5
    rows = _mme([(1, "q", "Yes", "Yes"), (2, "q", "No", "No"), (2, "q", "Yes", "Yes"), (1, "q", "No", "Yes")])
    assert mme.subtask_scores(rows)["acc_plus"] == 0.5
    assert mme.subtask_scores(rows, pair_by_image=True)["acc_plus"] == 0.5
    with pytest.raises(ValueError, match="two per image"):
        mme.subtask_scores(rows[:3])
    with pytest.raises(ValueError, match="Yes or No"):
        mme.subtask_scores(_mme([(1, "q", "maybe", "yes"), (1, "q", "No", "no")]))
    assert mme.result_line(mme.MMERow("a.png", "Is it?", "Yes", "Yes\nreally\tso")) == "a.png\tIs it?\tYes\tYes really so"


# ------------------------------------------------------------------ likelihood ranking (hand-computed)


def test_target_losses_is_the_mean_ce_of_the_option_tokens():
    v = 4
    logits = torch.zeros(2, 4, v)
    logits[0, 2] = torch.tensor([0.0, math.log(3), 0.0, 0.0])      # p(token 1 | pos 2) = 3/6 = 0.5
    logits[1, 1] = torch.tensor([math.log(2), 0.0, 0.0, 0.0])      # p(token 0 | pos 1) = 2/5
    logits[1, 2] = torch.tensor([0.0, 0.0, 0.0, math.log(5)])      # p(token 3 | pos 2) = 5/8
    ids = torch.tensor([[2, 2, 2, 1], [2, 2, 0, 3]])
    losses = multiple_choice.target_losses(logits, ids, [1, 2])
    assert losses[0].item() == pytest.approx(math.log(2))
    assert losses[1].item() == pytest.approx((math.log(5 / 2) + math.log(8 / 5)) / 2)


def test_rank_picks_the_smallest_loss_and_the_first_on_ties():
    assert multiple_choice.rank([2.0, 0.5, 0.5, 3.0]) == 1
    assert multiple_choice.rank([1.0]) == 0
    with pytest.raises(ValueError):
        multiple_choice.rank([])


def test_choice_prompts_answers_and_free_text():
    assert multiple_choice.options_text(["cat", "dog"]) == "A. cat\nB. dog"
    assert multiple_choice.answer_index("C", 4) == 2 and multiple_choice.answer_index(1, 2) == 1
    with pytest.raises(ValueError, match="out of range"):
        multiple_choice.answer_index("E", 4)
    texts = {"B": 1, "B. a dog": 1, "(C)": 2, "The answer is D.": 3, "A": 0, "none": -1, "E": -1, "Apple": -1}
    assert {t: multiple_choice.choice_from_text(t, 4) for t in texts} == texts


def test_mmbench_circular_scorers():
    copies = multiple_choice.circular_copies(7, ["x", "y", "z"], 2)
    assert copies == [(7, ["x", "y", "z"], 2), (1000007, ["y", "z", "x"], 1), (2000007, ["z", "x", "y"], 0)]
    choices = {i: c for i, c, _ in copies} | {i: c for i, c, _ in multiple_choice.circular_copies(8, ["p", "q"], 0)}
    answers = {i: a for i, _, a in multiple_choice.circular_copies(7, ["x", "y", "z"], 2)} | {8: 0, 1000008: 1}
    # question 7: copies pick z, z, x -> strict wrong, vote "z" right; question 8: both right
    preds = {7: 2, 1000007: 1, 2000007: 1, 8: 0, 1000008: 1}
    assert multiple_choice.circular_strict(preds, answers) == {"accuracy": 0.5, "correct": 1, "total": 2}
    assert multiple_choice.circular_vote(preds, choices, answers)["correct"] == 2
    # a 1-1 tie is broken by the seeded generator: the same seed gives the same answer
    tie = {8: 0, 1000008: 0}
    runs = {multiple_choice.circular_vote(tie, choices, answers, seed=s)["correct"] for s in range(20)}
    assert runs == {0, 1}
    assert multiple_choice.circular_vote(tie, choices, answers, seed=3) == multiple_choice.circular_vote(tie, choices, answers, seed=3)


# ------------------------------------------------------------------ TouchStone protocol (stub judge)


def test_touchstone_parses_the_first_line_exactly():
    assert touchstone.parse_judge_reply("8 6\nbecause") == (8.0, 6.0)
    assert touchstone.parse_judge_reply("7.5 7") == (7.5, 7.0)
    for bad in ("8, 6", "8  6", "eight six", ""):
        with pytest.raises(ValueError):
            touchstone.parse_judge_reply(bad)


def test_touchstone_swaps_positions_and_averages():
    seen = []

    def judge(query):                     # prefers whatever answer says "good", wherever it stands
        seen.append(query)
        a1 = query.split("[The Start of Assistant 1's Answer]\n")[1].split("\n\n[The End")[0]
        return "9 5" if a1 == "good" else "4 8"

    item = touchstone.judge_sample(judge, "a red ball", "What is it?", reference="good", answer="bad", wait_s=0)
    assert item["round1"]["score2"] == 5 and item["round2"]["score1"] == 4
    assert "[Detailed Image Description]\na red ball" in seen[0] and seen[0].endswith("order in which the responses "
                                                                                      "were presented does not affect your judgment.\n\n")
    item["category"] = "recognition,description"
    out = touchstone.touchstone_scores([item])
    assert out["score"] == pytest.approx((5 + 4) / 2 * 100) and out["reference_score"] == pytest.approx(850)
    assert set(out["per_category"]) == {"recognition", "description"}


def test_touchstone_retries_then_drops_a_round():
    replies = iter(["garbage", "7 3"] + ["bad"] * 5)
    item = touchstone.judge_sample(lambda q: next(replies), "d", "q", "ref", "ans", wait_s=0)
    assert item["round1"]["score1"] == 7 and item["round2"]["reason"] == "error"
    out = touchstone.touchstone_scores([item])
    assert out["score"] == 300 and out["errors"] == 1
