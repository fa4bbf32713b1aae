"""GPTQ int4 quantization (Frantar et al. 2022): round the columns of a weight one at a time and push each column's
rounding error onto the columns not yet rounded, weighted by the inverse Hessian of the layer's inputs, so that the
layer's outputs on calibration data move as little as possible. Round-to-nearest (quantize.quantize_int4) treats
every weight alone.

    batches = calibration_batches("calib.json", tokenizer, model.config.visual.image_size, n=128)
    hessians = collect_hessians(model, batches)        # {linear: H = 2/n sum x x^T}  over calibration inputs
    gptq_quantize_model(model, hessians, group_size=128, sym=True)   # Int4Linear swaps, in place

Per linear, W [out, in] float32 and H [in, in]:
    H += damp * mean(diag H) * I                               (damping; a dead input, diag 0, gets H = 1, W = 0)
    U = cholesky(H^-1) upper
    for each group of columns g (processed as one block):
        scales, zeros from the current (already error-corrected) W[:, g] (quantize_int4: the same clip search)
        for column i in g:  q_i = round(w_i / s + z);  e = (w_i - s (q_i - z)) / U[i, i];  W[:, i:g_end] -= e U[i, i:]
        W[:, g_end:] -= E_g U[g, g_end:]                       (the block's errors, once: "lazy batch" updates)
The codes, scales and zeros are those of Int4Linear (and of its kernels); only their choice differs. No activation
order (desc_act false, as the official Int4 checkpoints). The Hessians of all layers come from one pass of the float
model (the paper quantizes layer by layer on the outputs of the already-quantized layers: slightly better, and
needed for memory at 7B scale, where the Hessians alone would be ~20 GB; `collect_hessians` refuses beyond a budget).

Why it helps, in one line: inputs 0 and 1 correlated (H = [[1, .5], [.5, 1]]): when w_0 rounds down by e, the
output lost e x_0 ~ e/2 x_1 on average too, so w_1 is raised by e/2 before it is rounded (U[0,1] / U[0,0] = -1/2).
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor, nn

from .quantize import Int4Linear, check_group_size, iter_llm_linears, quantize_int4

DAMP = 0.01                      # the paper's percdamp
MAX_HESSIAN_BYTES = 4 * 2**30    # one-pass calibration keeps every Hessian at once


def calibration_batches(path: str | Path, tokenizer, image_size: int, n: int = 128, max_len: int = 2048):
    """The first n samples of a file in the official fine-tune format (`conversations`, `Picture N: <img>…</img>`),
    rendered as chat (finetune_data, the same checks and errors), one sample per batch: forward kwargs for
    collect_hessians. Samples longer than max_len tokens are cut."""
    from .finetune_data import load_examples, make_batch

    examples = load_examples(path, tokenizer, max_len, truncate=True)[:n]
    for example in examples:
        batch = make_batch([example], tokenizer.pad_token_id, image_size)          # one sample: no padding
        yield {"input_ids": batch["input_ids"], "images": batch["images"]}


def collect_hessians(model: nn.Module, batches: Iterable[dict], lm_head: bool = False) -> dict[nn.Module, Tensor]:
    """H = 2/n sum_rows x x^T [in, in] (float32) of every LLM linear's input over the calibration batches (each a
    dict of the model's forward keyword arguments); padded positions are excluded when the batch has an
    attention_mask."""
    linears = [linear for _, _, linear in iter_llm_linears(model, lm_head)]
    need = sum(4 * lin.in_features ** 2 for lin in linears)
    if need > MAX_HESSIAN_BYTES:
        raise ValueError(f"GPTQ needs {need / 2**30:.1f} GiB of Hessians for this model in one pass (limit "
                         f"{MAX_HESSIAN_BYTES / 2**30:.0f} GiB); layer-by-layer calibration is not implemented: use "
                         f"round-to-nearest (qwenvl quantize without --calibration)")
    sums = {lin: torch.zeros(lin.in_features, lin.in_features) for lin in linears}
    rows = {lin: 0 for lin in linears}
    real: Tensor | None = None                                   # the current batch's real positions [B, T]

    def hook(module, inputs, _output):
        x = inputs[0].detach().float()
        x = x[real] if real is not None and x.shape[:2] == real.shape else x.reshape(-1, x.shape[-1])
        sums[module].addmm_(x.T, x)
        rows[module] += x.shape[0]

    handles = [lin.register_forward_hook(hook) for lin in linears]
    try:
        with torch.no_grad():
            for batch in batches:
                mask = batch.get("attention_mask")
                real = None if mask is None else mask.bool()
                model(**batch)
    finally:
        for h in handles:
            h.remove()
    if not any(rows.values()):
        raise ValueError("GPTQ calibration saw no tokens: give at least one calibration sample")
    return {lin: 2 * sums[lin] / max(rows[lin], 1) for lin in linears}


def gptq_codes(weight: Tensor, hessian: Tensor, group_size: int, sym: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Codes [out, in] (0..15, uint8), scales [out, G] float32, zeros [out, G] uint8 for weight [out, in]."""
    w = weight.detach().float().clone()
    h = hessian.float().clone()
    out_f, in_f = w.shape
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h.diagonal().add_(DAMP * h.diagonal().mean())
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)    # [in, in]
    codes = torch.zeros(out_f, in_f)
    scales = torch.zeros(out_f, in_f // group_size)
    zeros = torch.zeros(out_f, in_f // group_size)
    for g, start in enumerate(range(0, in_f, group_size)):
        end = start + group_size
        _, s, z = quantize_int4(w[:, start:end].contiguous(), group_size, sym)          # [out, 1] each
        s, z = s[:, 0], z[:, 0].float()
        scales[:, g], zeros[:, g] = s, z
        block, ub = w[:, start:end], u[start:end, start:end]                            # a view: updated in place
        errors = torch.zeros(out_f, group_size)
        for i in range(group_size):
            q = torch.round(block[:, i] / s + z).clamp(0, 15)
            codes[:, start + i] = q
            err = (block[:, i] - (q - z) * s) / ub[i, i]
            block[:, i:] -= err[:, None] * ub[i, i:][None, :]
            errors[:, i] = err
        w[:, end:] -= errors @ u[start:end, end:]
    return codes.to(torch.uint8), scales, zeros.to(torch.uint8)


def gptq_linear(linear: nn.Linear, hessian: Tensor, group_size: int, sym: bool) -> Int4Linear:
    return Int4Linear.from_codes(linear, *gptq_codes(linear.weight, hessian, group_size, sym), group_size, sym)


def gptq_quantize_model(model: nn.Module, hessians: dict[nn.Module, Tensor], group_size: int = 128,
                        sym: bool = True, lm_head: bool = False) -> dict:
    """Swap every LLM linear for its GPTQ Int4Linear in place; records and returns the scheme (the same
    quantization_config as round-to-nearest int4: the checkpoint format does not depend on how codes were chosen)."""
    check_group_size(model, group_size, lm_head)
    found = list(iter_llm_linears(model, lm_head))
    missing = [name for _, name, linear in found if linear not in hessians]
    if missing:
        raise ValueError(f"no calibration Hessian for {len(missing)} linears (e.g. {missing[0]}): collect them "
                         f"with collect_hessians(model, ...) on this model, with the same lm_head setting")
    for parent, name, linear in found:
        setattr(parent, name, gptq_linear(linear, hessians[linear], group_size, sym))
    scheme = {"quant_method": "qwenvl", "bits": 4, "group_size": group_size, "sym": sym}
    if lm_head:
        scheme["lm_head"] = True
    model.config.quantization_config = scheme
    return scheme
