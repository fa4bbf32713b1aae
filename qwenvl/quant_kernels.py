"""Fast CPU paths of the quantized linears: small C++ kernels (quant_kernels.cpp) built once per machine.

Decoding reads every weight once per token, so its speed is the memory bandwidth over the bytes of the weights.
The reference forward of Int8Linear / Int4Linear / GPTQLinear dequantises the whole weight with a chain of torch
ops on every call (several float copies of the weight, written then read). Here:

    int8_linear(x, weight int8 [N, K], scales [N], bias)
    int4_linear(x, qweight uint8 [N, K/2], scales [N, G], zeros uint8 [N, G], group_size, bias)
    dense_linear(x, weight float32 | bf16 [N, K], bias)     (fast_linear.FastLinear: a bf16 model's decode GEMV;
                                                              torch's own reads bf16 at half the float32 speed)
    decode_attention(q, k, v, mask)                         (one query per row: SDPA of a decode step)
    add_rms_norm / rope / silu_mul                          (the elementwise glue of qwen2_vl_fast's decode step)
    decode_step(plan, h, ...)                               (that whole step, every layer, in one call:
                                                              decode_step.cpp, on the kernels above)

  * up to FAST_MAX_ROWS rows of x that need no gradient (decoding): matrix-vector kernels that read the packed
    codes once and never build the float weight; they compute in float32 (bfloat16 x and y are converted inside),
    where the reference rounds the weight to x's dtype first, so in bf16 the kernels are the more accurate;
  * more rows (a prefill) or an x that needs a gradient (Q-LoRA): the weight is dequantised by one parallel pass
    here, to the very bits the reference computes, and multiplied by torch (so the result equals the reference).

  * with bfloat16 x, one row and int4 groups of a multiple of 64, on a CPU with AVX512-BF16: the codes become exact
    bf16 values by a table lookup and vdpbf16ps adds their exact products with x in float32 (half the instructions
    of converting codes to float). On by default on AMD CPUs only (see bf16_dot_by_default); `switch("bf16_dot",
    on)` sets it.
  * int8 on a CPU with AVX512-VNNI: each row of x is split into two int16 halves (x = s (hi + lo / 32768), to 2^-24)
    and vpdpwssd multiplies 32 codes per instruction with each; the integer sums are exact, so the result is as
    accurate as float32 arithmetic (`switch("int8_vnni", False)` turns it off).
  * int4 on a CPU with AVX2 (groups of a multiple of 64, up to 1024): x is quantised per group to integers of 2
    bytes (bfloat16 x: to 2^-15 of the group's largest |x|) or 3 (float32 x: 2^-23), and vpmaddubsw multiplies 32
    codes per instruction with each byte, summing exactly in integers: half the instructions of converting codes to
    float (`switch("int4_i8", False)` turns it off).
  * int8 with bfloat16 x on a CPU with AVX2 (no VNNI): x is quantised per group of 128 to int16 (2^-16 of the
    group's largest |x|; bf16 x itself carries 2^-8) and vpmaddwd multiplies 16 widened codes per instruction with
    it, summing exactly in int32 (`switch("int8_i16", False)` turns it off).

GPTQLinear runs int4_linear on its own words, read transposed (GPTQLinear.kernel_tensors says why that is exact).
Both return y [..., N] in x's dtype, or None when they do not apply (off the CPU, an odd group size, no kernels
on this machine): the caller then runs its reference forward.

Why not torch.compile or PyTorch's own int8/int4 ops (measured on this 2-core AVX-512 machine, 1 thread, a
1536 x 8960 weight, busy machine): inductor's generated GEMV reached 25-50% of the read bandwidth (one output
row at a time, a cascade-summation helper for reductions over 4096, ~30 us of guard and wrapper overhead per
call), `_weight_int8pack_mm` 60-80% for int8, and there is no stock kernel for the asymmetric group-wise or
GPTQ layouts. These kernels reach 80-115% (int8) and 55-95% (int4) of a 1 GiB tensor sum's bandwidth on the
2B model's MLP and lm_head shapes, less on small layers (a 256 x 1536 one is mostly the ~20 us of Python and
ctypes per call); int4 is bound by unpacking the nibbles there (benchmarks/bench_quant.py: whole models).
On an AMD EPYC (Zen 4, AVX512-VNNI and -BF16, 2 threads) the row-sequential kernels (4 rows at a time for inputs
longer than 4096) with the VNNI int8 path took the 2B-shaped decode of bench_quant.py from 8.5 to 14-17 tok/s
(int8) and from 11.0 to 20-21 (int4); a lone int8 GEMV streams from memory at ~85-90% of a plain read loop.

The library is compiled with the C++ compiler found on PATH ($CXX, c++, g++, clang++) for the vector width
torch reports for this CPU, cached under $QWENVL_KERNEL_CACHE (default ~/.cache/qwenvl/kernels) keyed by the
source, compiler and flags. Set QWENVL_QUANT_KERNELS=0 to turn it off (`unavailable_reason()` says why it is
off). Without it, int8 decoding uses `torch.ops.aten._weight_int8pack_mm`; everything else the reference.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

# Up to this many rows of x (batch x new tokens) the matrix-vector kernels run, above it dequantise + matmul. The
# kernels cost ~linear in the rows, the other path ~a constant (one pass over the weight; the bf16 matmul is cheap):
# measured at 1 thread on a 1536 x 8960 weight, they break even at ~16 rows (int4, GPTQ) and ~28 (int8).
FAST_MAX_ROWS = 16

SOURCE = Path(__file__).with_name("quant_kernels.cpp")
SOURCES = (SOURCE, SOURCE.with_name("decode_step.cpp"), SOURCE.with_name("row_kernels.cpp"))   # one library
HEADER = SOURCE.with_name("quant_kernels.h")
_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
SIGNATURES = {   # argument types of the library's extern "C" functions (the SOURCES)
    "qk_int8": [_P, _I64, _I64, _P, _P, _P, _P, _I64, _INT, _INT],
    "qk_int4": [_P, _I64, _I64, _P, _P, _P, _I64, _P, _P, _I64, _INT, _INT],
    "qk_dense": [_P, _I64, _I64, _P, _INT, _P, _P, _I64, _INT, _INT],
    "qk_dequant_int8": [_P, _P, _P, _I64, _I64, _INT, _INT],
    "qk_dequant_int4": [_P, _P, _P, _I64, _P, _I64, _I64, _INT, _INT],
    "qk_attend": [_P, _P, _P, _INT, _P, _P, _I64, _I64, _I64, _I64, _I64, ctypes.c_float, _P, _INT],
    "qk_add_rms_norm": [_P, _P, _P, _I64, _I64, ctypes.c_float, _INT, _P],
    "qk_rope": [_P, _I64, _I64, _I64, _I64, _P, _P, _INT, _P],
    "qk_silu_mul": [_P, _I64, _I64, _INT, _P],
    "qk_decode_step": [_P, _P, _P, _P, _I64, _P, ctypes.c_float, ctypes.c_float, _P, _INT],
    "qk_rows_rope": [_P, _P, _I64, _I64, _I64, _I64, _P, _P, _P, _INT, _P, _INT],
    "qk_rows_quick_gelu": [_P, _I64, _I64, _INT, _INT],
}

_lock = threading.Lock()
_state: dict = {}          # "lib": ctypes.CDLL | None, "why": reason it is None


# ------------------------------------------------------------------------------------------------ public API

def int8_linear(x: Tensor, weight: Tensor, scales: Tensor, bias: Tensor | None) -> Tensor | None:
    """x [..., K] @ (scales[:, None] * weight).T + bias, or None (see the module docstring)."""
    n, k = weight.shape
    path, lib = _path(x, k), library()
    if path is None or lib is None:
        return _int8_stock(x, weight, scales, bias) if path == "matvec" else None
    scales, f32_bias = _f32(scales), _f32(bias)                 # converted copies must outlive the call
    if path == "matmul":
        w = torch.empty(n, k, dtype=_weight_dtype(x))
        lib.qk_dequant_int8(_ptr(weight), _ptr(scales), w.data_ptr(), n, k, w.dtype == torch.bfloat16, _threads())
        return _matmul(x, w, bias)
    x2 = _rows(x, k)
    y = torch.empty(*x.shape[:-1], n, dtype=x2.dtype)
    lib.qk_int8(x2.data_ptr(), x2.shape[0], k, _ptr(weight), _ptr(scales), _ptr(f32_bias), y.data_ptr(), n,
                x2.dtype == torch.bfloat16, _threads())
    return y.to(x.dtype)


def int4_linear(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                bias: Tensor | None) -> Tensor | None:
    """x [..., K] @ W.T + bias for W[n, k] = scales[n, g] * (code[n, k] - zeros[n, g]), or None."""
    n, k = qweight.shape[0], 2 * qweight.shape[1]
    path, lib = _path(x, k), library()
    if path is None or lib is None or group_size % 2:
        return None
    if group_size % (2 * lanes()):                # the decode kernel reads whole vectors of one group
        path = "matmul"
    scales, f32_bias = _f32(scales), _f32(bias)
    if path == "matmul":
        w = torch.empty(n, k, dtype=_weight_dtype(x))
        lib.qk_dequant_int4(_ptr(qweight), _ptr(scales), _ptr(zeros), group_size, w.data_ptr(), n, k,
                            w.dtype == torch.bfloat16, _threads())
        return _matmul(x, w, bias)
    x2 = _rows(x, k)
    y = torch.empty(*x.shape[:-1], n, dtype=x2.dtype)
    lib.qk_int4(x2.data_ptr(), x2.shape[0], k, _ptr(qweight), _ptr(scales), _ptr(zeros), group_size,
                _ptr(f32_bias), y.data_ptr(), n, x2.dtype == torch.bfloat16, _threads())
    return y.to(x.dtype)


def dense_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor | None:
    """x [..., K] @ weight.T + bias for a float32 or bfloat16 weight [N, K] by the decode kernel, or None where it
    does not apply (many rows, a gradient, another dtype, no kernels): the caller then runs F.linear.

    Sums are float32 in both cases, as in torch's matmul; only their order differs (tests/test_fast_decode.py)."""
    n, k = weight.shape
    if weight.dtype not in (torch.float32, torch.bfloat16) or weight.requires_grad and torch.is_grad_enabled():
        return None
    if _path(x, k) != "matvec" or library() is None or not weight.is_contiguous():
        return None
    f32_bias = _f32(bias)
    x2 = _rows(x, k)
    y = torch.empty(*x.shape[:-1], n, dtype=x2.dtype)
    _state["lib"].qk_dense(x2.data_ptr(), x2.shape[0], k, weight.data_ptr(), weight.dtype == torch.bfloat16,
                           _ptr(f32_bias), y.data_ptr(), n, x2.dtype == torch.bfloat16, _threads())
    return y.to(x.dtype)


def decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor | None:
    """SDPA for one query per row, or None where the kernel does not apply (the caller then runs SDPA):

        q [B, H, 1, D], k / v [B, Hk, S, D] (H a multiple of Hk: grouped-query heads), float32 or bfloat16 on the
        CPU, rows of D contiguous (views of a KV cache are fine); mask: boolean, broadcastable to [B, 1, 1, S]
        (True = visible), or None. Returns [B, H, 1, D] in q's dtype, the default scale 1/sqrt(D).

    float32 products and sums (bf16 read exactly), then one rounding to q's dtype: within a bf16 step of SDPA."""
    b, h, t, d = q.shape
    hk, s = k.shape[1], k.shape[2]
    if (t != 1 or q.device.type != "cpu" or library() is None or k.dtype != v.dtype or q.requires_grad
            or k.dtype not in (torch.float32, torch.bfloat16) or k.shape != v.shape or k.shape[0] != b
            or h % hk or k.stride(-1) != 1 or v.stride(-1) != 1):
        return None
    visible = None
    if mask is not None:
        if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1:
            return None
        visible = mask.expand(b, 1, 1, s).reshape(b, s).to(torch.uint8).contiguous()
    qf = q.reshape(b, h, d).float().contiguous()
    out = torch.empty(b, h, d, dtype=torch.float32)
    strides = torch.tensor([*k.stride()[:3], *v.stride()[:3]], dtype=torch.int64)
    _state["lib"].qk_attend(qf.data_ptr(), k.data_ptr(), v.data_ptr(), k.dtype == torch.bfloat16,
                            strides.data_ptr(), _ptr(visible), b, h, hk, s, d, d ** -0.5, out.data_ptr(),
                            _threads())
    return out.view(b, h, 1, d).to(q.dtype)


