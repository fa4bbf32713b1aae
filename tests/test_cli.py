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
