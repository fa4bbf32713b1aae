"""The compiled paths (quant_kernels) against the reference forward of each quantized linear.

Decode kernels (up to FAST_MAX_ROWS rows), tolerances. float32: both add the same float32 products in another
order, so outputs agree to 1e-5 of the output's scale (max |y|). bfloat16: the reference rounds the weight to bf16
before its matmul, the kernel computes in float32 and rounds once at the end, so the kernel is compared with the
float32 reference rounded to bf16, within one bf16 step (2^-7 relative). Prefill path (more rows, or a gradient):
the weight is dequantised to the reference's exact bits, so the outputs must be equal. No timings here: speed
lives in benchmarks/bench_quant.py.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qwenvl import quant_kernels
from qwenvl.kv_cache import KVCache
from qwenvl.quantize import GPTQLinear, Int4Linear, Int8Linear, quantize_model, unpack_nibbles
from qwenvl.weights import load_model

GPTQ = Path(__file__).parent / "fixtures" / "qwen_vl_tiny_gptq"


@pytest.fixture(scope="module", autouse=True)
def kernels():
    if quant_kernels.library() is None:
        pytest.skip(f"compiled kernels unavailable: {quant_kernels.unavailable_reason()}")


def _gptq_random(in_f: int, out_f: int, group: int, seed: int) -> GPTQLinear:
    g = torch.Generator().manual_seed(seed)
    lin = GPTQLinear(in_f, out_f, group)
    lin.qweight.copy_(torch.randint(-2**31, 2**31, lin.qweight.shape, generator=g, dtype=torch.int64).int())
    lin.qzeros.copy_(torch.randint(-2**31, 2**31, lin.qzeros.shape, generator=g, dtype=torch.int64).int())
    lin.scales.copy_((torch.rand(lin.scales.shape, generator=g) * 0.02 + 1e-3).half())
    lin.g_idx.copy_(torch.arange(in_f) // group)
    lin.bias.copy_(torch.randn(out_f, generator=g).half())
    return lin


def _make(kind: str, in_f: int, out_f: int, bias: bool, group: int) -> torch.nn.Module:
    torch.manual_seed(in_f * 1000 + out_f)
    if kind == "gptq":
        return _gptq_random(in_f, out_f, group, seed=in_f + out_f)
    linear = torch.nn.Linear(in_f, out_f, bias=bias)
    if kind == "int8":
        return Int8Linear.from_linear(linear)
    return Int4Linear.from_linear(linear, group, sym=kind == "int4-sym")


def _assert_f32_close(fast: torch.Tensor, ref: torch.Tensor) -> None:
    scale = ref.abs().max().item()
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-5 * scale)


# Odd shapes on purpose: inputs not a multiple of the vector width (int8), outputs not a multiple of the 4-row
# tiles of long inputs (37, 19, 9, 40, 200, 24, 21), group sizes 32 to 128, inputs past the 4096 of a long row.
CASES = [("int8", 203, 37, True, 0), ("int8", 256, 64, False, 0), ("int8", 1000, 19, True, 0),
         ("int4-sym", 256, 37, True, 128), ("int4-asym", 384, 72, False, 128), ("int4-asym", 192, 9, True, 64),
         ("int4-sym", 96, 40, False, 32),
         ("gptq", 256, 40, True, 128), ("gptq", 384, 200, True, 128), ("gptq", 128, 24, True, 32),
         ("int8", 4160, 21, True, 0), ("int4-asym", 4352, 37, True, 128)]   # long rows: 4 output rows at a time
# A group size the decode kernel cannot take (it reads whole vectors of one group: a multiple of 2 x 4-16 lanes).
ODD_GROUP = ("int4-asym", 48, 24, True, 6)


@pytest.mark.parametrize("kind, in_f, out_f, bias, group", CASES)
@pytest.mark.parametrize("rows", [(1,), (3,), (2, 5), (4, 4)])          # 10 rows = blocks of 4 + 4 + 2
def test_fast_path_equals_reference_float32(kind, in_f, out_f, bias, group, rows):
    layer = _make(kind, in_f, out_f, bias, group)
    x = torch.randn(*rows, in_f)
    with torch.no_grad():
        fast, ref = layer(x), layer.reference_forward(x)
    assert fast.shape == (*rows, out_f) and fast.dtype == torch.float32
    _assert_f32_close(fast, ref)


@pytest.mark.parametrize("kind, in_f, out_f, bias, group", CASES[::2])
@pytest.mark.parametrize("rows", [1, 4])
def test_fast_path_in_bfloat16_is_the_float32_result_rounded(kind, in_f, out_f, bias, group, rows):
    layer = _make(kind, in_f, out_f, bias, group)
    x = torch.randn(rows, in_f).bfloat16()
    with torch.no_grad():
        fast, ref32 = layer(x), layer.reference_forward(x.float())
    assert fast.dtype == torch.bfloat16
    scale = ref32.abs().max().item()
    torch.testing.assert_close(fast.float(), ref32.bfloat16().float(), rtol=2**-7, atol=1e-5 * scale)


def test_other_group_sizes_take_the_dequantise_path():
    layer = _make(*ODD_GROUP)
    x = torch.randn(2, 48)
    with torch.no_grad():
        assert torch.equal(layer(x), layer.reference_forward(x))


def test_non_contiguous_input():
    layer = _make("int4-asym", 256, 24, True, 128)
    x = torch.randn(256, 3).t()                                                  # [3, 256], strided
    with torch.no_grad():
        _assert_f32_close(layer(x), layer.reference_forward(x.contiguous()))


@pytest.mark.parametrize("kind", ["int8", "int4-sym", "gptq"])
def test_which_path_runs(kind, monkeypatch):
    """The reference forward only runs where the compiled paths do not apply."""
    layer = _make(kind, 128, 16, True, 32)
    calls = []
    real = type(layer).reference_forward
    monkeypatch.setattr(type(layer), "reference_forward", lambda self, x: calls.append(x.shape) or real(self, x))
    with torch.no_grad():
        layer(torch.randn(quant_kernels.FAST_MAX_ROWS, 128))                    # decode kernels
        layer(torch.randn(quant_kernels.FAST_MAX_ROWS + 1, 128))                # dequantise + matmul
    assert calls == []
    layer.to("meta")(torch.randn(2, 128, device="meta"))                         # not on the CPU
    assert len(calls) == 1


@pytest.mark.parametrize("kind, in_f, out_f, bias, group", CASES[::3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_path_equals_reference_exactly(kind, in_f, out_f, bias, group, dtype, monkeypatch):
    """Many rows: the weight is dequantised in C to the reference's exact bits, then the same F.linear; on a CPU
    without bf16 instructions a bf16 one runs in float32 on those bits (quant_kernels.linear): one bf16 step."""
    layer = _make(kind, in_f, out_f, bias, group)
    x = torch.randn(3, quant_kernels.FAST_MAX_ROWS, in_f).to(dtype)
    monkeypatch.setitem(quant_kernels._CPU, "native", True)
    with torch.no_grad():
        ref = layer.reference_forward(x)
        assert torch.equal(layer(x), ref)
        monkeypatch.setitem(quant_kernels._CPU, "native", False)
        y = layer(x)
    if dtype == torch.float32:
        assert torch.equal(y, ref)
    else:
        torch.testing.assert_close(y.float(), ref.float(), rtol=2 ** -7, atol=2 ** -8 * ref.abs().max().item())


@pytest.mark.parametrize("kind", ["int8", "int4-asym", "gptq"])
def test_gradient_wrt_input_equals_reference(kind):
    """Q-LoRA backpropagates through the frozen quantized base: that takes the dequantise + matmul path."""
    layer = _make(kind, 256, 24, True, 128)
    x = torch.randn(2, 256, requires_grad=True)
    layer(x).square().sum().backward()
    grad, x.grad = x.grad, None
    layer.reference_forward(x).square().sum().backward()
    assert torch.equal(grad, x.grad)


def test_gptq_words_read_transposed_are_int4_bytes():
    """GPTQLinear hands the int4 kernel its own words, stored transposed: same codes, same state_dict."""
    model = load_model(GPTQ / "int4", dtype="float32")
    io = load_file(str(GPTQ / "linear_io.safetensors"))
    stored = load_file(str(GPTQ / "int4" / "model.safetensors"))
    linears = {n: m for n, m in model.named_modules() if isinstance(m, GPTQLinear)}
    for name, lin in linears.items():
        q, zero = lin.codes()                                                    # [in, out], [G, out]
        packed, scales, zeros, bias = lin.kernel_tensors()
        assert torch.equal(unpack_nibbles(packed), q.t())                        # Int4Linear's byte layout
        assert torch.equal(zeros, zero.t()) and torch.equal(scales, lin.scales.float().t())
        assert torch.equal(bias, lin.bias.float())
        assert lin.qweight.stride() == (1, lin.in_features // 8)                 # repacked in place...
        assert torch.equal(lin.state_dict()["qweight"], stored[f"{name}.qweight"])   # ...same values
        x = io[f"{name}.x"].float().reshape(-1, lin.in_features)[:5]
        with torch.no_grad():
            _assert_f32_close(lin(x), lin.reference_forward(x))


def test_gptq_act_order_falls_back_to_the_reference():
    lin = _gptq_random(256, 16, 128, seed=0)
    lin.g_idx.copy_(torch.arange(256) % 2)                                       # groups not in input order
    assert lin.kernel_tensors() is None
    x = torch.randn(1, 256)
    with torch.no_grad():
        assert torch.equal(lin(x), lin.reference_forward(x))


def _use(fast: bool, monkeypatch) -> None:
    """fast: every call below 64 rows takes the decode kernels; else the kernels are off: the reference forward."""
    monkeypatch.setattr(quant_kernels, "FAST_MAX_ROWS", 64)
    if not fast:
        monkeypatch.setattr(quant_kernels, "_state", {"lib": None, "why": "reference run", "lanes": 0})
        monkeypatch.setenv("QWENVL_QUANT_KERNELS", "0")                         # and no stock int8 op either


def _logits(model, fast: bool, monkeypatch) -> torch.Tensor:
    _use(fast, monkeypatch)
    ids = torch.randint(0, 990, (2, 12), generator=torch.Generator().manual_seed(0))       # 24 rows per linear
    with torch.no_grad():
        return model(ids)


def _decode(model, fast: bool, monkeypatch, steps: int = 4) -> torch.Tensor:
    """Logits [B, steps, V] of greedy decoding with a KV cache: one row per linear per step."""
    _use(fast, monkeypatch)
    ids = torch.randint(0, 990, (1, 6), generator=torch.Generator().manual_seed(1))
    cache = KVCache.empty(model.config, 1, 6 + steps, torch.float32)
    out = []
    with torch.no_grad():
        logits = model(ids, kv_cache=cache, last_only=True)
        for _ in range(steps):
            out.append(logits)
            logits = model(logits.argmax(-1), kv_cache=cache, last_only=True)
    return torch.cat(out, dim=1)


def _quantized_tiny(kind: str):
    if kind == "gptq":
        return load_model(GPTQ / "int4", dtype="float32")
    model = load_model(GPTQ / "float", dtype="float32")
    quantize_model(model, 8 if kind == "int8" else 4, 128, sym=False, lm_head=True)
    return model


@pytest.mark.parametrize("kind", ["int8", "int4", "gptq"])
def test_whole_model_logits_fast_equal_reference(kind, monkeypatch):
    model = _quantized_tiny(kind)
    ref, fast = _logits(model, False, monkeypatch), _logits(model, True, monkeypatch)
    _assert_f32_close(fast, ref)
    assert torch.equal(fast.argmax(-1), ref.argmax(-1))
    ref, fast = _decode(model, False, monkeypatch), _decode(model, True, monkeypatch)
    _assert_f32_close(fast, ref)
    model.to(torch.bfloat16)
    fast16 = _logits(model, True, monkeypatch).float()
    ref16 = _logits(model, False, monkeypatch).float()
    cosine = torch.nn.functional.cosine_similarity(fast16.flatten(), ref16.flatten(), dim=0)
    assert cosine > 0.999


def test_without_kernels_int8_uses_the_stock_op_and_int4_the_reference(monkeypatch):
    monkeypatch.setattr(quant_kernels, "_state", {"lib": None, "why": "test", "lanes": 0})
    int8, int4 = _make("int8", 256, 24, True, 0), _make("int4-sym", 256, 24, True, 128)
    x = torch.randn(3, 256)
    with torch.no_grad():
        _assert_f32_close(int8(x), int8.reference_forward(x))
        assert quant_kernels.int4_linear(x, int4.qweight, int4.scales, int4.zeros, 128, int4.bias) is None
        assert torch.equal(int4(x), int4.reference_forward(x))


def test_build_failure_is_reported_not_raised(monkeypatch, tmp_path):
    monkeypatch.setattr(quant_kernels, "_state", {})
    monkeypatch.setenv("QWENVL_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "false")                                          # a "compiler" that always fails
    assert quant_kernels.library() is None
    assert "could not build" in quant_kernels.unavailable_reason()
    monkeypatch.setattr(quant_kernels, "_state", {})
    monkeypatch.setenv("QWENVL_QUANT_KERNELS", "0")
    assert quant_kernels.library() is None and "QWENVL_QUANT_KERNELS=0" in quant_kernels.unavailable_reason()


def test_wrong_feature_count_is_a_clear_error():
    layer = _make("int8", 64, 8, False, 0)
    with pytest.raises(ValueError, match="expects 64"):
        layer(torch.randn(1, 63))
