"""The fast inference paths against the reference paths (no timings: speed lives in benchmarks/bench_inference.py).

* `quant_kernels.dense_linear` (bf16 / fp32 decode GEMV) vs F.linear. float32: the same float32 products summed
  in another order, within 1e-5 of the output's scale. bfloat16: the kernel's float32 result rounded once, so it is
  compared with the float32 product rounded to bf16, within one bf16 step (2^-7 relative).
* `fused_projections`: the reference forward is bit-identical after fusing (same values, now views); the fused
  module equals the concatenated projections; loading and saving keep working.
* `FastLinear` on Qwen-VL (v1) in bf16: greedy tokens identical to nn.Linear's over 12 steps, logits within 2e-2.
* the decode-step glue kernels (residual add + RMSNorm, rotation, silu * up) vs torch's ops: the rotation
  bit-identical, the rest within float32 rounding (bf16: one bf16 step).
* `qwen2_vl_fast.FastDecoder.step` vs `qwen2_vl_generation.decode_step` on a tiny random Qwen2-VL (with an image, and
  a left-padded batch): logits within 1e-5 of their scale in float32 (2e-2 in bf16 / int8 / int4, where both
  paths round activations to bf16 but not at the same points), greedy tokens identical over 12 steps in every mode.
* the whole-step kernel (decode_step.cpp) vs FastDecoder's per-op step: the same logits and KV cache bit for bit in
  every mode; a new plan after the weights are replaced or changed in place; layers without a decode kernel decline.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from qwen2_vl_tiny import hf_config_dict, prompt, random_image
from tiny_checkpoint import tiny_config
from torch import nn

from qwenvl import quant_kernels
from qwenvl.fast_linear import FastLinear, use_fast_linears
from qwenvl.fused_projections import fuse_projections
from qwenvl.generation import generate as v1_generate
from qwenvl.generation import left_pad
from qwenvl.model import QWenLMHeadModel
from qwenvl.processor import preprocess_images
from qwenvl.quantize import quantize_model
from qwenvl.qwen2_vl import Qwen2VL, new_kv_cache
from qwenvl.qwen2_vl_config import Qwen2VLConfig
from qwenvl.qwen2_vl_fast import DecodePlan, FastDecoder
from qwenvl.qwen2_vl_generation import VisionInputs, decode_step, generate, prefill
from qwenvl.qwen2_vl_weights import load_model, save_checkpoint
from qwenvl.sampling import SamplingParams

MODES = ("fp32", "bf16", "int8", "int4")


@pytest.fixture(scope="module", autouse=True)
def kernels():
    if quant_kernels.library() is None:
        pytest.skip(f"compiled kernels unavailable: {quant_kernels.unavailable_reason()}")


def tiny(mode: str = "fp32", seed: int = 0) -> Qwen2VL:
    """A tiny random Qwen2-VL with weights wide enough for clear-cut greedy choices (as the parity tests)."""
    model = Qwen2VL(Qwen2VLConfig.from_dict(hf_config_dict())).eval().requires_grad_(False)
    model.init_weights(torch.Generator().manual_seed(seed), std=0.08)
    if mode == "int8":
        quantize_model(model, 8, lm_head=True)
    if mode == "int4":
        quantize_model(model, 4, group_size=32, lm_head=True)
    if mode != "fp32":
        model.to(torch.bfloat16)         # float tensors only: int8 / int4 codes stay as they are
    if mode == "bf16":
        use_fast_linears(model)
    return model


# ------------------------------------------------------------------------------------------ dense GEMV kernel

@pytest.mark.parametrize("n, k, rows, bias", [(37, 203, 1, True), (64, 256, 3, False), (19, 1000, 16, True),
                                              (200, 64, 5, True)])
def test_dense_kernel_float32(n, k, rows, bias):
    torch.manual_seed(n + k)
    w, x, b = torch.randn(n, k), torch.randn(rows, k), torch.randn(n) if bias else None
    ref = F.linear(x, w, b)
    torch.testing.assert_close(quant_kernels.dense_linear(x, w, b), ref, rtol=0, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("n, k, rows", [(37, 203, 1), (64, 256, 4), (19, 1000, 7)])
def test_dense_kernel_bfloat16_is_the_float32_result_rounded(n, k, rows):
    torch.manual_seed(n * k)
    w, x, b = torch.randn(n, k).bfloat16(), torch.randn(rows, k).bfloat16(), torch.randn(n).bfloat16()
    y = quant_kernels.dense_linear(x, w, b)
    ref = F.linear(x.float(), w.float(), b.float())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, rtol=2 ** -7, atol=1e-6)


def test_dense_kernel_declines_prefills_and_gradients():
    w = torch.randn(8, 32).bfloat16()
    assert quant_kernels.dense_linear(torch.randn(17, 32).bfloat16(), w, None) is None   # > FAST_MAX_ROWS
    x = torch.randn(1, 32).bfloat16().requires_grad_()
    assert quant_kernels.dense_linear(x, w, None) is None
    lin = FastLinear(nn.Linear(32, 8).bfloat16())
    assert torch.equal(lin(torch.ones(17, 32).bfloat16()), F.linear(torch.ones(17, 32).bfloat16(), lin.weight, lin.bias))


def test_many_bf16_rows_run_in_float32_where_torch_emulates_bf16(monkeypatch):
    """Without bf16 instructions a prefill's bf16 matmul runs in float32 (the exact bf16 products, float32 sums)
    and is rounded once; with them, or with few rows, or for training, it stays torch's bf16 matmul."""
    torch.manual_seed(0)
    lin = FastLinear(nn.Linear(64, 24).bfloat16())
    x = torch.randn(40, 64).bfloat16()
    in_f32 = F.linear(x.float(), lin.weight.float(), lin.bias.float()).bfloat16()
    monkeypatch.setitem(quant_kernels._CPU, "native", False)
    with torch.no_grad():
        assert torch.equal(lin(x), in_f32)
        assert torch.equal(lin(x[:20]), F.linear(x[:20], lin.weight, lin.bias))          # < UPCAST_MIN_ROWS rows
    torch.testing.assert_close(lin(x).float(), F.linear(x, lin.weight, lin.bias).float(), rtol=2 ** -7, atol=1e-2)
    assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))                     # weight needs a gradient
    monkeypatch.setitem(quant_kernels._CPU, "native", True)
    with torch.no_grad():
        assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))


