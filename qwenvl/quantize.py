"""Weight-only quantization as module swaps on the LLM's linears (the ViT and adapter stay in float).

Our own schemes (`quantize_model`, recorded in config.json as
`quantization_config = {"quant_method": "qwenvl", "bits": 8|4, "group_size": 128, "sym": bool}`, plus
`"lm_head": true` when lm_head is quantized too):

    Int8Linear   weight int8 [out, in], scales [out]            W = scales[o] * q[o, i]   (per output channel)
    Int4Linear   qweight uint8 [out, in/2] (even input in the low nibble), scales [out, G], zeros [out, G]
                 W = scales[o, g] * (q[o, i] - zeros[o, g]),  g = i // group_size;  sym: zeros = 8

`GPTQLinear` holds a linear in the layout of the official Qwen-VL-Chat-Int4 checkpoints (AutoGPTQ, 4 bits,
group size 128, "zero - 1" offset format) under the checkpoint's own buffer names, so such a checkpoint
loads as a plain state dict, without AutoGPTQ or CUDA:

    qweight int32 [in/8, out]   8 input codes per word, input 8r+j in bits 4j..4j+3 (least significant first)
    qzeros  int32 [G, out/8]    8 output zero points per word, stored as zero - 1
    scales  fp16  [G, out]      step per group and output
    g_idx   int32 [in]          group of each input (i // group_size without act-order)
    bias    fp16  [out]         always present (zeros where the float model has none)
    W[o, i] = scales[g_idx[i], o] * (q[i, o] - zero[g_idx[i], o])

Each linear has two forwards: `reference_forward` dequantises the whole weight with torch ops and calls F.linear,
and `forward`, which runs the compiled CPU paths of quant_kernels.py (decode kernels for a few rows; a fast
dequantisation to the same bits before torch's matmul otherwise) and falls back to the reference where those do
not apply. tests/test_quant_kernels.py checks that the two agree.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import quant_kernels

# The linears of each decoder block that the official Int4 checkpoints quantize (lm_head and wte are not).
LLM_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj")
# The same for Qwen2-VL's decoder layers (`model.layers.*`).
QWEN2_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def unpack_int4(words: Tensor, dim: int) -> Tensor:
    """Unpack int32 words [R, C] into 8 unsigned 4-bit codes each along `dim` (0 or 1), low nibble first.

    Example: the word 0x76543210 unpacks to [0, 1, 2, 3, 4, 5, 6, 7]. Negative words (top nibble >= 8)
    are fine: the shift is arithmetic, but the mask keeps only the nibble.
    """
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=words.device)       # [8]
    r, c = words.shape
    if dim == 0:
        codes = (words[:, None, :] >> shifts[None, :, None]) & 0xF                  # [R, 8, C]
        return codes.reshape(r * 8, c).to(torch.uint8)
    if dim == 1:
        codes = (words[:, :, None] >> shifts[None, None, :]) & 0xF                  # [R, C, 8]
        return codes.reshape(r, c * 8).to(torch.uint8)
    raise ValueError(f"{dim=} must be 0 or 1")


KERNEL_CACHE_KEYS = ("qweight", "qzeros", "scales", "g_idx", "bias")    # GPTQLinear rebuilds its cache when one changes


class GPTQLinear(nn.Module):
    """A 4-bit GPTQ linear (official Int4 layout): the int4 kernel for decoding, dequantized on the fly otherwise."""

    def __init__(self, in_features: int, out_features: int, group_size: int = 128, bits: int = 4):
        super().__init__()
        if bits != 4:
            raise ValueError(f"only 4-bit GPTQ checkpoints are supported, got {bits=}")
        if in_features % group_size or in_features % 8 or out_features % 8:
            raise ValueError(f"GPTQ needs {in_features=} divisible by {group_size=} and by 8, {out_features=} by 8")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(in_features // 8, out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(groups, out_features // 8, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16))

    def codes(self) -> tuple[Tensor, Tensor]:
        """(q [in, out] uint8 codes, zero [G, out] uint8 zero points after the +1)."""
        return unpack_int4(self.qweight, dim=0), self.codes_zero()                   # [in, out], [G, out]

    def dequantize(self) -> Tensor:
        """The float32 weight [out, in], exactly scale * (q - zero) (the product is exact in float32)."""
        q, zero = self.codes()
        g = self.g_idx.long()
        w_t = self.scales.float()[g] * (q.float() - zero.float()[g])                  # [in, out]
        return w_t.t().contiguous()

    def reference_forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.dequantize().to(x.dtype), self.bias.to(x.dtype))

    def forward(self, x: Tensor) -> Tensor:
        tensors = self.kernel_tensors()
        y = None if tensors is None else quant_kernels.int4_linear(x, *tensors[:3], self.group_size, tensors[3])
        return self.reference_forward(x) if y is None else y

    def decode_kernel(self) -> quant_kernels.KernelLinear | None:
        """This layer for qwen2_vl_fast's whole-step kernel (None where forward would not run the int4 kernel)."""
        tensors = self.kernel_tensors()
        return None if tensors is None else quant_kernels.int4_kernel(*tensors[:3], self.group_size, tensors[3])

    def kernel_tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
        """This linear in Int4Linear's layout, for the int4 kernels: (codes uint8 [out, in/2], scales float32
        [out, G], zero points uint8 [out, G], bias float32 [out]); None where they do not apply (act-order g_idx,
        not on the CPU).

        A GPTQ word holds input 8r+j of one output in bits 4j..4j+3, low bits first: the nibble order of
        Int4Linear's bytes (input 2i in the low nibble of byte i). So the transposed word matrix [out, in/8],
        read as bytes, is Int4Linear's qweight. The first call stores qweight transposed in memory: the buffer
        keeps its shape, values and state_dict (saving makes it contiguous again), only its strides change, so
        this repacking costs no memory. The small tensors are cached as a plain attribute (not a buffer)."""
        buffers = self._buffers
        if buffers["qweight"].device.type != "cpu" or sys.byteorder != "little":
            return None
        if not buffers["qweight"].t().is_contiguous():             # as loaded: [in/8, out] row-major
            self.qweight = self.qweight.t().contiguous().t()       # same [in/8, out] tensor, stored [out, in/8]
        key = tuple((buffers[n].data_ptr(), buffers[n]._version) for n in KERNEL_CACHE_KEYS)
        cached = self.__dict__.get("_kernel_cache")
        if cached is None or cached[0] != key:
            in_order = torch.equal(self.g_idx.long(), torch.arange(self.in_features) // self.group_size)
            tensors = None
            if in_order:
                tensors = (self.qweight.t().view(torch.uint8), self.scales.float().t().contiguous(),
                           self.codes_zero().t().contiguous(), self.bias.float())
            cached = self._kernel_cache = (key, tensors)
        return cached[1]

    def codes_zero(self) -> Tensor:
        """Zero points uint8 [G, out] after the +1 (the second half of `codes()`, without unpacking qweight)."""
        return ((unpack_int4(self.qzeros, dim=1).int() + 1) & 0xF).to(torch.uint8)


class Int8Linear(nn.Module):
    """Per-output-channel symmetric int8 weights: q = round(w / s), s = max|w_o| / 127."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.zeros(out_features, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        w = linear.weight.detach().float()
        scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127                            # [out]
        q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        out = cls(linear.in_features, linear.out_features, linear.bias is not None)
        out.weight.copy_(q)
        out.scales.copy_(scales)
        if linear.bias is not None:
            out.bias = linear.bias.detach().float().clone()
        return out

    def dequantize(self) -> Tensor:
        return self.weight.float() * self.scales[:, None]                               # [out, in]

    def reference_forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize().to(x.dtype), bias)

    def forward(self, x: Tensor) -> Tensor:
        y = quant_kernels.int8_linear(x, self.weight, self.scales, self.bias)
        return self.reference_forward(x) if y is None else y

    def decode_kernel(self) -> quant_kernels.KernelLinear | None:
        """This layer for qwen2_vl_fast's whole-step kernel (None where forward would not run the int8 kernel)."""
        return quant_kernels.int8_kernel(self.weight, self.scales, self.bias)


def check_int4_width(in_features: int, group_size: int) -> None:
    if in_features % group_size or in_features % 2:
        raise ValueError(f"int4 needs {in_features=} divisible by {group_size=} (and even)")


class Int4Linear(nn.Module):
    """Group-wise int4 weights (symmetric or asymmetric), two codes per byte."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int = 128, sym: bool = True):
        super().__init__()
        check_int4_width(in_features, group_size)
        self.in_features, self.out_features, self.group_size, self.sym = in_features, out_features, group_size, sym
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(out_features, groups, dtype=torch.float32))
        self.register_buffer("zeros", torch.full((out_features, groups), 8, dtype=torch.uint8))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128, sym: bool = True) -> "Int4Linear":
        """Round-to-nearest codes (quantize_int4's clip search)."""
        check_int4_width(linear.in_features, group_size)
        # Row chunks bound the clip search's temporaries (a 151936-row lm_head would need ~10 float copies).
        chunks = [quantize_int4(w.float(), group_size, sym) for w in linear.weight.detach().split(8192)]
        codes, scales, zeros = (torch.cat(parts) for parts in zip(*chunks))
        return cls.from_codes(linear, codes, scales, zeros, group_size, sym)

    @classmethod
    def from_codes(cls, linear: nn.Linear, codes: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                   sym: bool) -> "Int4Linear":
        """The layer for codes [out, in] (0..15), scales / zeros [out, G] chosen for `linear` (whose bias it keeps)."""
        out = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size, sym)
        out.qweight.copy_(pack_int4(codes))
        out.scales.copy_(scales)
        out.zeros.copy_(zeros)
        if linear.bias is not None:
            out.bias = linear.bias.detach().float().clone()
        return out

    def dequantize(self) -> Tensor:
        q = unpack_nibbles(self.qweight).float()                                         # [out, in]
        scales = self.scales.repeat_interleave(self.group_size, dim=1)                   # [out, in]
        zeros = self.zeros.float().repeat_interleave(self.group_size, dim=1)
        return (q - zeros) * scales

    def reference_forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize().to(x.dtype), bias)

    def forward(self, x: Tensor) -> Tensor:
        y = quant_kernels.int4_linear(x, self.qweight, self.scales, self.zeros, self.group_size, self.bias)
        return self.reference_forward(x) if y is None else y

    def decode_kernel(self) -> quant_kernels.KernelLinear | None:
        """This layer for qwen2_vl_fast's whole-step kernel (None where forward would not run the int4 kernel)."""
        return quant_kernels.int4_kernel(self.qweight, self.scales, self.zeros, self.group_size, self.bias)


