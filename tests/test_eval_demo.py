"""scripts/eval_demo.py end to end on the tiny random checkpoint: n=2 per set, float and int4, a second
resolution; the summary's structure and value ranges, the table, that a rerun resumes without the model,
and that CIDEr is skipped (not a crash) without Java.

Captions are scored with CIDEr alone here: METEOR's jar takes ~20 s to start on a busy machine, and the caption
metrics themselves are tested against the official outputs in test_eval_metrics.py."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from tiny_checkpoint import write_tiny_checkpoint

ROOT = Path(__file__).parent.parent
SETS = ["grounding_zh", "vqa_en", "ocr_en", "multi_image_zh", "caption_zh", "text_en"]


def load_script():
    """The script as a module (registered first: its dataclasses look their module up)."""
    if "eval_demo" not in sys.modules:
        spec = importlib.util.spec_from_file_location("eval_demo", ROOT / "scripts" / "eval_demo.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["eval_demo"] = module
        spec.loader.exec_module(module)
    return sys.modules["eval_demo"]


@pytest.fixture(scope="module", autouse=True)
def cider_only():
    from pycocoevalcap.cider.cider import Cider

    from qwenvl.evaluation import caption

    with pytest.MonkeyPatch.context() as m:
        m.setattr(caption, "_scorers", lambda spice: [(Cider(), "CIDEr")])
        yield


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    model = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), n_queries=16)
    out = tmp_path_factory.mktemp("eval_demo")
    argv = ["--model", str(model), "--n", "2", "--out", str(out), "--quant", "none", "int4", "--group-size", "32",
            "--resolutions", "56", "28", "--sets", *SETS, "--no-progress"]
    script = load_script()
    return script, argv, out, script.main(argv)


def test_summary_structure_and_ranges(run):
    _, _, out, summary = run
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary, default=str))
    assert summary["n"] == 2 and summary["seed"] == 1234 and summary["mode"] == "chat"
    assert summary["native_image_size"] == 56 and set(summary["quant"]) == {"none", "int4"}
    assert summary["quant"]["int4"] == {"bits": 4, "group_size": 32, "sym": True, "lm_head": False}
    results = summary["results"]
    # 6 sets + vqa corrected = 7 rows per quantization, + ocr_en at 28 px
    assert len(results) == 2 * (len(SETS) + 1 + 1)
    assert {(r["set"], r["quant"], r["image_size"]) for r in results} >= {("ocr_en", q, px) for q in ("none", "int4")
                                                                          for px in (56, 28)}
    for r in results:
        assert r["n"] == 2 and Path(r["out"], "predictions.jsonl").is_file()
        if r["value"] is None:                      # only CIDEr, only without Java
            assert r["task"] == "caption" and "skipped" in r["metrics"]
            continue
        top = 1000 if r["task"] == "caption" else 100       # CIDEr-D x 100 can exceed 100
        assert 0 <= r["value"] <= top and not math.isnan(r["value"]), r
    assert set(summary["drops"]) == {"int4"}


def test_table_rows_and_columns(run):
    _, _, out, summary = run
    table = (out / "table.md").read_text()
    assert "| set | metric | float | int4 |" in table
    for label in ("grounding zh | P@1", "vqa en | VQA acc. corrected", "ocr en @ 28 px | exact match",
                  "multi-image zh | accuracy", "caption zh | CIDEr", "text en | exact match"):
        assert label in table
    assert len(summary["rows"]) == len(SETS) + 2


def test_rerun_resumes_without_the_model(run, monkeypatch):
    script, argv, _, summary = run

    def no_model(*a, **k):
        raise AssertionError("a finished run must not load the model")

    monkeypatch.setattr(script, "load_model", no_model)
    again = script.main(argv)
    assert [r["value"] for r in again["results"]] == [r["value"] for r in summary["results"]]


def test_without_java_cider_is_skipped(run, monkeypatch):
    script, argv, _, summary = run
    monkeypatch.setattr(script, "load_model", lambda *a, **k: pytest.fail("a finished run must not load the model"))
    monkeypatch.setattr(script, "java_ok", lambda: False)
    again = script.main(argv)
    for before, after in zip(summary["results"], again["results"]):
        if before["task"] == "caption":
            assert after["value"] is None and "java" in after["metrics"]["skipped"]
        else:
            assert after["value"] == before["value"]
    assert "| caption zh | CIDEr | n/a | n/a |" in script.make_table(again["results"], ["none", "int4"], 56)[0]


def test_int4_group_size_is_the_largest_that_divides(tmp_path):
    model = write_tiny_checkpoint(tmp_path)            # hidden 64, MLP c_proj input 64: 128 does not divide
    assert load_script().int4_group_size(model) == 64


def test_cjk_tokens():
    assert load_script().cjk_tokens("条纹背景上有两个red圆形，“猫”。") == "条 纹 背 景 上 有 两 个 red 圆 形 猫"
