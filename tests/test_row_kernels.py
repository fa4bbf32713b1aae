"""The many-row glue kernels of an image encode / prefill (row_kernels.cpp via quant_kernels.rows_*) against the
reference ops they replace: the rotary gives the same bits in every layout the models use; QuickGELU (which needs
exp) the same bf16 values and float32 within a few units in the last place, special values included; and each
declines (None) where it does not apply, so the caller runs the reference."""
from __future__ import annotations

import pytest
import torch

from qwenvl import quant_kernels
from qwenvl.qwen2_vl import quick_gelu
from qwenvl.text import apply_rope

pytestmark = pytest.mark.skipif(quant_kernels.library() is None, reason="no compiled kernels on this machine")
DTYPES = (torch.bfloat16, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_of_the_vision_layout_is_the_reference(dtype):
    n, h, d = 37, 3, 8
    qkv = torch.randn(n, 3, h, d).to(dtype).permute(1, 2, 0, 3)      # [3, H, N, D], as VisionAttention slices it
    cos, sin = torch.randn(n, d), torch.randn(n, d)
    for x in (qkv[0], qkv[1]):
        out = quant_kernels.rows_rope(x, cos, sin)
        assert out.shape == x.shape and out.is_contiguous() and out.dtype == dtype
        assert torch.equal(out, apply_rope(x, cos, sin))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_of_the_text_layout_is_the_reference(dtype):
    b, t, h, d = 2, 11, 4, 16
    x = torch.randn(b, t, h * d).to(dtype).view(b, t, h, d).transpose(1, 2)   # [B, H, T, D] view of a projection
    cos, sin = torch.randn(b, 1, t, d), torch.randn(b, 1, t, d)                # one table per row (M-RoPE)
    assert torch.equal(quant_kernels.rows_rope(x, cos, sin), apply_rope(x, cos, sin))
    shared = cos[:1], sin[:1]                                                  # one table for the batch
    assert torch.equal(quant_kernels.rows_rope(x, *shared), apply_rope(x, *shared))
    heads = x[:, 1:3]                                                          # a slice of the heads
    assert torch.equal(quant_kernels.rows_rope(heads, cos, sin), apply_rope(heads, cos, sin))


def test_rope_declines_what_it_does_not_compute():
    x = torch.randn(1, 2, 5, 8)
    cos, sin = torch.randn(1, 1, 5, 8), torch.randn(1, 1, 5, 8)
    assert quant_kernels.rows_rope(x, cos[..., :4], sin[..., :4]) is None      # partial rotary (Qwen-VL's option)
    assert quant_kernels.rows_rope(x, cos.double(), sin.double()) is None      # not float32 tables
    assert quant_kernels.rows_rope(x.transpose(-1, -2), cos, sin) is None      # rows of D not contiguous
    assert quant_kernels.rows_rope(x.requires_grad_(), cos, sin) is None       # training: autograd's ops


def test_quick_gelu_bf16_gives_the_reference_values():
    h = (torch.randn(64, 4096) * 4).to(torch.bfloat16)
    ref = quick_gelu(h)
    out = quant_kernels.rows_quick_gelu_(h.clone())
    same = (out == ref).float().mean().item()
    assert same >= 0.9999, same                   # measured 1.0 on 5 M values; exp is within 2 ulp, not exact
    ulp = ref.float().abs().clamp(min=1e-30) * 2 ** -7
    assert ((out.float() - ref.float()).abs() <= ulp).all()


def test_quick_gelu_float32_is_within_a_few_ulp_and_in_place():
    h = torch.randn(64, 4096) * 4
    ref = quick_gelu(h)
    out = quant_kernels.rows_quick_gelu_(h)
    assert out is h                                                            # in place
    torch.testing.assert_close(out, ref, rtol=5e-7, atol=1e-30)


@pytest.mark.parametrize("dtype", DTYPES)
def test_quick_gelu_special_values_are_the_reference(dtype):
    x = torch.tensor([-200.0, -104.0, -88.0, -50.0, -1e-3, -0.0, 0.0, 1e-3, 10.0, 50.0, 88.0, 88.8, 200.0,
                      float("inf"), float("-inf"), float("nan")]).to(dtype)
    out, ref = quant_kernels.rows_quick_gelu_(x.clone()), quick_gelu(x)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=0.0, equal_nan=True)


def test_quick_gelu_declines_what_it_does_not_compute():
    assert quant_kernels.rows_quick_gelu_(torch.randn(4, 6).t()) is None                      # not contiguous
    assert quant_kernels.rows_quick_gelu_(torch.randn(4, 6, requires_grad=True)) is None     # training
    assert quant_kernels.rows_quick_gelu_(torch.randn(4, 6).half()) is None                  # float16