def quantize_int4(w: Tensor, group_size: int, sym: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Round-to-nearest int4 codes [out, in] (0..15), scales [out, G], zeros [out, G] for weight w [out, in].

    Symmetric: zero 8, scale = clip * max|w| / 7. Asymmetric: scale = clip * (max - min) / 15,
    zero = round(-clip * min / scale). For each group the clip ratio in CLIP_RATIOS with the smallest squared
    error is kept (clipping a few outliers buys resolution for the rest).
    Example (sym, one group [0.7, -0.35]): clip 1 gives scale 0.1, codes [15, 4] (4.5 rounds half to even),
    squared error 0.0025; clip 0.95 gives scale 0.095, codes [15, 4], error 0.0021, so 0.95 is kept.
    """
    out_f, in_f = w.shape
    g = w.view(out_f, in_f // group_size, group_size)                                   # [out, G, group]
    best = None
    for clip in CLIP_RATIOS:
        q, scales, zeros = _rtn_int4(g, sym, clip)
        err = ((q - zeros[..., None]) * scales[..., None] - g).pow(2).sum(-1)           # [out, G]
        if best is None:
            best = [q, scales, zeros, err]
            continue
        better = err < best[3]
        best[0] = torch.where(better[..., None], q, best[0])
        best[1], best[2], best[3] = (torch.where(better, a, b) for a, b in zip((scales, zeros, err), best[1:]))
    q, scales, zeros, _ = best
    return q.view(out_f, in_f).to(torch.uint8), scales, zeros.to(torch.uint8)


CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


def _rtn_int4(g: Tensor, sym: bool, clip: float) -> tuple[Tensor, Tensor, Tensor]:
    """Codes, scales, zeros of groups g [out, G, group] for one clip ratio (float tensors)."""
    if sym:
        scales = (clip * g.abs().amax(-1) / 7).clamp(min=1e-12)
        zeros = torch.full_like(scales, 8)
    else:
        lo, hi = clip * g.amin(-1).clamp(max=0), clip * g.amax(-1).clamp(min=0)
        scales = ((hi - lo) / 15).clamp(min=1e-12)
        zeros = torch.round(-lo / scales).clamp(0, 15)
    q = torch.round(g / scales[..., None] + zeros[..., None]).clamp(0, 15)
    return q, scales, zeros


def pack_int4(q: Tensor) -> Tensor:
    """Codes [out, in] (0..15) -> bytes [out, in/2], input 2k in the low nibble. [[1, 2]] -> [[0x21]]."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)


def unpack_nibbles(packed: Tensor) -> Tensor:
    """Inverse of pack_int4: bytes [out, in/2] -> codes [out, in]."""
    low, high = packed & 0xF, packed >> 4
    return torch.stack([low, high], dim=-1).view(packed.shape[0], -1)


def quantize_model(model: nn.Module, bits: int, group_size: int = 128, sym: bool = True,
                   lm_head: bool = False) -> dict:
    """Swap the LLM block linears (and lm_head if asked) for Int8Linear / Int4Linear in place; returns (and
    records) the scheme. The official Int4 checkpoints keep lm_head in float; quantizing it too saves another
    vocab x hidden weight read per decoded token (a quarter of a 2B model's bytes in bf16)."""
    if bits == 8:
        swap_linears(model, Int8Linear.from_linear, lm_head)
    elif bits == 4:
        check_group_size(model, group_size, lm_head)
        swap_linears(model, lambda lin: Int4Linear.from_linear(lin, group_size, sym), lm_head)
    else:
        raise ValueError(f"{bits=}: choose 8 or 4")
    scheme = {"quant_method": "qwenvl", "bits": bits, "group_size": group_size, "sym": sym}
    if lm_head:
        scheme["lm_head"] = True
    model.config.quantization_config = scheme
    return scheme


def check_group_size(model: nn.Module, group_size: int, lm_head: bool = False) -> None:
    """Raise (before anything is swapped) unless `group_size` divides the input width of every linear to quantize.

    e.g. the demo model's c_proj reads 704 inputs: group 128 is refused with "use --group-size 64"."""
    if group_size < 2 or group_size % 2:
        raise ValueError(f"int4 group size {group_size}: use an even number (the official checkpoints use 128)")
    widths = {linear.in_features for _, _, linear in iter_llm_linears(model, lm_head)}
    bad = sorted(w for w in widths if w % group_size)
    if bad:
        fits = [g for g in (128, 64, 32, 16) if g <= max(group_size, 16) and all(w % g == 0 for w in widths)]
        hint = f"use --group-size {fits[0]}" if fits else "no group size of 16-128 divides them all"
        raise ValueError(f"int4 group size {group_size} does not divide the input widths {bad or sorted(widths)} of "
                         f"this model's linears: {hint}")


def quantized_swap(model: nn.Module, quantization_config: dict) -> None:
    """Empty quantized shells for the scheme in config.json (before loading a quantized checkpoint)."""
    cfg = quantization_config
    method = cfg.get("quant_method", "gptq")
    if method == "gptq":
        gptq_swap(model, cfg)
        return
    if method != "qwenvl":
        raise ValueError(f"unsupported quant_method {method!r} (supported: 'gptq', 'qwenvl')")
    bits, group, sym = int(cfg["bits"]), int(cfg.get("group_size", 128)), bool(cfg.get("sym", True))

    def make(lin: nn.Linear) -> nn.Module:
        with torch.device(lin.weight.device):
            if bits == 8:
                return Int8Linear(lin.in_features, lin.out_features, lin.bias is not None)
            return Int4Linear(lin.in_features, lin.out_features, lin.bias is not None, group, sym)

    swap_linears(model, make, bool(cfg.get("lm_head", False)))


def iter_llm_linears(model: nn.Module, lm_head: bool = False):
    """(parent module, attribute name, linear) of each LLM block linear (LLM_LINEARS in `transformer.h.*` for
    Qwen-VL, QWEN2_LINEARS in `model.layers.*` for Qwen2-VL), then lm_head if asked."""
    if hasattr(model, "transformer"):
        blocks, paths = model.transformer.h, LLM_LINEARS
    elif hasattr(model, "model") and hasattr(model.model, "layers"):
        blocks, paths = model.model.layers, QWEN2_LINEARS
    else:
        raise ValueError(f"{type(model).__name__} has neither transformer.h (Qwen-VL) nor model.layers (Qwen2-VL)")
    for block in blocks:
        for path in paths:
            parent_name, name = path.split(".")
            parent = getattr(block, parent_name)
            yield parent, name, getattr(parent, name)
    if lm_head:
        yield model, "lm_head", model.lm_head


def swap_linears(model: nn.Module, make: callable, lm_head: bool = False) -> int:
    """Replace each LLM block linear (and lm_head if asked; see iter_llm_linears) by `make(linear)`; the count."""
    found = list(iter_llm_linears(model, lm_head))
    for parent, name, linear in found:
        setattr(parent, name, make(linear))
    return len(found)


def gptq_swap(model: nn.Module, quantization_config: dict) -> None:
    """Turn the model's LLM linears into GPTQLinear shells (meta or real) matching `quantization_config`."""
    cfg = quantization_config
    if cfg.get("desc_act"):
        raise ValueError("GPTQ checkpoints with desc_act=true (act-order) are not supported yet")
    group = int(cfg.get("group_size", 128))

    def make(linear: nn.Linear) -> GPTQLinear:
        device = linear.weight.device
        with torch.device(device):
            return GPTQLinear(linear.in_features, linear.out_features, group, int(cfg.get("bits", 4)))

    swap_linears(model, make)