def test_fast_linears_keep_keys_and_tied_head():
    model = tiny("fp32")
    keys = list(model.state_dict())
    model.config.tie_word_embeddings = True
    model.tie_weights()
    use_fast_linears(model)
    assert list(model.state_dict()) == keys
    assert model.lm_head.weight is model.model.embed_tokens.weight


# ------------------------------------------------------------------------------------------ fused projections

def _logits(model: Qwen2VL) -> torch.Tensor:
    patches, grid = preprocess_images([random_image(100, 150, 0)])
    ids = torch.tensor([prompt(4, ("image", 20), 7)])
    return model(ids, pixel_patches=patches, image_grid_thw=grid)


def test_fusing_leaves_the_reference_forward_bit_identical():
    model = tiny("fp32")
    before = _logits(model)
    fused = fuse_projections(model)
    assert torch.equal(_logits(model), before)
    attn = model.model.layers[0].self_attn
    x = torch.randn(3, 64)
    torch.testing.assert_close(fused[0]["qkv"](x), torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], -1))
    assert attn.q_proj.weight.untyped_storage().data_ptr() == fused[0]["qkv"].weight.untyped_storage().data_ptr()


@pytest.mark.parametrize("assign", [False, True])
def test_loading_after_fusing_updates_the_fused_weights(assign):
    model, other = tiny("fp32", seed=0), tiny("fp32", seed=1)
    fused = fuse_projections(model)
    model.load_state_dict(other.state_dict(), assign=assign)
    mlp = other.model.layers[1].mlp
    assert torch.equal(fused[1]["gate_up"].weight, torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
    assert torch.equal(_logits(model), _logits(other))


def test_a_fused_model_saves_and_loads(tmp_path):
    model = tiny("fp32")
    fuse_projections(model)
    save_checkpoint(model, tmp_path)
    assert torch.equal(_logits(load_model(tmp_path, dtype=torch.float32)), _logits(model))


# ------------------------------------------------------------------------------------------ fast decode step

def _prompt_batch():
    patches, grid = preprocess_images([random_image(100, 150, 0)])
    rows = [prompt(4, ("image", 20), 7), prompt(9)]
    ids, mask = left_pad(rows, pad_id=0)
    return ids, mask, VisionInputs(pixel_patches=patches, image_grid_thw=grid)


def _decode_logits(model: Qwen2VL, step, n: int = 4) -> list[torch.Tensor]:
    """Logits of n decode steps after the prompt batch, feeding the reference path's greedy tokens."""
    ids, mask, vision = _prompt_batch()
    dtype = model.model.embed_tokens.weight.dtype
    cache = new_kv_cache(model.config, 2, ids.shape[1] + n + 1, dtype)
    with torch.no_grad():
        logits, delta = prefill(model, ids, mask, vision, cache)
        out = []
        for _ in range(n):
            logits = step(logits.argmax(-1), cache, delta)
            out.append(logits.float())
    return out


@pytest.mark.parametrize("mode", MODES)
def test_fast_step_logits_match_decode_step(mode):
    model = tiny(mode)
    ref = _decode_logits(model, lambda t, c, d: decode_step(model, t, c, d))
    fast = _decode_logits(model, FastDecoder(model).step)
    tol = 1e-5 if mode == "fp32" else 2e-2
    for a, b in zip(ref, fast):
        torch.testing.assert_close(b, a, rtol=0, atol=tol * a.abs().max().item())
        assert torch.equal(a.argmax(-1), b.argmax(-1))


@pytest.mark.parametrize("mode", MODES)
def test_fast_generation_gives_the_same_greedy_tokens(mode):
    model = tiny(mode)
    ids, mask, vision = _prompt_batch()
    params = SamplingParams(max_new_tokens=12, do_sample=False)
    ref = generate(model, ids, params, attention_mask=mask, vision=vision)
    fast = generate(model, ids, params, attention_mask=mask, vision=vision, step=FastDecoder(model).step)
    assert torch.equal(ref, fast)


def test_batch_of_one_takes_the_unmasked_path_and_matches():
    model = tiny("fp32")
    ids = torch.tensor([prompt(4, ("image", 20), 7)])
    patches, grid = preprocess_images([random_image(100, 150, 0)])
    vision = VisionInputs(pixel_patches=patches, image_grid_thw=grid)
    params = SamplingParams(max_new_tokens=12, do_sample=False)
    assert torch.equal(generate(model, ids, params, vision=vision),
                       generate(model, ids, params, vision=vision, step=FastDecoder(model).step))


def test_fast_linears_on_qwen_vl_give_the_same_greedy_tokens():
    torch.manual_seed(0)
    ref = QWenLMHeadModel(tiny_config(layers=2)).eval().requires_grad_(False)
    ref.init_weights(torch.Generator().manual_seed(0), std=0.08)
    ref.to(torch.bfloat16)
    fast = QWenLMHeadModel(tiny_config(layers=2)).eval().requires_grad_(False).to(torch.bfloat16)
    fast.load_state_dict(ref.state_dict())
    assert use_fast_linears(fast) == 2 * 5 + 1
    ids = torch.randint(0, 150000, (1, 9), generator=torch.Generator().manual_seed(1))
    params = SamplingParams(max_new_tokens=12, do_sample=False)
    assert torch.equal(v1_generate(ref, ids, params), v1_generate(fast, ids, params))
    with torch.no_grad():
        a, b = ref(ids[:, :1]).float(), fast(ids[:, :1]).float()        # one row: the decode kernel runs
    torch.testing.assert_close(b, a, rtol=0, atol=2e-2 * a.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_rms_norm_is_bit_identical(dtype):
    from qwenvl.qwen2_vl_fast import rms_norm
    from qwenvl.text import RMSNorm

    norm = RMSNorm(96, 1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 2, 96).to(dtype)
    assert torch.equal(rms_norm(norm, x), norm(x))


def _needs_kernels():
    if quant_kernels.library() is None:
        pytest.skip(f"compiled kernels unavailable: {quant_kernels.unavailable_reason()}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_delta", [False, True])
def test_add_norm_kernel_equals_the_residual_add_and_rms_norm(dtype, with_delta):
    """The residual add is exact in both (one rounding of the float32 sum); the norm sums its squares in another
    order, so float32 agrees to a few ulps and bf16 to one bf16 step."""
    from qwenvl.qwen2_vl_fast import add_norm, rms_norm
    from qwenvl.text import RMSNorm

    _needs_kernels()
    norm = RMSNorm(1536, 1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.normal_()
    h, delta = torch.randn(2, 1, 1536).to(dtype) * 3, torch.randn(2, 1, 1536).to(dtype) if with_delta else None
    want_h = h if delta is None else h + delta
    want = rms_norm(norm, want_h)
    got_h, got = add_norm(h.clone(), delta, norm)
    assert torch.equal(got_h, want_h) and got.dtype == dtype
    tol = 2 ** -7 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * want.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_kernel_equals_torch(dtype):
    from qwenvl.qwen2_vl_fast import silu_mul

    _needs_kernels()
    gate_up = torch.randn(3, 1, 2 * 700).to(dtype) * 4
    gate, up = gate_up.chunk(2, dim=-1)
    want = F.silu(gate) * up
    got = quant_kernels.silu_mul(gate_up)
    assert got is not None and got.shape == want.shape and torch.equal(silu_mul(gate_up), got)
    tol = 2 ** -7 if dtype == torch.bfloat16 else 1e-6                # exp may differ in its last bit
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=1e-6)


def test_glue_kernels_decline_what_they_do_not_do():
    _needs_kernels()
    x = torch.randn(1, 1, 8, requires_grad=True)
    weight = torch.ones(8)
    assert quant_kernels.add_rms_norm(x, None, weight, 1e-6) is None                   # needs a gradient
    assert quant_kernels.add_rms_norm(x.detach().half(), None, weight.half(), 1e-6) is None
    assert quant_kernels.add_rms_norm(x.detach(), None, weight.bfloat16(), 1e-6) is None  # mixed dtypes
    assert quant_kernels.silu_mul(torch.randn(1, 7)) is None                           # no [gate, up] halves
    assert quant_kernels.rope(torch.randn(1, 2, 3, 8), torch.ones(1, 1, 1, 8), torch.ones(1, 1, 1, 8)) is None


@pytest.mark.parametrize("in_f, out_f, group", [(256, 37, 64), (1536, 200, 128), (384, 9, 128), (4352, 38, 128)])
def test_int4_bf16_dot_kernel_is_the_float32_result_rounded(in_f, out_f, group):
    from qwenvl.quantize import Int4Linear

    if quant_kernels.switch("bf16_dot") is None:
        pytest.skip("built without AVX512-BF16")
    torch.manual_seed(in_f + out_f)
    lin = Int4Linear.from_linear(nn.Linear(in_f, out_f), group, sym=False)
    x = torch.randn(1, in_f).bfloat16()
    ref = lin.reference_forward(x.float())                       # float32 weights and sums
    default = quant_kernels.switch("bf16_dot")
    try:
        outs = {on: (quant_kernels.switch("bf16_dot", on), lin(x))[1] for on in (True, False)}
    finally:
        quant_kernels.switch("bf16_dot", default)
    for y in outs.values():
        torch.testing.assert_close(y.float(), ref, rtol=2 ** -7, atol=1e-5 * ref.abs().max().item())


def test_bf16_dot_kernel_is_on_by_default_only_on_amd():
    if quant_kernels.switch("bf16_dot") is None:
        pytest.skip("built without AVX512-BF16")
    assert quant_kernels.switch("bf16_dot") == (quant_kernels._cpu_vendor() == "AuthenticAMD")


@pytest.mark.parametrize("in_f, out_f, rows", [(203, 37, 1), (1000, 19, 3), (5000, 24, 1), (4128, 9, 6)])
def test_int8_vnni_kernel_is_float32_accurate(in_f, out_f, rows):
    """int16 halves of x (30 bits) and exact integer sums: within float32 rounding of the float path, also past
    the 4096 inputs after which the integer sums are flushed, and for rows of very different magnitudes."""
    from qwenvl.quantize import Int8Linear

    if quant_kernels.switch("int8_vnni") is None:
        pytest.skip("built without AVX512-VNNI")
    torch.manual_seed(in_f + out_f)
    lin = Int8Linear.from_linear(nn.Linear(in_f, out_f))
    x = torch.randn(rows, in_f) * torch.logspace(-3, 3, rows)[:, None]
    x[0, 5] = 300.0                                               # an outlier feature, as LLM activations have
    ref = lin.reference_forward(x)
    try:
        outs = {on: (quant_kernels.switch("int8_vnni", on), lin(x))[1] for on in (True, False)}
    finally:
        quant_kernels.switch("int8_vnni", True)
    for y in outs.values():
        for r in range(rows):                                    # each row to its own scale
            torch.testing.assert_close(y[r], ref[r], rtol=0, atol=1e-5 * ref[r].abs().max().item())


def test_int8_vnni_kernel_keeps_non_finite_inputs_non_finite():
    from qwenvl.quantize import Int8Linear

    if quant_kernels.switch("int8_vnni") is None:
        pytest.skip("built without AVX512-VNNI")
    lin = Int8Linear.from_linear(nn.Linear(64, 8))
    x = torch.randn(3, 64)
    x[0, 3], x[1, 7] = float("inf"), float("nan")
    y = lin(x)
    assert not y[0].isfinite().any() and y[1].isnan().all() and y[2].isfinite().all()
    assert torch.equal(y[2], lin(x[2:]).view(-1))


def _assert_bf16_int_kernel_close(y: torch.Tensor, ref32: torch.Tensor, ref_bf16: torch.Tensor) -> None:
    """An integer kernel's bf16 output against the float32 result: one bf16 step plus x's int16 rounding (2^-13 of
    the output's scale), and no farther from it than the reference's bf16 forward (bf16 weights, bf16 matmul)."""
    assert y.dtype == torch.bfloat16
    scale = ref32.abs().max().item()
    torch.testing.assert_close(y.float(), ref32, rtol=2 ** -7, atol=2 ** -13 * scale)
    assert (y.float() - ref32).abs().max() <= (ref_bf16.float() - ref32).abs().max()


@pytest.fixture(params=["avx512_vnni", "avx2"])
def int4_integer_variant(request):
    """The integer int4 kernel's multiply-adds on AVX512-VNNI (where built) or on 256-bit AVX2, for one test."""
    vnni = request.param == "avx512_vnni"
    if quant_kernels.switch("int4_vnni") is None and vnni:
        pytest.skip("built without AVX512-VNNI")
    if quant_kernels.switch("int4_vnni") is not None:
        quant_kernels.switch("int4_vnni", vnni)
    yield request.param
    if quant_kernels.switch("int4_vnni") is not None:
        quant_kernels.switch("int4_vnni", True)


@pytest.mark.parametrize("in_f, out_f, group, rows", [(256, 37, 64, 1), (1536, 200, 128, 3), (4352, 38, 128, 6),
                                                     (2048, 16, 256, 2), (640, 11, 64, 5)])
@pytest.mark.parametrize("sym", [True, False])
def test_int4_integer_kernel_is_float32_accurate(in_f, out_f, group, rows, sym, int4_integer_variant):
    """float32 x as 3-byte integers per group (2^-23 of the group's largest |x|) and exact integer sums: within
    float32 rounding of the float path, for rows of very different magnitudes and with an outlier feature."""
    from qwenvl.quantize import Int4Linear

    if quant_kernels.switch("int4_i8") is None:
        pytest.skip("built without AVX2")
    torch.manual_seed(in_f + out_f)
    lin = Int4Linear.from_linear(nn.Linear(in_f, out_f), group, sym=sym)
    x = torch.randn(rows, in_f) * torch.logspace(-3, 3, rows)[:, None]
    x[0, 5] = 300.0
    ref = lin.reference_forward(x)
    try:
        outs = {on: (quant_kernels.switch("int4_i8", on), lin(x))[1] for on in (True, False)}
    finally:
        quant_kernels.switch("int4_i8", True)
    for y in outs.values():
        for r in range(rows):
            torch.testing.assert_close(y[r], ref[r], rtol=0, atol=1e-5 * ref[r].abs().max().item())


@pytest.mark.parametrize("in_f, out_f, group, rows", [(1536, 200, 128, 1), (8960, 24, 128, 1), (384, 9, 64, 4)])
def test_int4_integer_kernel_in_bfloat16_is_the_float32_result_rounded(in_f, out_f, group, rows,
                                                                      int4_integer_variant):
    """bfloat16 x as 2-byte integers per group (2^-15 of the group's largest |x|): as the int8 kernel below."""
    from qwenvl.quantize import Int4Linear

    if quant_kernels.switch("int4_i8") is None:
        pytest.skip("built without AVX2")
    torch.manual_seed(in_f)
    lin = Int4Linear.from_linear(nn.Linear(in_f, out_f), group, sym=False)
    x = torch.randn(rows, in_f).bfloat16()
    x[0, 3] = 40.0
    _assert_bf16_int_kernel_close(lin(x), lin.reference_forward(x.float()), lin.reference_forward(x))


def test_int4_integer_kernel_keeps_non_finite_inputs_non_finite(int4_integer_variant):
    from qwenvl.quantize import Int4Linear

    if quant_kernels.switch("int4_i8") is None:
        pytest.skip("built without AVX2")
    lin = Int4Linear.from_linear(nn.Linear(128, 8), 64, sym=True)
    x = torch.randn(3, 128)
    x[0, 3], x[1, 70] = float("inf"), float("nan")
    y = lin(x)
    assert y[0].isnan().all() and y[1].isnan().all() and y[2].isfinite().all()
    assert torch.equal(y[2], lin(x[2:]).view(-1))


@pytest.mark.parametrize("in_f, out_f, rows", [(1536, 200, 1), (8960, 24, 1), (208, 9, 4), (4128, 7, 3)])
def test_int8_int16_kernel_in_bfloat16_is_the_float32_result_rounded(in_f, out_f, rows):
    """bfloat16 x as int16 per group of 128 (2^-16 of the group's largest |x|), a short last group (208, 4128),
    exact integer sums: one bf16 step from the float32 result plus x's rounding (2^-13 of the output's scale),
    and closer to it than the reference's own bf16 forward."""
    from qwenvl.quantize import Int8Linear

    if quant_kernels.switch("int8_i16") is None:
        pytest.skip("built without AVX2")
    torch.manual_seed(in_f)
    lin = Int8Linear.from_linear(nn.Linear(in_f, out_f))
    x = torch.randn(rows, in_f).bfloat16()
    x[0, 3] = 40.0
    ref = lin.reference_forward(x.float())
    try:
        outs = {on: (quant_kernels.switch("int8_i16", on), lin(x))[1] for on in (True, False)}
    finally:
        quant_kernels.switch("int8_i16", True)
    _assert_bf16_int_kernel_close(outs[True], ref, lin.reference_forward(x))
    torch.testing.assert_close(outs[False].float(), ref, rtol=2 ** -7, atol=1e-5 * ref.abs().max().item())


def test_int8_int16_kernel_keeps_non_finite_inputs_non_finite():
    from qwenvl.quantize import Int8Linear

    if quant_kernels.switch("int8_i16") is None:
        pytest.skip("built without AVX2")
    lin = Int8Linear.from_linear(nn.Linear(256, 8))
    x = torch.randn(3, 256).bfloat16()
    x[0, 3], x[1, 200] = float("inf"), float("nan")
    y = lin(x)
    assert y[0].isnan().all() and y[1].isnan().all() and y[2].isfinite().all()
    assert torch.equal(y[2], lin(x[2:]).view(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads, kv_heads, length", [(4, 4, 1), (4, 4, 37), (6, 2, 300), (3, 1, 17)])
def test_decode_attention_kernel_equals_sdpa(dtype, heads, kv_heads, length):
    """One query per row against views of a larger cache (the KV cache's layout), some keys hidden in row 1."""
    if quant_kernels.library() is None:
        pytest.skip("no compiled kernels")
    torch.manual_seed(length)
    q = torch.randn(2, heads, 1, 40).to(dtype)
    k, v = (torch.randn(2, kv_heads, length + 9, 40).to(dtype)[:, :, :length] for _ in range(2))
    mask = torch.ones(2, 1, 1, length, dtype=torch.bool)
    mask[1, ..., :length // 2] = False
    for m in (None, mask):
        out = quant_kernels.decode_attention(q, k, v, m)
        exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=m,
                                               enable_gqa=True)
        assert out.dtype == dtype and out.shape == q.shape
        tol = 1e-5 if dtype == torch.float32 else 2 ** -8          # float32 sums; one rounding to bf16
        torch.testing.assert_close(out.double(), exact, rtol=tol, atol=tol * exact.abs().max().item())


def test_decode_attention_kernel_declines_what_it_does_not_do():
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 5, 8)
    assert quant_kernels.decode_attention(q, k, k, None) is None                       # 3 queries: a prefill
    q1 = q[:, :, :1]
    assert quant_kernels.decode_attention(q1, k, k, torch.zeros(1, 1, 1, 5)) is None    # an additive float mask
    assert quant_kernels.decode_attention(q1.half(), k.half(), k.half(), None) is None
    if quant_kernels.library() is not None:
        hidden = torch.zeros(1, 1, 1, 5, dtype=torch.bool)
        assert quant_kernels.decode_attention(q1, k, k, hidden).isnan().all()        # softmax over nothing


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_rotary_is_bit_identical(dtype):
    from qwenvl.qwen2_vl_fast import FastDecoder, rotate
    from qwenvl.text import apply_rope

    decoder = FastDecoder(tiny("fp32"))
    position = torch.tensor([0, 7, 1000])
    cos, signed_sin = decoder._rope(position)
    angles = position.float()[:, None] * decoder.inv_freq
    emb = torch.cat([angles, angles], -1)[:, None, None]
    x = torch.randn(3, 6, 1, decoder.head_dim).to(dtype)
    assert torch.equal(rotate(x, cos, signed_sin), apply_rope(x, emb.cos(), emb.sin()))
    if quant_kernels.library() is not None:                      # the kernel ran (rotate falls back to torch ops)
        assert torch.equal(quant_kernels.rope(x, cos, signed_sin), apply_rope(x, emb.cos(), emb.sin()))


# ------------------------------------------------------------------------------------------ whole-step kernel

def _fast_model(mode: str, seed: int = 0) -> Qwen2VL:
    """tiny(mode) with FastLinear in float32 too, as fast_paths sets it up: every linear has a decode kernel."""
    model = tiny(mode, seed)
    if mode == "fp32":
        use_fast_linears(model)
    return model


def _decode(model: Qwen2VL, decoder: FastDecoder, n: int = 6) -> tuple[list[torch.Tensor], object]:
    """_decode_logits with `decoder.step`, and the cache it filled."""
    seen = []

    def step(tokens, cache, delta):
        seen.append(cache)
        return decoder.step(tokens, cache, delta)
    return _decode_logits(model, step, n), seen[-1]


@pytest.mark.parametrize("mode", MODES)
def test_whole_step_kernel_is_bit_identical_to_the_per_op_step(mode):
    """decode_step.cpp runs the per-op step's kernels in the same order on the same values: the same logits and
    the same cache, bit for bit (a left-padded batch with an image, so the masked attention too)."""
    model = _fast_model(mode)
    whole = FastDecoder(model)
    got, got_cache = _decode(model, whole)
    want, want_cache = _decode(model, FastDecoder(model, whole_step=False))
    assert whole._plan is not None and whole._plan.words is not None          # the kernel ran
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert torch.equal(got_cache.keys, want_cache.keys) and torch.equal(got_cache.values, want_cache.values)


@pytest.mark.parametrize("mode", ["bf16", "int8"])
def test_whole_step_plan_follows_weight_changes(mode):
    """A plan holds addresses and converted copies (float32 biases of a bf16 model): replacing the tensors
    (load_state_dict(assign=True)) or changing one in place must give a new plan, not stale weights."""
    model, other = _fast_model(mode, seed=0), _fast_model(mode, seed=1)
    decoder = FastDecoder(model)
    _decode(model, decoder)
    model.load_state_dict(other.state_dict(), assign=True)
    got, _ = _decode(model, decoder)
    want, _ = _decode(other, FastDecoder(other, whole_step=False))
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.bias.mul_(3)                 # a view of the fused qkv bias
    got, _ = _decode(model, decoder)
    want, _ = _decode(model, FastDecoder(model, whole_step=False))
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_whole_step_kernel_declines_layers_without_a_decode_kernel():
    """Plain nn.Linear (no FastLinear swap): the per-op step runs, with the same results."""
    model = tiny("fp32")
    decoder = FastDecoder(model)
    got, _ = _decode(model, decoder)
    assert decoder._plan is not None and decoder._plan.words is None
    modules = decoder._step_modules()
    linears = [[getattr(m, "decode_kernel", lambda: None)() for m in row[:4]] for row in modules[:-1]]
    cache = new_kv_cache(model.config, 1, 8, torch.float32)
    why = DecodePlan.declines(decoder, linears, [modules[0][4]], cache, torch.zeros(1, 1, 64))
    assert why == "a linear without a decode kernel"
    want, _ = _decode(model, FastDecoder(model, whole_step=False))
    assert all(torch.equal(a, b) for a, b in zip(got, want))
