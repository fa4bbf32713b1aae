"""Our int8 / int4 weight-only schemes: accuracy vs float, packing, save/load round trip, the CLI."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from qwenvl.cli import DEMO_MODEL_DIR, main
from qwenvl.quantize import (Int4Linear, Int8Linear, _rtn_int4, pack_int4, quantize_int4, quantize_model,
                             unpack_nibbles)
from qwenvl.tokenizer import QWenTokenizer
from qwenvl.weights import load_model

FLOAT = Path(__file__).parent / "fixtures" / "qwen_vl_tiny_gptq" / "float"   # sizes are multiples of 128


def _cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def _logits(model):
    ids = torch.randint(0, 990, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(ids)


def test_pack_and_quantize_worked_examples():
    assert pack_int4(torch.tensor([[1, 2]], dtype=torch.uint8)).tolist() == [[0x21]]
    codes = torch.randint(0, 16, (3, 8), dtype=torch.uint8)
    assert torch.equal(unpack_nibbles(pack_int4(codes)), codes)
    w = torch.tensor([[0.7, -0.35]])
    q, scales, zeros = _rtn_int4(w.view(1, 1, 2), sym=True, clip=1.0)
    assert q.flatten().tolist() == [15, 4] and scales.item() == pytest.approx(0.1) and zeros.item() == 8
    q, scales, zeros = quantize_int4(w, group_size=2, sym=True)          # the clip search does better here
    err = ((q.float() - zeros.float()) * scales - w).pow(2).sum().item()
    assert err < (0.4 - 0.35) ** 2 and scales.item() == pytest.approx(0.095)


# Random Gaussian weights are the worst case for 4 bits (no outlier structure to exploit): RTN with group 128
# gives ~0.10 relative error per linear here, AutoGPTQ's own packing of the same model reaches cosine 0.981,
# our clip search 0.985 (sym) / 0.987 (asym). The 0.99 int4 target is for trained weights.
@pytest.mark.parametrize("bits, sym, floor", [(8, True, 0.999), (4, True, 0.983), (4, False, 0.985)])
def test_quantized_logits_stay_close(bits, sym, floor):
    ref = _logits(load_model(FLOAT, "float32"))
    model = load_model(FLOAT, "float32")
    scheme = quantize_model(model, bits, 128, sym)
    assert model.config.quantization_config == scheme
    kinds = {type(m) for m in model.modules()}
    assert (Int8Linear if bits == 8 else Int4Linear) in kinds
    assert torch.nn.Linear in kinds                                    # lm_head and the vision tower stay float
    assert _cosine(_logits(model), ref) >= floor


# Trained weights (the shipped demo model, group 64: 128 does not divide its 704-wide MLP input) meet the issue's
# targets: measured 0.99999 (int8), 0.9971 (int4 sym), 0.9973 (int4 asym) on the shipped model (session 26).
@pytest.fixture(scope="module")
def demo_float_logits():
    """(ids, float logits) of the shipped demo model on a short bilingual prompt, computed once."""
    tok = QWenTokenizer.from_pretrained(DEMO_MODEL_DIR)
    ids = torch.tensor([tok.encode("What colour is the circle? red blue 红色 the square is left of the star")])
    with torch.no_grad():
        return ids, load_model(DEMO_MODEL_DIR, "float32").eval()(ids)


@pytest.mark.parametrize("bits, sym, floor", [(8, True, 0.999), (4, True, 0.99), (4, False, 0.99)])
def test_quantized_demo_model_logits_stay_close(demo_float_logits, bits, sym, floor):
    ids, ref = demo_float_logits
    model = load_model(DEMO_MODEL_DIR, "float32").eval()
    quantize_model(model, bits, 64, sym)
    with torch.no_grad():
        assert _cosine(model(ids), ref) >= floor


@pytest.mark.parametrize("bits", [8, 4])
def test_cli_round_trip(bits, tmp_path):
    src = tmp_path / "float"
    shutil.copytree(FLOAT, src)
    out = tmp_path / f"int{bits}"
    assert main(["quantize", "--model", str(src), "--bits", str(bits), "--out", str(out)]) == 0
    reloaded = load_model(out, "float32")
    assert reloaded.config.quantization_config["bits"] == bits
    direct = load_model(FLOAT, "float32")
    quantize_model(direct, bits)
    assert torch.equal(_logits(reloaded), _logits(direct))
    assert main(["quantize", "--model", str(out), "--bits", "8", "--out", str(tmp_path / "again")]) == 2


def test_group_size_must_divide_the_inputs():
    with pytest.raises(ValueError, match="divisible"):
        Int4Linear.from_linear(torch.nn.Linear(176, 8), 128)


def test_lm_head_option_quantizes_it_and_round_trips(tmp_path):
    from qwenvl.weights import save_checkpoint

    model = load_model(FLOAT, "float32")
    scheme = quantize_model(model, 4, 128, lm_head=True)
    assert scheme["lm_head"] is True and isinstance(model.lm_head, Int4Linear)
    save_checkpoint(model, tmp_path)
    reloaded = load_model(tmp_path, "float32")
    assert isinstance(reloaded.lm_head, Int4Linear)
    assert torch.equal(_logits(reloaded), _logits(model))


def test_qwen2_vl_decoder_linears_are_swapped_too():
    from qwenvl.qwen2_vl import Qwen2VL
    from qwenvl.qwen2_vl_config import Qwen2VLConfig

    config = Qwen2VLConfig.from_dict({
        "vocab_size": 1000, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "rope_scaling": {"mrope_section": [8, 12, 12]},
        "image_token_id": 995, "video_token_id": 996, "vision_start_token_id": 997, "vision_end_token_id": 998,
        "vision_config": {"depth": 1, "embed_dim": 32, "num_heads": 4, "hidden_size": 128}})
    model = Qwen2VL(config)
    model.init_weights(torch.Generator().manual_seed(0))
    ids = torch.randint(0, 990, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids)
        quantize_model(model, 8, lm_head=True)
        quantized = model(ids)
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) == 2 * 7 + 1
    assert _cosine(quantized, ref) >= 0.999


def test_a_group_size_that_does_not_divide_a_layer_is_refused_with_a_hint_and_nothing_swapped(tmp_path, capsys):
    model = load_model(FLOAT, "float32")
    widths = {m.in_features for m in model.transformer.h.modules() if isinstance(m, torch.nn.Linear)}
    group = 2 * max(widths)                                          # divides none of them
    with pytest.raises(ValueError, match=f"group size {group} does not divide .* use --group-size 128"):
        quantize_model(model, 4, group)
    assert not any(isinstance(m, Int4Linear) for m in model.modules())
    with pytest.raises(ValueError, match="even"):
        quantize_model(model, 4, 0)
    assert main(["quantize", "--model", str(FLOAT), "--bits", "4", "--group-size", str(group),
                 "--out", str(tmp_path / "q")]) == 2
    assert "use --group-size" in capsys.readouterr().err


def test_cli_refuses_ignored_flags_and_an_out_that_would_lose_a_checkpoint(tmp_path, capsys):
    src = tmp_path / "float"
    shutil.copytree(FLOAT, src)
    (tmp_path / "file").write_text("x")
    done = tmp_path / "done"
    assert main(["quantize", "--model", str(src), "--bits", "8", "--out", str(done)]) == 0
    cases = [(["--bits", "8", "--group-size", "64"], "--group-size and --asym are for --bits 4"),
             (["--bits", "8", "--asym"], "--group-size and --asym are for --bits 4"),
             (["--bits", "4", "--calibration-samples", "4"], "--calibration-samples needs --calibration"),
             (["--bits", "8", "--out", str(src)], "is the input checkpoint"),
             (["--bits", "8", "--out", str(done)], "already holds a checkpoint"),
             (["--bits", "8", "--out", str(tmp_path / "file")], "is a file, not a folder"),
             (["--bits", "8", "--out", str(tmp_path / "file" / "sub")], "cannot create the folder")]
    capsys.readouterr()
    for extra, message in cases:
        argv = ["quantize", "--model", str(src), *(["--out", str(tmp_path / "o")] if "--out" not in extra else []),
                *extra]
        assert main(argv) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert load_model(src, "float32").config.quantization_config is None          # the input is untouched
    assert not (tmp_path / "o").exists()


def test_cli_names_a_qwen2_vl_checkpoint(tmp_path, capsys):
    import json

    from qwen2_vl_tiny import hf_config_dict

    (tmp_path / "q2").mkdir()
    (tmp_path / "q2" / "config.json").write_text(json.dumps(hf_config_dict()))
    assert main(["quantize", "--model", str(tmp_path / "q2"), "--bits", "8", "--out", str(tmp_path / "o")]) == 2
    assert "is a Qwen2-VL checkpoint's" in capsys.readouterr().err
