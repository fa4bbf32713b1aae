"""Loading the official Qwen-VL-Chat-Int4 (GPTQ) layout without AutoGPTQ, bit for bit against its packer."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qwenvl.images import load_image, preprocess_v1
from qwenvl.quantize import GPTQLinear, unpack_int4
from qwenvl.weights import load_model

GPTQ = Path(__file__).parent / "fixtures" / "qwen_vl_tiny_gptq"


@pytest.fixture(scope="module")
def int4_model():
    return load_model(GPTQ / "int4", dtype="float32")


def _linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, GPTQLinear)}


def test_unpack_nibble_order():
    word = torch.tensor([[0x76543210]], dtype=torch.int32)
    assert unpack_int4(word, 0).flatten().tolist() == list(range(8))
    assert unpack_int4(word, 1).flatten().tolist() == list(range(8))
    negative = torch.tensor([[-1]], dtype=torch.int32)                  # 0xFFFFFFFF
    assert unpack_int4(negative, 0).flatten().tolist() == [15] * 8


def test_codes_zeros_and_weights_are_exact(int4_model):
    ref = load_file(str(GPTQ / "dequantized.safetensors"))
    linears = _linears(int4_model)
    assert len(linears) == 10
    for name, lin in linears.items():
        q, zero = lin.codes()
        assert torch.equal(q.t(), ref[f"{name}.q"]), name
        assert torch.equal(zero, ref[f"{name}.zero"]), name
        assert torch.equal(lin.dequantize(), ref[f"{name}.exact_f32"]), name
        assert torch.equal(lin.dequantize().half(), ref[name]), name         # the fp16-rounded product


def test_linear_outputs(int4_model):
    io = load_file(str(GPTQ / "linear_io.safetensors"))
    for name, lin in _linears(int4_model).items():
        y = lin(io[f"{name}.x"].float())
        assert (y - io[f"{name}.y_fp32"]).abs().max() < 1e-5, name


@pytest.mark.parametrize("case", json.loads((GPTQ / "cases.json").read_text()), ids=lambda c: c["name"])
def test_full_model_logits(case, int4_model):
    logits_ref = load_file(str(GPTQ / "logits.safetensors"))[case["logits_keys"]["fp32"]]
    ids = torch.tensor(case["input_ids"])
    images = None
    if case["images"]:
        images = torch.stack([preprocess_v1(load_image(GPTQ / n), 112) for n in case["images"]])
    with torch.no_grad():
        logits = int4_model(ids, images=images)
    assert (logits - logits_ref).abs().max() < 1e-4


def test_default_dtype_keeps_scales_exact():
    model = load_model(GPTQ / "int4")                 # torch_dtype float16 -> bfloat16 compute on CPU
    lin = next(iter(_linears(model).values()))
    assert lin.scales.dtype == torch.float16
    assert next(model.transformer.wte.parameters()).dtype == torch.bfloat16