# The elementwise glue of a decode step (qwen2_vl_fast.FastDecoder): a few thousand numbers per call, where one
# kernel call replaces 4-10 framework ops. Each returns None where it does not apply (the caller runs torch's ops).

def add_rms_norm(h: Tensor, delta: Tensor | None, weight: Tensor, eps: float) -> Tensor | None:
    """h += delta IN PLACE (when given), then text.RMSNorm of h [..., C] with `weight` [C]; h's dtype."""
    if not (_glue_ok(h) and h.is_contiguous() and _alike(weight, h, h.shape[-1:])
            and (delta is None or _alike(delta, h, h.shape))):
        return None
    normed = torch.empty_like(h)
    _state["lib"].qk_add_rms_norm(h.data_ptr(), _ptr(delta), weight.data_ptr(), h.numel() // h.shape[-1],
                                  h.shape[-1], eps, h.dtype == torch.bfloat16, normed.data_ptr())
    return normed


def rope(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor | None:
    """qwen2_vl_fast.rotate for x [B, H, 1, D] (rows of D contiguous, heads adjacent: a slice of the heads is fine)
    with cos and signed_sin [B, 1, 1, D] float32: a new [B, H, 1, D] tensor."""
    b, h, t, d = x.shape
    if not _glue_ok(x) or t != 1 or x.stride(-1) != 1 or x.stride(1) != d or cos.dtype != torch.float32 \
            or signed_sin.dtype != torch.float32 or cos.numel() != b * d or signed_sin.numel() != b * d:
        return None
    cos, signed_sin = cos.reshape(b, d).contiguous(), signed_sin.reshape(b, d).contiguous()
    out = torch.empty(b, h, 1, d, dtype=x.dtype)
    _state["lib"].qk_rope(x.data_ptr(), x.stride(0), b, h, d, cos.data_ptr(), signed_sin.data_ptr(),
                          x.dtype == torch.bfloat16, out.data_ptr())
    return out


def silu_mul(gate_up: Tensor) -> Tensor | None:
    """silu(gate) * up for gate_up [..., 2I] = [gate, up] (a fused gate/up projection's output): [..., I]."""
    if not _glue_ok(gate_up) or not gate_up.is_contiguous() or gate_up.shape[-1] % 2:
        return None
    i = gate_up.shape[-1] // 2
    out = gate_up.new_empty(*gate_up.shape[:-1], i)
    _state["lib"].qk_silu_mul(gate_up.data_ptr(), gate_up.numel() // (2 * i), i, gate_up.dtype == torch.bfloat16,
                              out.data_ptr())
    return out


# The elementwise glue of an image encode or a prefill (row_kernels.cpp): many rows, one pass each instead of 3-8
# framework ops that each read and write the whole activation. Each returns None where it does not apply.

def rows_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor | None:
    """text.apply_rope with a full-width rotary for x [B, H, T, D] or [H, T, D] (any strides, rows of D contiguous)
    and float32 cos / sin [T, D] or [B or 1, 1, T, D]: a new contiguous tensor of x's shape, the same bits."""
    squeeze = x.dim() == 3
    x4 = x[None] if squeeze else x
    c, s = (t[None] if t.dim() == 2 else t[:, 0] if t.dim() == 4 and t.shape[1] == 1 else None for t in (cos, sin))
    if x4.dim() != 4 or c is None or s is None or not _glue_ok(x):
        return None
    b, h, n, d = x4.shape
    if (x4.stride(-1) != 1 or d % 2 or c.shape != s.shape or c.stride() != s.stride() or c.shape[0] not in (1, b)
            or c.shape[1:] != (n, d) or c.dtype != torch.float32 or s.dtype != torch.float32 or c.stride(-1) != 1):
        return None
    xs = torch.tensor(x4.stride()[:3], dtype=torch.int64)
    cs = torch.tensor([c.stride(0) if c.shape[0] > 1 else 0, c.stride(1)], dtype=torch.int64)
    out = torch.empty(b, h, n, d, dtype=x.dtype)
    _state["lib"].qk_rows_rope(x4.data_ptr(), xs.data_ptr(), b, h, n, d, c.data_ptr(), s.data_ptr(), cs.data_ptr(),
                               x.dtype == torch.bfloat16, out.data_ptr(), _threads())
    return out[0] if squeeze else out


def rows_quick_gelu_(h: Tensor) -> Tensor | None:
    """h * sigmoid(1.702 * h) IN PLACE on a contiguous h [..., F] (returned), or None."""
    if not (_glue_ok(h) and h.is_contiguous() and h.numel()):
        return None
    _state["lib"].qk_rows_quick_gelu(h.data_ptr(), h.numel() // h.shape[-1], h.shape[-1], h.dtype == torch.bfloat16,
                                     _threads())
    return h


# ------------------------------------------------------------------------------------------------ whole step

@dataclass(frozen=True)
class KernelLinear:
    """One linear as the decode kernels take it (decode_step.cpp's Linear): y = x @ W.T + bias with
    kind 0 float32 / 1 bfloat16 weight [N, K], 2 int8 codes [N, K] x scale [N], 3 int4 codes [N, K/2] with
    scale / zero [N, K/group]. Holds every tensor its addresses point into (converted copies included)."""

    kind: int
    weight: Tensor
    n: int
    k: int
    scale: Tensor | None = None
    zero: Tensor | None = None
    bias: Tensor | None = None                  # float32
    group: int = 0

    def words(self) -> list[int]:
        """The 8 int64 words of decode_step.cpp's Linear."""
        return [self.kind, self.weight.data_ptr(), _address(self.scale), _address(self.zero), _address(self.bias),
                self.n, self.k, self.group]


def dense_kernel(weight: Tensor, bias: Tensor | None) -> KernelLinear | None:
    """dense_linear's decode GEMV as a KernelLinear, or None where dense_linear would not take it."""
    if weight.dtype not in (torch.float32, torch.bfloat16) or weight.device.type != "cpu" \
            or not weight.is_contiguous() or library() is None:
        return None
    return KernelLinear(int(weight.dtype == torch.bfloat16), weight, *weight.shape, bias=_f32(bias))


def int8_kernel(weight: Tensor, scales: Tensor, bias: Tensor | None) -> KernelLinear | None:
    """int8_linear's decode GEMV as a KernelLinear, or None where int8_linear would not run it."""
    if weight.device.type != "cpu" or library() is None or not weight.is_contiguous():
        return None
    return KernelLinear(2, weight, *weight.shape, scale=_f32(scales), bias=_f32(bias))


def int4_kernel(qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                bias: Tensor | None) -> KernelLinear | None:
    """int4_linear's decode GEMV as a KernelLinear, or None where int4_linear would not run it."""
    if qweight.device.type != "cpu" or library() is None or group_size % 2 or group_size % (2 * lanes()) \
            or not (qweight.is_contiguous() and zeros.is_contiguous()):
        return None
    return KernelLinear(3, qweight, qweight.shape[0], 2 * qweight.shape[1], scale=_f32(scales), zero=zeros,
                        bias=_f32(bias), group=group_size)


def decode_step(plan: Tensor, h: Tensor, cos: Tensor, signed_sin: Tensor, slot: int, visible: Tensor | None,
                eps: float, scale: float) -> Tensor:
    """Every decoder layer of one decode step in one call (decode_step.cpp; qwen2_vl_fast.DecodePlan writes `plan`
    and checks what the kernel assumes). h [B, C] (contiguous) is updated in place; returns the final RMSNorm of it.
    cos / signed_sin [B, D] float32, visible [B, slot + 1] uint8 or None."""
    normed = torch.empty_like(h)
    _state["lib"].qk_decode_step(plan.data_ptr(), h.data_ptr(), cos.data_ptr(), signed_sin.data_ptr(), slot,
                                 _ptr(visible), eps, scale, normed.data_ptr(), _threads())
    return normed


def _glue_ok(x: Tensor) -> bool:
    """A float32 / bf16 CPU tensor that needs no gradient, and the kernels built."""
    return (x.dtype in (torch.float32, torch.bfloat16) and x.device.type == "cpu" and library() is not None
            and not (torch.is_grad_enabled() and x.requires_grad))


def _alike(t: Tensor, x: Tensor, shape: torch.Size) -> bool:
    return t.dtype == x.dtype and t.device == x.device and t.shape == shape and t.is_contiguous()


def library() -> ctypes.CDLL | None:
    """The compiled kernels (built on first use, then loaded from the cache), or None if they cannot be had."""
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                lib, why = _load()
                _state.update(lib=lib, why=why, lanes=lib.qk_lanes() if lib is not None else 0)
    return _state["lib"]


def unavailable_reason() -> str | None:
    """Why the compiled kernels are off (None when they are on)."""
    library()
    return _state["why"]


# The optional kernels, by their number in qk_switch (quant_kernels.cpp).
SWITCHES = {"bf16_dot": 0, "int8_vnni": 1, "int4_i8": 2, "int8_i16": 3, "int4_vnni": 4}


def switch(name: str, on: bool | None = None) -> bool | None:
    """Whether the optional kernel `name` (a key of SWITCHES) is on; pass on=True/False to switch it. None when the
    library was built without it (a CPU without the instructions it needs) or there is no library."""
    lib = library()
    state = -1 if lib is None else lib.qk_switch(SWITCHES[name], -1 if on is None else int(on))
    return None if state < 0 else bool(state)


def lanes() -> int:
    """float32 lanes per vector the library was built for (16 AVX-512, 8 AVX2, 4 otherwise; 0 without it)."""
    library()
    return _state["lanes"]


# ------------------------------------------------------------------------------------------------ call helpers

def _path(x: Tensor, k: int) -> str | None:
    """How to multiply x: "matvec" for a few rows that need no gradient (decoding: the kernels), "matmul" for more
    rows (a prefill) or a gradient (Q-LoRA: a weight dequantised here, torch's matmul), None off the CPU or empty."""
    if x.shape[-1] != k:
        raise ValueError(f"input has {x.shape[-1]} features, the layer expects {k}")
    rows = x.numel() // k
    if x.device.type != "cpu" or rows == 0:
        return None
    return "matvec" if rows <= FAST_MAX_ROWS and not (x.requires_grad and torch.is_grad_enabled()) else "matmul"


def _rows(x: Tensor, k: int) -> Tensor:
    """x as contiguous rows [M, K]: bfloat16 as is (the kernels convert it), other dtypes as float32."""
    x2 = x if x.dim() == 2 and x.is_contiguous() else x.reshape(-1, k).contiguous()
    return x2 if x2.dtype == torch.bfloat16 else x2.float()


def _weight_dtype(x: Tensor) -> torch.dtype:
    return torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32


def _matmul(x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    """The reference forward's matmul, on the same weight bits (dequantised in float32, rounded to x's dtype); in
    float32 on those bits where torch would emulate bf16 (see linear)."""
    return linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))


