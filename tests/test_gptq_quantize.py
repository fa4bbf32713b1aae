"""GPTQ int4 quantization (qwenvl/gptq_quantize.py) and `qwenvl quantize --calibration`."""
from __future__ import annotations

import json

import pytest
import torch
from qwen2_vl_tiny import random_image
from tiny_checkpoint import write_tiny_checkpoint

from qwenvl.cli import main
from qwenvl.gptq_quantize import collect_hessians, gptq_codes, gptq_quantize_model
from qwenvl.quantize import Int4Linear, iter_llm_linears, quantize_int4, quantize_model
from qwenvl.weights import load_model


def _dequantize(codes, scales, zeros, group):
    return (codes.float() - zeros.float().repeat_interleave(group, 1)) * scales.repeat_interleave(group, 1)


def _correlated_inputs(n: int, width: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(width, width, generator=g) * 0.3 + torch.eye(width)
    return torch.randn(n, width, generator=g) @ mix


@pytest.mark.parametrize("sym", [True, False])
def test_gptq_moves_the_outputs_less_than_rounding_to_nearest(sym):
    """On correlated inputs (what a layer sees), pushing each column's error onto the rest halves the output error
    (measured 0.54 of RTN's here)."""
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    x = _correlated_inputs(4096, 256)
    hessian = 2 * x.T @ x / x.shape[0]
    rtn, gptq = quantize_int4(w, 64, sym), gptq_codes(w, hessian, 64, sym)
    for codes, _, zeros in (rtn, gptq):
        assert codes.dtype == torch.uint8 and int(codes.max()) <= 15 and zeros.dtype == torch.uint8
    errors = [((x @ (_dequantize(*q, 64) - w).T) ** 2).mean() for q in (rtn, gptq)]
    assert errors[1] < 0.75 * errors[0]


def test_uncorrelated_inputs_give_round_to_nearest_exactly():
    """With H = I the inverse Hessian has no off-diagonal: no error moves, so the codes are RTN's own."""
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(2))
    for a, b in zip(gptq_codes(w, torch.eye(128), 32, True), quantize_int4(w, 32, True)):
        assert torch.equal(a, b)


def test_an_input_never_seen_is_zeroed_not_nan():
    w = torch.randn(8, 64)
    x = _correlated_inputs(256, 64)
    x[:, 5] = 0                                                         # a dead input: H[5, 5] == 0
    codes, scales, zeros = gptq_codes(w, 2 * x.T @ x / 256, 32, True)
    deq = _dequantize(codes, scales, zeros, 32)
    assert deq.isfinite().all() and deq[:, 5].abs().max() <= scales[:, 0].max() / 2 + 1e-6


def test_model_swap_needs_every_hessian(tmp_path):
    model = load_model(write_tiny_checkpoint(tmp_path), "float32")
    ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    hessians = collect_hessians(model, [{"input_ids": ids}])
    assert len(hessians) == len(list(iter_llm_linears(model)))
    assert all(h.shape == (lin.in_features, lin.in_features) for lin, h in hessians.items())
    first = next(iter(hessians))
    with pytest.raises(ValueError, match="no calibration Hessian"):
        gptq_quantize_model(model, {first: hessians[first]}, group_size=32)
    assert not any(isinstance(m, Int4Linear) for m in model.modules())          # refused before any swap
    with pytest.raises(ValueError, match="no tokens"):
        collect_hessians(model, [])


@pytest.fixture
def calibration(tmp_path):
    random_image(56, 56, 0).save(tmp_path / "a.png")
    samples = [
        {"id": "1", "conversations": [{"from": "user", "value": "Picture 1: <img>a.png</img>\nWhat is it?"},
                                      {"from": "assistant", "value": "A picture of noise."}]},
        {"id": "2", "conversations": [{"from": "user", "value": "Hello"}, {"from": "assistant", "value": "Hi!"}]},
    ]
    path = tmp_path / "calib.json"
    path.write_text(json.dumps(samples))
    return path


def test_cli_calibration_writes_a_gptq_checkpoint_the_loader_reads(tmp_path, calibration):
    src = write_tiny_checkpoint(tmp_path / "float")
    out = tmp_path / "int4"
    assert main(["quantize", "--model", str(src), "--bits", "4", "--group-size", "32", "--calibration",
                 str(calibration), "--out", str(out)]) == 0
    model = load_model(out, "float32")
    assert model.config.quantization_config == {"quant_method": "qwenvl", "bits": 4, "group_size": 32, "sym": True}
    rtn = load_model(src, "float32")
    quantize_model(rtn, 4, 32)
    assert any(isinstance(m, Int4Linear) for m in model.modules())
    codes = [m.qweight for m in model.modules() if isinstance(m, Int4Linear)]
    assert any(not torch.equal(a, m.qweight) for a, m in
               zip(codes, (m for m in rtn.modules() if isinstance(m, Int4Linear))))   # GPTQ chose other codes
    ids = torch.randint(0, 1000, (1, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert model(ids).isfinite().all()


@pytest.mark.parametrize("extra, message", [
    (["--bits", "8"], "for --bits 4"),
    (["--bits", "4", "--calibration-samples", "0"], "at least 1"),
    (["--bits", "4", "--group-size", "48"], "does not divide"),
])
def test_cli_calibration_errors_are_clear(tmp_path, calibration, capsys, extra, message):
    src = write_tiny_checkpoint(tmp_path / "float")
    argv = ["quantize", "--model", str(src), "--calibration", str(calibration), "--out", str(tmp_path / "o"), *extra]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_calibration_file_problems_are_clear(tmp_path, capsys):
    src = write_tiny_checkpoint(tmp_path / "float")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    for path, message in ((tmp_path / "missing.json", "not found"), (bad, "not valid JSON")):
        argv = ["quantize", "--model", str(src), "--bits", "4", "--group-size", "32", "--calibration", str(path),
                "--out", str(tmp_path / "o")]
        assert main(argv) == 2
        assert message in capsys.readouterr().err
