"""`qwenvl chat`: one-shot and interactive, with clear errors that keep the session alive."""
from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
from PIL import Image

from qwenvl.cli import main
from qwenvl.config import GenerationConfig, QWenConfig
from qwenvl.weights import save_random_checkpoint

VOCAB = Path(__file__).parent / "fixtures" / "qwen.tiktoken"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_model")
    cfg = QWenConfig.from_dict(dict(vocab_size=151936, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                    kv_channels=32, intermediate_size=128, torch_dtype="float32",
                                    visual=dict(image_size=56, patch_size=14, width=32, layers=1, heads=2,
                                                mlp_ratio=2.0, output_dim=64, n_queries=64)))
    save_random_checkpoint(cfg, d, generation_config=GenerationConfig(max_new_tokens=5))
    shutil.copy(VOCAB, d / "qwen.tiktoken")
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
