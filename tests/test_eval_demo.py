"""scripts/eval_demo.py end to end on the tiny random checkpoint: n=2 per set, float and int4, a second
resolution; the summary's structure and value ranges, the table, that a rerun resumes without the model,
and that CIDEr is skipped (not a crash) without Java.

Captions are scored with CIDEr alone here: METEOR's jar takes ~20 s to start on a busy machine, and the caption
metrics themselves are tested against the official outputs in test_eval_metrics.py."""
from __future__ import annotations

import dataclasses
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
    assert summary["int4_group_size"] == 32
    assert set(summary["wall_minutes"]) == set(summary["cpu_minutes"]) == {"float", "int4"}
    assert all(m >= 0 for m in summary["wall_minutes"].values())
    results = summary["results"]
    # 6 sets + vqa corrected = 7 rows per quantization, + ocr_en at 28 px
    assert len(results) == 2 * (len(SETS) + 1 + 1)
    assert {(r["set"], r["quant"], r["image_size"]) for r in results} >= {("ocr_en", q, px) for q in ("none", "int4")
                                                                          for px in (56, 28)}
    for r in results:
        assert r["n"] == 2 and Path(r["out"], "predictions.jsonl").is_file() and r["seconds"] >= 0
        if r["value"] is None:                      # only CIDEr, only without Java
            assert r["task"] == "caption" and "skipped" in r["metrics"]
            continue
        top = 1000 if r["task"] == "caption" else 100       # CIDEr-D x 100 can exceed 100
        assert 0 <= r["value"] <= top and not math.isnan(r["value"]), r
    assert set(summary["drops"]) == {"int4"}


def test_table_rows_and_columns(run):
    _, _, out, summary = run
    table = (out / "table.md").read_text()
    assert "| task | lang | metric | float | int4 | int4 drop |" in table
    assert "int4 symmetric, group size 32" in table
    assert "a share of 2 answers at 50 has a standard error of 35.4 points" in table     # 50 / sqrt(2)
    for label in ("| grounding | zh | P@1", "| vqa | en | VQA acc. |", "| ocr | en @ 28 px | exact match |",
                  "| multi-image | zh | accuracy |", "| caption | zh | CIDEr |", "| text | en | exact match |"):
        assert label in table
    assert "vqa en, VQA acc. with --corrected answers: float" in table
    assert len(summary["rows"]) == len(SETS) + 1          # one per (task, language), + ocr en at 28 px
    body = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(body) == len(SETS) + 1 and all(line.count("|") == 7 for line in body)


def test_table_drops_are_float_minus_quantized():
    script = load_script()
    results = [{"family": "vqa", "lang": "zh", "image_size": 224, "metric": "VQA acc.", "quant": q, "value": v,
                "variant": ""} for q, v in (("none", 50.0), ("int8", 47.5), ("int4", None))]
    results.append({**results[0], "variant": "corrected", "value": 60.0})
    text, extra = script.make_table(results, ["none", "int8", "int4"], 224)
    assert "| vqa | zh | VQA acc. | 50.0 | 47.5 | n/a | 2.5 | n/a |" in text
    assert extra["rows"]["vqa zh"]["drop int8"] == 2.5 and extra["drops"]["int8"]["max_drop"] == 2.5
    assert extra["corrected"] == {"vqa zh": {"float": 60.0}} and "int4" not in extra["drops"]


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
    assert "| caption | zh | CIDEr | n/a | n/a | n/a |" in script.make_table(again["results"], ["none", "int4"], 56)[0]


def test_a_failed_load_does_not_block_a_rerun_with_other_settings(run, tmp_path, monkeypatch):
    script, argv, _, _ = run
    model = argv[argv.index("--model") + 1]
    args = ["--model", model, "--n", "1", "--out", str(tmp_path), "--quant", "int4", "--sets", "vqa_en",
            "--no-progress"]
    with monkeypatch.context() as m:
        m.setattr(script, "load_model", lambda *a, **k: (_ for _ in ()).throw(ValueError("truncated checkpoint")))
        with pytest.raises(SystemExit, match="truncated checkpoint"):
            script.main(args + ["--group-size", "64"])
    summary = script.main(args + ["--group-size", "32"])          # other settings, same run folder
    run_json = json.loads(Path(summary["results"][0]["out"], "run.json").read_text())
    assert run_json["quant"]["group_size"] == 32 and summary["results"][0]["n"] == 1


def test_a_group_size_that_does_not_divide_is_refused_before_any_run(run, tmp_path):
    script, argv, _, _ = run
    model = argv[argv.index("--model") + 1]                 # LLM linears read 64 inputs
    with pytest.raises(SystemExit, match="use --group-size 64"):
        script.main(["--model", model, "--n", "1", "--out", str(tmp_path), "--quant", "none", "int4",
                     "--group-size", "128", "--sets", "vqa_en"])
    assert not (tmp_path / "runs").exists()


def test_zh_captions_are_asked_the_training_prompt(run):
    from qwenvl.synthetic_tasks import CAPTION_PROMPTS

    script, _, out, _ = run
    assert script.ZH_CAPTION_PROMPT == CAPTION_PROMPTS["zh"][0] and script.EN_CAPTION_PROMPT == CAPTION_PROMPTS["en"][0]
    by_name = {s.name: s for s in script.SETS}
    for name, prompt in (("caption_zh", CAPTION_PROMPTS["zh"][0]), ("caption_en", CAPTION_PROMPTS["en"][0])):
        _, samples = script.read_set(by_name[name], out / "data" / f"{name}.json", True, 2)
        assert samples and all(s.prompt.endswith(prompt) for s in samples), samples[0].prompt
    with pytest.raises(ValueError, match="to replace"):
        script.zh_caption_prompt(dataclasses.replace(samples[0], prompt="Picture 1: <img>a.png</img>\n描述"))


def test_int4_group_size_is_the_largest_that_divides(tmp_path):
    model = write_tiny_checkpoint(tmp_path)            # hidden 64, MLP c_proj input 64: 128 does not divide
    assert load_script().int4_group_size(model) == 64


def test_int4_asym_quantizes_with_zero_points(tmp_path):
    from qwenvl.quantize import Int4Linear

    models = load_script().Models(write_tiny_checkpoint(tmp_path), group_size=32)
    assert models.scheme("int4-asym") == {"bits": 4, "group_size": 32, "sym": False, "lm_head": False}
    assert models.scheme("int4")["sym"] is True
    int4 = [m for m in models.get("int4-asym").modules() if isinstance(m, Int4Linear)]
    assert int4 and not any(m.sym for m in int4)


def test_cjk_tokens():
    assert load_script().cjk_tokens("条纹背景上有两个red圆形，“猫”。") == "条 纹 背 景 上 有 两 个 red 圆 形 猫"