def _threads() -> int:
    return torch.get_num_threads()


def _f32(t: Tensor | None) -> Tensor | None:
    """t as contiguous float32 (itself when it already is). The caller must hold the result until the kernel
    returns: a pointer into a temporary that was already freed reads garbage."""
    if t is None or (t.dtype == torch.float32 and t.is_contiguous()):
        return t
    return t.float().contiguous()


def _address(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _ptr(t: Tensor | None) -> int | None:
    if t is None:
        return None
    if not t.is_contiguous():
        raise ValueError(f"quantized buffer {tuple(t.shape)} must be contiguous")
    return t.data_ptr()


def _int8_stock(x: Tensor, weight: Tensor, scales: Tensor, bias: Tensor | None) -> Tensor | None:
    """PyTorch's own int8 weight-only matmul, for decoding when the kernels cannot be built."""
    op = getattr(torch.ops.aten, "_weight_int8pack_mm", None)
    if op is None or os.environ.get("QWENVL_QUANT_KERNELS") == "0":
        return None
    x2 = x.reshape(-1, weight.shape[1]).float()
    y = op(x2, weight, _f32(scales))                                                  # [M, N] float32
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).view(*x.shape[:-1], y.shape[-1])


# ------------------------------------------------------------------------------------------------ build + load

def _load() -> tuple[ctypes.CDLL | None, str | None]:
    if os.environ.get("QWENVL_QUANT_KERNELS") == "0":
        return None, "disabled by QWENVL_QUANT_KERNELS=0"
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        return None, f"{type(e).__name__}: {e}"
    for name, argtypes in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, None
    lib.qk_lanes.restype = ctypes.c_int
    lib.qk_switch.argtypes, lib.qk_switch.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    lib.qk_switch(SWITCHES["bf16_dot"], int(bf16_dot_by_default()))
    return lib, None


