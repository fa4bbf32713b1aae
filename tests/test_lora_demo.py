"""scripts/lora_demo.py --smoke end to end on the tiny random checkpoint (with the small test vocabulary of
test_finetune.py): data in the official format, before/after accuracy per group, a PEFT adapter that loads
and merges, the report files, and a rerun that reuses the finished adapter instead of training again."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_finetune import TINY, tiny_vocab

ROOT = Path(__file__).parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(TINY / name, folder / name)
    tiny_vocab(folder / "qwen.tiktoken")
    return folder


def run_demo(model: Path, data: Path, out: Path, task: str = "heart") -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "scripts" / "lora_demo.py"), "--model", str(model), "--data", str(data),
           "--out", str(out), "--smoke", "--threads", "1", "--task", task]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_smoke_run_writes_data_adapter_and_report(model, tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    run_demo(model, data, out)

    train, test = (json.loads((data / f"{s}.json").read_text()) for s in ("train", "test"))
    assert (len(train), len(test)) == (16, 8)
    assert {s["conversations"][1]["value"] for s in test[::2]} == {"heart"}          # even samples are hearts
    assert "heart" not in {s["conversations"][1]["value"] for s in test[1::2]}
    assert all((data / s["conversations"][0]["value"].split("<img>")[1].split("</img>")[0]).is_file() for s in train)

    for name in ("adapter_config.json", "adapter_model.safetensors", "finished.json", "results.md"):
        assert (out / name).is_file(), name
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    results = json.loads((out / "results.json").read_text())
    for when in ("before", "after"):
        assert 0 <= results[when]["heart"] <= 1 and 0 <= results[when]["known shapes"] <= 1
        assert sum(results[when]["answers"].values()) == 8
    assert results["finetune"]["steps"] == 3
    assert 0 < results["trainable_parameters"] < results["model_parameters"]
    assert results["peak_rss_mb"] > 0
    table = (out / "results.md").read_text().splitlines()
    assert table[0].startswith("| held-out questions") and len(table) == 4

    again = run_demo(model, data, out)                       # finished: evaluates the saved adapter, no training
    assert "step 1/" not in again.stderr
    assert json.loads((out / "results.json").read_text())["after"] == results["after"]


def test_french_task_asks_half_the_questions_in_french_with_french_answers(model, tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    run_demo(model, data, out, task="french")
    test = json.loads((data / "test.json").read_text())
    french = {"rouge", "orange", "jaune", "vert", "bleu", "violet", "rose", "marron", "noir"}
    assert all(s["group"] == "in French" and s["conversations"][0]["value"].endswith("Answer in French.")
               and s["conversations"][1]["value"] in french for s in test[::2])
    assert all(s["group"] == "in English" and "French" not in s["conversations"][0]["value"] for s in test[1::2])
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "french" and set(results["after"]) == {"in French", "in English", "answers"}
