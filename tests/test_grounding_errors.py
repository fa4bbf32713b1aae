"""scripts/grounding_errors.py: each grounding answer classed against every shape of its (redrawn) scene."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from qwenvl.synthetic import write_grounding_eval
from qwenvl.synthetic_scenes import box_1000

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("grounding_errors", ROOT / "scripts" / "grounding_errors.py")
grounding_errors = importlib.util.module_from_spec(spec)
spec.loader.exec_module(grounding_errors)

SEED = 7


def box_answer(bbox, width: int, height: int) -> str:
    x1, y1, x2, y2 = box_1000(bbox, width, height)
    return f"<box>({x1},{y1}),({x2},{y2})</box>"


@pytest.mark.parametrize("answer, expected", [
    ("<box>(0,0),(499,499)</box>", "right"), ("(500,500),(999,999)", "other shape"),
    ("(0,0),(999,999)", "loose"), ("(600,0),(999,400)", "elsewhere"), ("no box", "elsewhere"),
])
def test_outcome_of_one_answer(answer, expected):
    assert grounding_errors.outcome(answer, [0, 0, 112, 112], [(112, 112, 224, 224)], 224, 224) == expected


def fake_run(tmp_path: Path, n: int) -> tuple[Path, list[str]]:
    """An eval_demo folder with n English grounding samples and, per sample, an answer of a chosen outcome."""
    data = tmp_path / "data"
    write_grounding_eval(data, "en", SEED, n)
    (data / "sets.json").write_text(json.dumps({"seed": SEED, "n": n}))
    records = [json.loads(line) for line in (data / "grounding_en.jsonl").read_text().splitlines()]
    answers, wanted = [], []
    for r in records:
        others = grounding_errors.scene_boxes(SEED, r["id"], "en", r)
        if others and len(wanted) % 2:
            answers.append(box_answer(others[0], r["width"], r["height"]))
            wanted.append("other shape")
        else:
            answers.append(box_answer(r["bbox"], r["width"], r["height"]))
            wanted.append("right")
    run = tmp_path / "runs" / "chat" / "none" / "grounding_en@224"
    run.mkdir(parents=True)
    run.joinpath("predictions.jsonl").write_text(
        "".join(json.dumps({"id": str(r["id"]), "prediction": a}) + "\n" for r, a in zip(records, answers)))
    return tmp_path, wanted


def test_counts_by_number_of_shapes(tmp_path, capsys):
    out, wanted = fake_run(tmp_path, 8)
    assert grounding_errors.main([str(out), "--langs", "en", "--json", str(tmp_path / "boxes.json")]) == 0
    counts = json.loads((tmp_path / "boxes.json").read_text())["en"]
    total = {o: sum(c.get(o, 0) for c in counts.values()) for o in grounding_errors.OUTCOMES}
    assert total == {"right": wanted.count("right"), "other shape": wanted.count("other shape"), "loose": 0,
                     "elsewhere": 0}
    assert total["other shape"] > 0
    assert "| grounding en | all | 8 |" in capsys.readouterr().out


def test_sets_from_another_seed_are_refused(tmp_path):
    out, _ = fake_run(tmp_path, 2)
    (out / "data" / "sets.json").write_text(json.dumps({"seed": SEED + 1, "n": 2}))
    with pytest.raises(SystemExit, match="not written by write_eval_sets"):
        grounding_errors.main([str(out), "--langs", "en"])
