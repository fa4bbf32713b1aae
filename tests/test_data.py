"""The official fine-tune rendering, case by case against the golden file, and the loss helper."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qwenvl.data import IGNORE_INDEX, DataError, Rendered, collate, pad_and_truncate, per_sample_loss, preprocess, render_sft
from qwenvl.tokenizer import QWenTokenizer

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN = json.loads((FIXTURES / "finetune_golden.json").read_text())
CASES = {c["name"]: c for c in GOLDEN["cases"]}


@pytest.fixture(scope="module")
def tok():
    return QWenTokenizer(FIXTURES / "qwen.tiktoken")


@pytest.mark.parametrize("name", sorted(CASES))
def test_official_rendering(name, tok):
    case = CASES[name]
    conv = case["example"]["conversations"]
    if "raises" in case:
        with pytest.raises(DataError):
            render_sft(conv, tok, case["system_message"], case["example"].get("id", "?"))
        return
    ids, labels, mask = pad_and_truncate(render_sft(conv, tok, case["system_message"]), case["max_len"], tok.pad_token_id)
    assert ids.tolist() == case["input_ids"]
    assert labels.tolist() == case["labels"]
    assert mask.tolist() == case["attention_mask"]
    assert (ids.dtype, labels.dtype, mask.dtype) == (torch.int32, torch.int32, torch.bool)


def test_batch_equals_single_calls(tok):
    for group in GOLDEN["batch_checks"]["groups"]:
        names = group["cases"]
        out = preprocess([CASES[n]["example"]["conversations"] for n in names], tok, group["max_len"],
                         CASES[names[0]]["system_message"])
        for i, n in enumerate(names):
            if CASES[n]["system_message"] == CASES[names[0]]["system_message"]:
                assert out["input_ids"][i].tolist() == CASES[n]["input_ids"]


def test_errors_name_the_sample(tok):
    with pytest.raises(DataError, match=r"sample 'abc': turn 0 has role 'system'"):
        render_sft([{"from": "system", "value": "x"}], tok, sample_id="abc")
    with pytest.raises(DataError, match="empty conversation"):
        render_sft([], tok, sample_id="e")


def test_assistant_only_supervises_replies_and_their_end(tok):
    conv = [{"from": "user", "value": "Hi"}, {"from": "assistant", "value": "Hello"}]
    r = render_sft(conv, tok, assistant_only=True)
    kept = [t for t, l in zip(r.input_ids, r.labels) if l != IGNORE_INDEX]
    assert kept == tok.encode("Hello") + [tok.im_end_id]


def test_per_sample_loss_weighs_rows_equally():
    logits = torch.zeros(2, 4, 5)
    labels = torch.tensor([[IGNORE_INDEX, 1, 2, 3], [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 4]])
    loss = per_sample_loss(logits, labels)
    assert torch.allclose(loss, torch.full((2,), torch.log(torch.tensor(5.0)).item()))
    ids, lab, mask = collate([Rendered([1, 2], [1, 2]), Rendered([3], [IGNORE_INDEX])], pad_id=0)
    assert ids.tolist() == [[1, 2], [3, 0]] and mask.tolist() == [[1, 1], [1, 0]] and lab[1].tolist() == [-100, -100]
