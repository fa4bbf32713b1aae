"""Qwen2-VL through the engine, the server and the CLI (tiny random model, byte-level tokenizer, loopback only).

The engine's greedy tokens equal `qwen2_vl_generation.generate` alone and batched; the server answers
with an image through the `openai` client (streaming and not), honours per-request max_pixels, returns
v2 boxes in `message["boxes"]` and refuses a request over the visual budget with a 400.
"""
from __future__ import annotations

import base64
import io
import json

import openai
import pytest
import torch

from qwen2_vl_tiny import IMAGE, VEND, VSTART, hf_config_dict, prompt, random_image
from qwenvl.cli import main
from qwenvl.engine import Engine, ImageInput, Request
from qwenvl.families import Qwen2VLFamily, family_name
from qwenvl.images import image_digest
from qwenvl.processor import preprocess_images
from qwenvl.qwen2_tokenizer import Qwen2Tokenizer, bytes_to_unicode
from qwenvl.qwen2_vl import Qwen2VL
from qwenvl.qwen2_vl_chat import render_ids
from qwenvl.qwen2_vl_config import Qwen2VLConfig
from qwenvl.qwen2_vl_generation import VisionInputs, generate
from qwenvl.qwen2_vl_weights import save_checkpoint
from qwenvl.sampling import SamplingParams
from qwenvl.server import BackgroundServer, ServeConfig, create_app

# Special tokens inside the tiny vocabulary (1000): the vision ids are the model config's.
SPECIALS = {"<|endoftext|>": 980, "<|im_start|>": 981, "<|im_end|>": 982, "<|object_ref_start|>": 983,
            "<|object_ref_end|>": 984, "<|box_start|>": 985, "<|box_end|>": 986, "<|quad_start|>": 987,
            "<|quad_end|>": 988, "<|vision_start|>": VSTART, "<|vision_end|>": VEND, "<|vision_pad|>": 999,
            "<|image_pad|>": IMAGE, "<|video_pad|>": 996}
STOPS = (982, 980)


def tokenizer_json() -> dict:
    """Bytes only (ids 0..255, no merges) plus the specials: every text encodes, one id per byte."""
    vocab = {c: b for b, c in bytes_to_unicode().items()}
    return {"model": {"type": "BPE", "vocab": vocab, "merges": []},
            "added_tokens": [{"content": t, "id": i} for t, i in SPECIALS.items()]}


@pytest.fixture(scope="module")
def model():
    m = Qwen2VL(Qwen2VLConfig.from_dict(hf_config_dict())).eval()
    m.init_weights(torch.Generator().manual_seed(0), std=0.08)     # wide enough for clear-cut greedy choices
    with torch.no_grad():
        m.lm_head.weight[256:980] = 0      # ids the byte tokenizer lacks never win: the answers are text
    return m.requires_grad_(False)


@pytest.fixture(scope="module")
def tokenizer():
    tok = json.loads(json.dumps(tokenizer_json()))
    vocab = tok["model"]["vocab"]
    return Qwen2Tokenizer(vocab, [], {t["content"]: t["id"] for t in tok["added_tokens"]})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, model):
    d = tmp_path_factory.mktemp("qwen2_vl_tiny")
    save_checkpoint(model, d, dtype=torch.float32)
    (d / "tokenizer.json").write_text(json.dumps(tokenizer_json()))
    random_image(100, 150, 0).save(d / "x.png")
    return d


def image_input(img, **limits) -> ImageInput:
    patches, grid = preprocess_images([img], **limits)
    return ImageInput(image_digest(img), patches, tuple(grid[0].tolist()))


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, do_sample=False, stop_words_ids=tuple((s,) for s in STOPS))


def reference(model, ids, img, n) -> list[int]:
    patches, grid = preprocess_images([img])
    out = generate(model, torch.tensor([ids]), greedy(n), vision=VisionInputs(patches, grid), eos_token_id=STOPS)
    return out[0].tolist()


# ------------------------------------------------------------------------------------------- engine


