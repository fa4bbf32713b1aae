"""Fused projections of the decoder (Qwen2-VL: q/k/v and gate/up; Qwen-VL: gate/up, its c_attn being packed already),
with the checkpoint's keys and modules unchanged.

A decode step multiplies one row by seven weights per layer; q, k, v read the same input, and so do gate and up.
Fusing them concatenates their weights along the output dimension once, at load time, so a step makes two calls
instead of five (each call costs ~10-20 us of Python and dispatch, and a short weight restarts the prefetcher).

The fused tensor owns the memory, and the original modules' tensors become row-slice views of it:
    * the reference forward (q_proj, k_proj, v_proj) runs unchanged on the same bits;
    * state_dict() keeps the checkpoint's key names (`save_checkpoint` copies shared views before writing);
    * no byte is duplicated.
A load_state_dict post hook re-fuses after a load that replaced the tensors (assign=True); an ordinary load copies
into the views, that is into the fused tensors. Works for nn.Linear (and FastLinear), Int8Linear and Int4Linear.

    fused = fuse_projections(model)      # [{"qkv": module, "gate_up": module}] per decoder layer (Qwen-VL: gate_up)
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .fast_linear import FastLinear
from .heap import release_free_pages
from .quantize import Int4Linear, Int8Linear

GROUPS = {"qkv": ("self_attn", ("q_proj", "k_proj", "v_proj")), "gate_up": ("mlp", ("gate_proj", "up_proj"))}
# Qwen-VL's MLP is c_proj(w1(x) * silu(w2(x))): w2 is the gate (the silu branch), so it goes first.
V1_GROUPS = {"gate_up": ("mlp", ("w2", "w1"))}


def decoder_layers(model: nn.Module) -> tuple[list[nn.Module], dict]:
    """The decoder layers of a Qwen2-VL (`model.model.layers`) or Qwen-VL (`model.transformer.h`) and their groups."""
    if hasattr(model, "transformer"):
        return list(model.transformer.h), V1_GROUPS
    return list(model.model.layers), GROUPS


def fusable(model: nn.Module) -> bool:
    """Whether every group of every layer is of one kind `fuse_linears` handles (e.g. not GPTQ linears)."""
    layers, groups = decoder_layers(model)
    kinds = (nn.Linear, FastLinear, Int8Linear, Int4Linear)
    for layer in layers:
        for parent_name, members in groups.values():
            mods = [getattr(getattr(layer, parent_name), m) for m in members]
            if len({type(m) for m in mods}) != 1 or type(mods[0]) not in kinds:
                return False
    return True


def fuse_projections(model: nn.Module) -> list[dict[str, nn.Module]]:
    """Fuse every decoder layer in place (idempotent); the fused modules, one dict per layer."""
    fused = model.__dict__.get("_fused_projections")
    if fused is None:
        fused = model.__dict__["_fused_projections"] = [{} for _ in decoder_layers(model)[0]]
        model.register_load_state_dict_post_hook(lambda module, _keys: _refresh(module))
    _refresh(model)
    return fused


def _refresh(model: nn.Module) -> None:
    """(Re-)fuse the groups whose member tensors are no longer views of their fused tensor."""
    layers, groups = decoder_layers(model)
    for layer, fused in zip(layers, model.__dict__["_fused_projections"]):
        for name, (parent_name, members) in groups.items():
            mods = [getattr(getattr(layer, parent_name), m) for m in members]
            if name not in fused or not _is_view_of(mods, fused[name]):
                fused[name] = fuse_linears(mods)
                release_free_pages()            # the unfused tensors' holes: 0.3 GiB over a 2B model in float32


def fuse_linears(mods: list[nn.Module]) -> nn.Module:
    """One module computing cat([m(x) for m in mods], -1); each m's tensors become views into it."""
    first = mods[0]
    if any(type(m) is not type(first) or m.in_features != first.in_features for m in mods):
        raise ValueError(f"cannot fuse {[type(m).__name__ for m in mods]}: same type and input width needed")
    out = _empty_like(first, sum(m.out_features for m in mods)).requires_grad_(False)
    for name in _tensor_names(first):
        parts = [_tensor(m, name) for m in mods]
        if any(p is None for p in parts):
            if any(p is not None for p in parts):
                raise ValueError(f"cannot fuse: {name} is present in some projections only")
            _set(out, name, None)
            continue
        whole = torch.cat([p.detach() for p in parts])                                 # [sum out, ...]
        _set(out, name, whole)
        for m, view in zip(mods, whole.split([p.shape[0] for p in parts])):
            _set(m, name, view)
    return out


def _empty_like(m: nn.Module, out_features: int) -> nn.Module:
    bias = getattr(m, "bias", None) is not None
    with torch.device("meta"):
        if isinstance(m, Int4Linear):
            return Int4Linear(m.in_features, out_features, bias, m.group_size, m.sym)
        if isinstance(m, Int8Linear):
            return Int8Linear(m.in_features, out_features, bias)
        if type(m) in (nn.Linear, FastLinear):
            return FastLinear(nn.Linear(m.in_features, out_features, bias=bias))
    raise ValueError(f"cannot fuse a {type(m).__name__} (nn.Linear, FastLinear, Int8Linear, Int4Linear only)")


def _tensor_names(m: nn.Module) -> list[str]:
    return [*m._parameters, *m._buffers]


def _tensor(m: nn.Module, name: str) -> Tensor | None:
    return m._parameters[name] if name in m._parameters else m._buffers[name]


def _set(m: nn.Module, name: str, t: Tensor | None) -> None:
    if name in m._parameters:
        old = m._parameters[name]
        grad = old is not None and old.requires_grad      # a trainable projection stays trainable (as a view)
        m._parameters[name] = None if t is None else nn.Parameter(t, requires_grad=grad)
    else:
        m._buffers[name] = t


def _is_view_of(mods: list[nn.Module], fused: nn.Module) -> bool:
    for name in _tensor_names(mods[0]):
        whole = _tensor(fused, name)
        for m in mods:
            t = _tensor(m, name)
            if (t is None) != (whole is None):
                return False
            if t is not None and t.untyped_storage().data_ptr() != whole.untyped_storage().data_ptr():
                return False
    return True
