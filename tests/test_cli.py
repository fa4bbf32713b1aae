"""`qwenvl chat`: one-shot and interactive, with clear errors that keep the session alive."""
from __future__ import annotations

import io

import pytest
from PIL import Image

from tiny_checkpoint import write_tiny_checkpoint
from qwenvl.cli import main
from qwenvl.config import GenerationConfig



@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_model")
    write_tiny_checkpoint(d, n_queries=64, generation_config=GenerationConfig(max_new_tokens=5))
    Image.new("RGB", (30, 20), (0, 200, 0)).save(d / "g.png")
    return d


def test_one_question_with_an_image(model_dir, capsys):
    assert main(["chat", "--model", str(model_dir), "--image", str(model_dir / "g.png"), "--greedy", "hi"]) == 0
    assert capsys.readouterr().out.strip() != ""


def test_missing_image_is_a_clear_error(model_dir, capsys):
    assert main(["chat", "--model", str(model_dir), "--image", "/no/such.png", "hi"]) == 2
    assert "error:" in capsys.readouterr().err


def test_wrong_model_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["chat", "--model", str(tmp_path), "hi"]) == 2
    assert "config.json" in capsys.readouterr().err


def test_interactive_session_keeps_history_through_errors(model_dir, monkeypatch, capsys):
    lines = [":image /no/such.png", "first", ":image " + str(model_dir / "g.png"), "second", ":clear", "third", ":quit"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    assert main(["chat", "--model", str(model_dir), "--greedy"]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("error:") == 1          # the missing image, reported once, session goes on


def test_draw_writes_the_picture_when_the_answer_has_a_box(model_dir, tmp_path, monkeypatch):
    from qwenvl import api

    monkeypatch.setattr(api.QWenVL, "chat_stream",
                        lambda self, *a, **k: iter(["<ref>green</ref><box>(100,100),(900,900)</box>"]))
    out = tmp_path / "boxes.png"
    assert main(["chat", "--model", str(model_dir), "--image", str(model_dir / "g.png"), "--draw", str(out), "where?"]) == 0
    drawn = Image.open(out)
    assert drawn.size == (30, 20)


@pytest.mark.parametrize("out, fragment", [
    ("no/such/dir/boxes.png", "does not exist"),
    (".", "is a directory"),
    ("boxes.xyz", "unknown image extension"),
])
def test_draw_path_is_checked_before_answering(model_dir, tmp_path, monkeypatch, capsys, out, fragment):
    from qwenvl import api

    asked = []
    monkeypatch.setattr(api.QWenVL, "chat_stream",
                        lambda self, *a, **k: asked.append(a) or iter(["<box>(1,1),(9,9)</box>"]))
    monkeypatch.chdir(tmp_path)
    assert main(["chat", "--model", str(model_dir), "--image", str(model_dir / "g.png"), "--draw", out, "where?"]) == 2
    assert fragment in capsys.readouterr().err and asked == []     # refused before the model answered


def test_interactive_draw_to_a_bad_path_keeps_the_conversation(model_dir, tmp_path, monkeypatch, capsys):
    from qwenvl import api

    histories = []
    def answer(self, tok, query, history, **kwargs):
        histories.append(list(history))
        return iter(["<box>(100,100),(900,900)</box>"])

    monkeypatch.setattr(api.QWenVL, "chat_stream", answer)
    lines = [":image " + str(model_dir / "g.png"), "first", f":draw {tmp_path}/missing/x.png", f":draw {tmp_path}",
             f":draw {tmp_path}/ok.png", "second", ":quit"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    assert main(["chat", "--model", str(model_dir)]) == 0
    err = capsys.readouterr().err
    assert "does not exist" in err and "is a directory" in err and (tmp_path / "ok.png").is_file()
    assert len(histories[1]) == 1                    # the second question still had the first turn


@pytest.mark.parametrize("argv, fragment", [
    (["chat", "--max-new-tokens", "-1", "hi"], "--max-new-tokens: -1 is not a positive integer"),
    (["chat", "--max-new-tokens", "ten", "hi"], "'ten' is not an integer"),
    (["chat", "--min-pixels", "0", "hi"], "--min-pixels: 0 is not a positive integer"),
    (["serve", "--port", "70000"], "--port: 70000 is not a port number"),
    (["serve", "--max-batch", "0"], "--max-batch: 0 is not a positive integer"),
    (["serve", "--kv-budget-mb", "0"], "--kv-budget-mb: 0 is not a number > 0"),
    (["serve", "--feature-cache-mb", "nan"], "--feature-cache-mb: nan is not a number >= 0"),
])
def test_bad_flag_values_are_refused_by_name(argv, fragment, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and fragment in capsys.readouterr().err


def test_qwen2_only_flags_on_a_qwen_vl_model_are_an_error(model_dir, capsys):
    assert main(["chat", "--model", str(model_dir), "--min-pixels", "5000", "hi"]) == 2
    assert "--min-pixels needs a Qwen2-VL checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("config_bytes, fragment", [
    (b"[]", "must hold a JSON object {...}, got a list"),
    (b"\xff\xfe{}", "config.json is not valid JSON"),
    (b'{"visual": null}', "'visual' must be an object"),
])
def test_corrupt_config_json_is_a_clear_error(model_dir, tmp_path, capsys, config_bytes, fragment):
    import shutil

    bad = tmp_path / "model"
    shutil.copytree(model_dir, bad)
    (bad / "config.json").write_bytes(config_bytes)
    assert main(["chat", "--model", str(bad), "hi"]) == 2
    assert fragment in capsys.readouterr().err


def test_malformed_and_out_of_range_answer_boxes_are_reported(model_dir, tmp_path, monkeypatch, capsys):
    from qwenvl import api

    answer = "<box>(1,2),(3)</box> and <box>(1000,1000),(2000,2000)</box>"
    monkeypatch.setattr(api.QWenVL, "chat_stream", lambda self, *a, **k: iter([answer]))
    out = tmp_path / "boxes.png"
    assert main(["chat", "--model", str(model_dir), "--image", str(model_dir / "g.png"), "--draw", str(out), "?"]) == 0
    err = capsys.readouterr().err
    assert "box '(1,2),(3)' is not (x1,y1),(x2,y2)" in err and "not drawn" in err
    assert "(1000,1000),(2000,2000)</box> has coordinates above 999: drawn clamped" in err and out.is_file()


@pytest.mark.parametrize("fmt, box", [("qwen_vl", "<box>{}</box>"), ("qwen2_vl", "<|box_start|>{}<|box_end|>")])
def test_odd_answer_boxes_are_reported_in_both_box_formats(capsys, fmt, box):
    from qwenvl.cli import _report_odd_boxes
    from qwenvl.grounding import BoxFormat

    answer = " ".join(box.format(b) for b in ("(1,2),(3)", "(1000,5),(2000,6)", "(9,9),(1,1)", "(1,2),(3,4)"))
    _report_odd_boxes(answer, BoxFormat(fmt))   # format_box refuses these now: the report must not use it
    err = capsys.readouterr().err.splitlines()
    assert err == ["(box '(1,2),(3)' is not (x1,y1),(x2,y2) with integers in [0, 1000): not drawn)",
                   f"(box {box.format('(1000,5),(2000,6)')} has coordinates above 999: drawn clamped to the picture)",
                   f"(box {box.format('(9,9),(1,1)')} has its corners swapped: drawn with x1 <= x2 and y1 <= y2)"]


@pytest.mark.parametrize("field, value, fragment", [("temperature", -1, "temperature=-1 must be >= 0"),
                                                    ("top_p", 2, "top_p=2 must be in (0, 1]")])
def test_bad_sampling_values_in_generation_config_name_the_file_at_load(model_dir, tmp_path, capsys, field, value,
                                                                        fragment):
    import json
    import shutil

    bad = tmp_path / "model"
    shutil.copytree(model_dir, bad)
    path = bad / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), field: value}))
    assert main(["chat", "--model", str(bad)]) == 2                  # interactive: refused before any question
    assert f"{path}: {fragment}" in capsys.readouterr().err