def test_engine_matches_generate_alone_and_batched(model):
    img, other = random_image(100, 150, 0), random_image(60, 90, 1)
    ids = prompt(5, ("image", 20), 7)                      # 100x150 -> grid 1x8x10 -> 20 pads
    ids2 = prompt(3, ("image", 6), 2)                      # 60x90 -> grid 1x4x6 -> 6 pads
    ref, ref2 = reference(model, ids, img, 8), reference(model, ids2, other, 6)
    engine = Engine(model, max_batch=2, max_len=64, eos_token_id=STOPS[0])
    assert engine.generate([Request(ids, greedy(8), [image_input(img)])]) == [ref]
    engine = Engine(model, max_batch=2, max_len=64, eos_token_id=STOPS[0])
    both = engine.generate([Request(ids, greedy(8), [image_input(img)]),
                            Request(ids2, greedy(6), [image_input(other)])])
    assert both == [ref, ref2]
    assert engine.features.misses == 2 and engine.stats()["prefix_cache"]["entries"] == 0   # v2: no prefix cache


def test_engine_refuses_pads_that_do_not_match_the_grids(model):
    engine = Engine(model, max_batch=1, max_len=64)
    with pytest.raises(ValueError, match="pad tokens"):
        engine.add_request(Request(prompt(2, ("image", 19)), greedy(2), [image_input(random_image(100, 150, 0))]))


# ------------------------------------------------------------------------------------------- server


def data_uri(img) -> str:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def start(model, tokenizer, family=None, **config) -> BackgroundServer:
    config = {"model_name": "tiny2", "max_batch": 2, "max_len": 256, **config}
    return BackgroundServer(create_app(model, tokenizer, None, ServeConfig(**config), family))


def client(server) -> openai.OpenAI:
    return openai.OpenAI(api_key="unused", base_url=server.url + "/v1", max_retries=0, timeout=60)


def image_messages(img, text="What is it?"):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(img)}},
                                         {"type": "text", "text": text}]}]


