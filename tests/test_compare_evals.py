"""scripts/compare_evals.py: the shipping rule (2 standard errors for accuracies, 15% for CIDEr) on two summaries."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
spec = importlib.util.spec_from_file_location("compare_evals", ROOT / "scripts" / "compare_evals.py")
compare_evals = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare_evals)


def summary(values: dict[str, float], n: int = 300, seed: int = 4321) -> dict:
    return {"seed": seed, "n": n, "results": [
        {"set": name, "variant": "", "quant": "none", "image_size": 224, "n": n, "value": value,
         "metric": "CIDEr" if name.startswith("caption") else "accuracy"} for name, value in values.items()]}


def write(tmp_path: Path, name: str, content: dict) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(content))
    return path


def test_the_docstrings_worked_example():
    j = compare_evals.judge(summary({"grounding_en": 13.3})["results"][0], summary({"grounding_en": 6.3})["results"][0])
    assert j["se"] == pytest.approx(2.41, abs=0.01)
    assert j["limit"] == pytest.approx(8.5, abs=0.05)
    assert not j["passes"]


def test_accuracy_within_two_standard_errors_passes_and_beyond_fails():
    base = summary({"vqa_en": 65.3})["results"][0]
    se = 100 * ((0.653 * 0.347 + 0.6 * 0.4) / 300) ** 0.5          # ~3.9 points at these values
    assert compare_evals.judge(base, {**base, "value": 60.0})["passes"] == (65.3 - 60.0 <= 2 * se)
    assert compare_evals.judge(base, {**base, "value": 65.3 - 2.2 * 3.9})["passes"] is False
    assert compare_evals.judge(base, {**base, "value": 90.0})["passes"] is True


def test_cider_has_a_relative_limit():
    base = summary({"caption_en": 186.8})["results"][0]
    assert compare_evals.judge(base, {**base, "value": 160.0})["passes"] is True     # 14.3% lower
    assert compare_evals.judge(base, {**base, "value": 158.0})["passes"] is False    # 15.4% lower


def test_main_exit_status_and_unmatched_rows(tmp_path, capsys):
    base = write(tmp_path, "a.json", summary({"grounding_en": 13.3, "caption_en": 186.8, "text_en": 56.7}))
    good = write(tmp_path, "b.json", summary({"grounding_en": 12.0, "caption_en": 190.0, "ocr_en": 3.0}))
    bad = write(tmp_path, "c.json", summary({"grounding_en": 6.3, "caption_en": 190.0}))
    assert compare_evals.main([str(base), str(good)]) == 0
    out = capsys.readouterr().out
    assert "passes the rule" in out and "only in one summary: ('text_en'" in out and "('ocr_en'" in out
    assert compare_evals.main([str(base), str(bad)]) == 1
    assert "fails the rule on: grounding_en" in capsys.readouterr().out


def test_bad_inputs_are_clear_errors(tmp_path, capsys):
    base = write(tmp_path, "a.json", summary({"vqa_en": 60.0}))
    other_sets = write(tmp_path, "b.json", summary({"vqa_en": 60.0}, n=100))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    for argv in ([str(base), str(other_sets)], [str(base), str(broken)], [str(base), str(tmp_path / "missing.json")]):
        with pytest.raises(SystemExit) as e:
            compare_evals.main(argv)
        assert e.value.code == 2
    err = capsys.readouterr().err
    assert "different sets" in err and "not a readable eval_demo summary" in err