def bf16_dot_by_default() -> bool:
    """Whether int4 with one bf16 row takes the AVX512-BF16 table-lookup kernel rather than the integer one (AVX2).
    Its two vpermw per 64 codes compete for one port on Intel cores: on the Intel Xeon (AMX) of 2026-12-05 one
    8960 x 1536 GEMV read 15.6 GB/s of codes with it and 24.6 without, and the 2B decode (bench_quant) ran 8.8 tok/s
    (28% of the roofline) against 20.8 (67%). On the AMD Zen 4 of session 8 it reached 63% (the integer kernel was
    not measured there), so AMD keeps it."""
    return _cpu_vendor() == "AuthenticAMD"


def _cpu_vendor() -> str:
    """/proc/cpuinfo's vendor_id (e.g. GenuineIntel, AuthenticAMD), or '' where there is none."""
    return _cpuinfo("vendor_id")


def isa_flags() -> tuple[int, list[str]]:
    """(float32 lanes, compiler flags) for the vector ISA torch detected on this CPU."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability == "AVX512":
        flags = _cpu_flags()
        bf16_dot = ["-mavx512bf16", "-DQK_BF16_DOT"] if "avx512_bf16" in flags else []
        vnni = ["-mavx512vnni", "-DQK_VNNI"] if "avx512_vnni" in flags else []
        return 16, ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", *bf16_dot, *vnni]
    if capability == "AVX2":
        return 8, ["-mavx2", "-mfma"]
    return 4, []


UPCAST_MIN_ROWS = 32


def linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """F.linear; many bf16 rows on a CPU without bf16 matmul instructions (native_bf16_matmul) in float32 on a
    float32 copy of the weight made for the call, rounded to bf16 once: the same exact bf16 products, summed in
    float32 as oneDNN's bf16 kernel sums them (in another order), at 6x the speed of torch's bf16 emulation. For
    FastLinear's and the quantized linears' prefills and the vision projections (vision.*.project)."""
    if _upcast(x, weight):
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(torch.bfloat16)
    return F.linear(x, weight, bias)


def _upcast(x: Tensor, weight: Tensor) -> bool:
    """Whether this bf16 matmul runs faster in float32 here (many rows, no gradient, no bf16 instructions)."""
    return (x.dtype == weight.dtype == torch.bfloat16 and x.device.type == "cpu" and x.numel() >= UPCAST_MIN_ROWS *
            x.shape[-1] and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and not bf16_is_native())


def bf16_is_native() -> bool:
    """native_bf16_matmul(), read once (tests set _CPU["native"])."""
    if "native" not in _CPU:
        _CPU["native"] = native_bf16_matmul()
    return _CPU["native"]


_CPU: dict[str, bool] = {}


def native_bf16_matmul() -> bool:
    """Whether torch's CPU matmul has bfloat16 instructions to run on here (AVX512-BF16 or AMX). Without them (AVX2
    x86 CPUs) it emulates bf16: on the AMD EPYC Zen 3 of 2026-12-04, F.linear of 1024 x 1664 by 1664 x 8192 ran at
    20 GFLOP/s in bf16 and 127 in float32. Non-x86 CPUs count as native (not measured)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True
    return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})