def test_server_answers_with_an_image_streaming_and_not(model, tokenizer):
    img = random_image(100, 150, 0)
    family = Qwen2VLFamily(model)
    ids = render_ids([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
                     tokenizer, [[1, 8, 10]])
    expected = [t for t in reference(model, ids, img, 6) if t not in STOPS]
    expected_text = tokenizer.decode([t for t in expected if family.visible(tokenizer, t)])
    assert expected_text
    with start(model, tokenizer) as s:
        r = client(s).chat.completions.create(model="tiny2", messages=image_messages(img), max_tokens=6,
                                              temperature=0)
        assert r.choices[0].message.content == expected_text
        assert r.usage.prompt_tokens == len(ids)
        chunks = list(client(s).chat.completions.create(model="tiny2", messages=image_messages(img), max_tokens=6,
                                                        temperature=0, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected_text
        small = client(s).chat.completions.create(model="tiny2", messages=image_messages(img), max_tokens=1,
                                                  temperature=0, extra_body={"max_pixels": 56 * 56})
        assert small.usage.prompt_tokens == len(ids) - 20 + 2                 # 100x150 -> 28x56 -> 1x2 merged


def test_over_the_visual_budget_is_a_400(model, tokenizer):
    with start(model, tokenizer, max_visual_tokens=10) as s:
        with pytest.raises(openai.BadRequestError, match="visual tokens"):
            client(s).chat.completions.create(model="tiny2", messages=image_messages(random_image(100, 150, 0)))
        with pytest.raises(openai.BadRequestError, match="max_pixels"):
            client(s).chat.completions.create(model="tiny2", messages=image_messages(random_image(100, 150, 0)),
                                              extra_body={"max_pixels": 3})
        with pytest.raises(openai.BadRequestError, match="lower min_pixels"):     # what enlarges the image
            client(s).chat.completions.create(model="tiny2", messages=image_messages(random_image(100, 150, 0)),
                                              extra_body={"min_pixels": 200_000})


@pytest.mark.parametrize("limits, fragment", [
    ({"min_pixels": 200_000, "max_pixels": 10_000}, "min_pixels=200000 is larger than max_pixels=10000"),
    ({"max_pixels": 784}, "min_pixels=3136 (the checkpoint's default) is larger than max_pixels=784"),
])
def test_pixel_limits_that_leave_no_size_are_a_400_not_a_500(model, tokenizer, limits, fragment):
    with start(model, tokenizer) as s:
        with pytest.raises(openai.BadRequestError) as info:
            client(s).chat.completions.create(model="tiny2", messages=image_messages(random_image(100, 150, 0)),
                                              max_tokens=2, extra_body=limits)
    assert fragment in str(info.value)


class ScriptedQwen2(torch.nn.Module):
    """The tiny model forced to answer `script` then <|im_end|> (one request at a time)."""

    def __init__(self, inner, script: list[int]):
        super().__init__()
        self.inner, self.config, self.script, self.step = inner, inner.config, script + [STOPS[0]], 0

    def encode_vision(self, pixel_patches, grid_thw):
        return self.inner.encode_vision(pixel_patches, grid_thw)

    def forward(self, input_ids, *args, **kwargs):
        self.step = 0 if input_ids.shape[1] > 1 else self.step + 1
        logits = self.inner(input_ids, *args, **kwargs)
        forced = torch.full_like(logits, -1e4)
        forced[..., self.script[min(self.step, len(self.script) - 1)]] = 0.0
        return forced


def test_v2_box_comes_back_in_message_boxes(model, tokenizer):
    answer = "<|object_ref_start|>the cat<|object_ref_end|><|box_start|>(100,200),(500,600)<|box_end|> here"
    scripted = ScriptedQwen2(model, tokenizer.encode(answer))
    with start(scripted, tokenizer, Qwen2VLFamily(scripted), max_batch=1) as s:
        r = client(s).chat.completions.create(model="tiny2", messages=image_messages(random_image(100, 150, 0)))
        message = r.choices[0].message
        assert message.content == answer and r.choices[0].finish_reason == "stop"
        assert message.model_extra["boxes"] == [
            {"image": 0, "ref": "the cat", "box_1000": [100, 200, 500, 600], "box_px": [15.0, 20.0, 75.0, 60.0]}]
        chunks = list(client(s).chat.completions.create(model="tiny2", stream=True,
                                                        messages=image_messages(random_image(100, 150, 0))))
        assert chunks[-1].choices[0].delta.model_extra["boxes"][0]["ref"] == "the cat"


# ------------------------------------------------------------------------------------------- CLI


def test_cli_chat_with_an_image(model_dir, capsys):
    assert family_name(model_dir) == "qwen2_vl"
    argv = ["chat", "--model", str(model_dir), "--image", str(model_dir / "x.png"), "--greedy",
            "--max-new-tokens", "4", "--dtype", "float32", "--max-pixels", str(56 * 56), "what is it?"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "error" not in captured.err and captured.out.strip()
    assert main(["chat", "--model", str(model_dir), "--image", "/no/such.png", "--dtype", "float32", "q"]) == 2
    assert "error:" in capsys.readouterr().err


def test_cli_draw_reports_odd_v2_boxes(model_dir, tmp_path, monkeypatch, capsys):
    from qwenvl.cli import Qwen2ChatSession

    answer = ("<|object_ref_start|>cat<|object_ref_end|><|box_start|>(100,100),(1500,900)<|box_end|>"
              " <|box_start|>(1,2),(3)<|box_end|>")
    monkeypatch.setattr(Qwen2ChatSession, "_stream", lambda self, turn: answer)
    out = tmp_path / "boxes.png"
    argv = ["chat", "--model", str(model_dir), "--image", str(model_dir / "x.png"), "--dtype", "float32",
            "--max-pixels", str(56 * 56), "--draw", str(out), "where is the cat?"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "(box '(1,2),(3)' is not (x1,y1),(x2,y2) with integers in [0, 1000): not drawn)" in err
    assert ("(box <|object_ref_start|>cat<|object_ref_end|><|box_start|>(100,100),(1500,900)<|box_end|> has "
            "coordinates above 999: drawn clamped to the picture)") in err and out.is_file()


def test_cli_bad_generation_config_is_named_before_any_question(model_dir, tmp_path, capsys):
    import shutil

    bad = tmp_path / "model"
    shutil.copytree(model_dir, bad)
    (bad / "generation_config.json").write_text('{"temperature": -1}')
    assert main(["chat", "--model", str(bad), "--dtype", "float32"]) == 2        # interactive: nothing asked yet
    assert f"{bad / 'generation_config.json'}: temperature=-1 must be >= 0" in capsys.readouterr().err


def test_cli_pixel_limits_that_leave_no_size_are_refused_before_any_question(model_dir, capsys):
    argv = ["chat", "--model", str(model_dir), "--dtype", "float32", "--min-pixels", "200000", "--max-pixels", "10000",
            "--image", str(model_dir / "x.png"), "q"]
    assert main(argv) == 2
    assert "min_pixels=200000 is larger than max_pixels=10000" in capsys.readouterr().err