def _cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    return set(_cpuinfo("flags").split())


def _cpuinfo(field: str) -> str:
    """The first `field : value` of /proc/cpuinfo, stripped ('' where there is none)."""
    info = Path("/proc/cpuinfo")
    for line in info.read_text().splitlines() if info.is_file() else []:
        if line.split(":", 1)[0].strip() == field:
            return line.split(":", 1)[1].strip()
    return ""


def _build() -> Path:
    """Compile SOURCES to one cached shared library (atomically: concurrent builds are harmless)."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not cxx or not all(path.is_file() for path in (*SOURCES, HEADER)):
        raise RuntimeError(f"no C++ compiler on PATH ({cxx=}) or missing {[p.name for p in SOURCES]}")
    n_lanes, isa = isa_flags()
    flags = ["-O3", "-std=c++20", "-shared", "-fPIC", "-fno-math-errno", f"-DQK_LANES={n_lanes}", *isa]
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    code = b"".join(path.read_bytes() for path in (*SOURCES, HEADER))
    key = hashlib.sha256(code + "\0".join([cxx, version, *flags]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("QWENVL_KERNEL_CACHE") or Path.home() / ".cache" / "qwenvl" / "kernels")
    out = cache / f"quant_kernels-{key}.so"
    if out.is_file():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    errors = []
    for openmp in (["-fopenmp"], []):                 # without OpenMP the kernels run on one thread
        fd, tmp = tempfile.mkstemp(dir=cache, suffix=".so.tmp")
        os.close(fd)
        done = subprocess.run([cxx, *flags, *openmp, *map(str, SOURCES), "-o", tmp], capture_output=True,
                              text=True, timeout=600)
        if done.returncode == 0:
            os.replace(tmp, out)
            return out
        os.remove(tmp)
        errors.append(done.stderr.strip()[-2000:])
    raise RuntimeError(f"{cxx} could not build {[p.name for p in SOURCES]}:\n" + "\n".join(errors))
