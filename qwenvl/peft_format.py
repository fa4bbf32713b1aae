"""LoRA adapters on disk in PEFT's format, so adapters from the official fine-tune script load here and
ours load in PEFT (`PeftModel.from_pretrained`).

An adapter folder holds `adapter_config.json` (PEFT's LoraConfig as JSON) and `adapter_model.safetensors`
(older PEFT, as used by the official script in 2023: `adapter_model.bin`). PEFT saves the wrapped model
under `base_model.model.`, drops the adapter name, and keeps our (= the official) module paths:

    base_model.model.transformer.h.0.attn.c_attn.lora_A.weight      [r, 4096]
    base_model.model.transformer.h.0.attn.c_attn.lora_B.weight      [12288, r]
    base_model.model.transformer.wte.weight                         [V, 4096]   a module to save (full copy)
    base_model.model.lm_head.weight                                 [V, 4096]

A module-to-save table with more rows than the model (the vocabulary was resized before training) resizes
the model's `wte` / `lm_head` first. Settings that change the computation and are not implemented here
(DoRA, LoRA biases, per-layer rank patterns, ...) are refused rather than silently ignored.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .lora import LoraSpec, apply_lora, lora_layers, modules_to_save_paths, resize_token_rows
from .weights import atomic_write

ADAPTER_CONFIG, ADAPTER_SAFE, ADAPTER_BIN = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
PREFIX = "base_model.model."
# adapter_config.json fields that must be off/empty: each would change the computation in a way not built here.
UNSUPPORTED = ("use_dora", "fan_in_fan_out", "layers_to_transform", "layer_replication", "rank_pattern",
               "alpha_pattern", "lora_bias", "target_parameters", "trainable_token_indices", "use_qalora",
               "alora_invocation_tokens", "exclude_modules", "megatron_config")


class AdapterError(ValueError):
    """An adapter folder this code cannot load onto this model; the message says which file and key."""


# ------------------------------------------------------------------------------------------- config

def spec_from_config(cfg: dict, where: str = ADAPTER_CONFIG) -> LoraSpec:
    """LoraSpec from a PEFT adapter_config.json dict; refuses non-LoRA adapters and unsupported options."""
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{where}: peft_type {cfg.get('peft_type')!r} is not supported (only 'LORA')")
    on = [k for k in UNSUPPORTED if cfg.get(k)]
    if cfg.get("bias", "none") != "none":
        on.append(f"bias={cfg['bias']!r}")
    if on:
        raise AdapterError(f"{where}: unsupported LoRA options are set: {on}")
    targets = cfg.get("target_modules")
    if not targets:
        raise AdapterError(f"{where}: no target_modules")
    known = {"r", "lora_alpha", "lora_dropout", "target_modules", "modules_to_save", "use_rslora"}
    return LoraSpec(r=int(cfg.get("r", 8)), alpha=float(cfg.get("lora_alpha", 8)),
                    dropout=float(cfg.get("lora_dropout", 0.0)),
                    target_modules=targets if isinstance(targets, str) else tuple(targets),
                    modules_to_save=tuple(cfg.get("modules_to_save") or ()), use_rslora=bool(cfg.get("use_rslora")),
                    extra={k: v for k, v in cfg.items() if k not in known})


def config_from_spec(spec: LoraSpec, base_model_name_or_path: str | None = None) -> dict:
    """The adapter_config.json PEFT writes for the official LoraConfig (task CAUSAL_LM, bias none)."""
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
           "revision": None, "inference_mode": True, "bias": "none", "fan_in_fan_out": False,
           "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None,
           "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False}
    cfg.update({k: v for k, v in spec.extra.items() if k not in ("peft_version", "auto_mapping")})
    targets = spec.target_modules if isinstance(spec.target_modules, str) else list(spec.target_modules)
    cfg.update({"r": spec.r, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout, "use_rslora": spec.use_rslora,
                "target_modules": targets,
                "modules_to_save": list(spec.modules_to_save) or None})
    if base_model_name_or_path is not None:
        cfg["base_model_name_or_path"] = base_model_name_or_path
    return cfg


# ------------------------------------------------------------------------------------------- tensors

def adapter_state(model: nn.Module, spec: LoraSpec) -> dict[str, Tensor]:
    """PEFT-named tensors of a LoRA-wrapped model: every lora_A/lora_B and every module-to-save tensor."""
    return {k: v.detach().cpu().contiguous() for k, v in _adapter_params(model, spec).items()}


def adapter_keys(model: nn.Module, spec: LoraSpec) -> list[str]:
    """The adapter's PEFT keys; each is PREFIX + the tensor's name in our model (so a gathered state maps 1:1)."""
    return list(_adapter_params(model, spec))


def save_adapter(model: nn.Module, spec: LoraSpec, out_dir: str | Path, base_model_name_or_path: str | None = None,
                 state: dict[str, Tensor] | None = None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors atomically (state: precomputed adapter_state)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = adapter_state(model, spec) if state is None else state
    atomic_write(out / ADAPTER_SAFE, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    text = json.dumps(config_from_spec(spec, base_model_name_or_path), indent=2)
    atomic_write(out / ADAPTER_CONFIG, lambda p: p.write_text(text))
    return out


def read_adapter(adapter_dir: str | Path) -> tuple[LoraSpec, dict[str, Tensor]]:
    """(spec, PEFT-named tensors) of an adapter folder (safetensors, else a weights-only .bin)."""
    d = Path(adapter_dir)
    if not (d / ADAPTER_CONFIG).is_file():
        raise AdapterError(f"{d} has no {ADAPTER_CONFIG}: is this a PEFT adapter folder?")
    try:
        cfg = json.loads((d / ADAPTER_CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{d / ADAPTER_CONFIG} is not valid JSON: {e}") from None
    spec = spec_from_config(cfg, str(d / ADAPTER_CONFIG))
    if (d / ADAPTER_SAFE).is_file():
        return spec, load_file(str(d / ADAPTER_SAFE))
    if (d / ADAPTER_BIN).is_file():
        return spec, torch.load(d / ADAPTER_BIN, map_location="cpu", weights_only=True)
    raise AdapterError(f"{d} has no {ADAPTER_SAFE} or {ADAPTER_BIN}")


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> LoraSpec:
    """Wrap `model` with the adapter's LoRA layers and load its tensors; every key must be used exactly."""
    spec, tensors = read_adapter(adapter_dir)
    _resize_for(model, spec, tensors)
    apply_lora(model, spec, every_target=False)
    expected = _adapter_params(model, spec)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    misshaped = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(expected[k].shape)}"
                 for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
    if missing or unexpected or misshaped:
        raise AdapterError(f"adapter {adapter_dir} does not fit the model: missing {missing[:6]}, "
                           f"unexpected {unexpected[:6]}, mis-shaped {misshaped[:6]}")
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(tensors[key].to(target.dtype))
    return spec


def _adapter_params(model: nn.Module, spec: LoraSpec) -> dict[str, Tensor]:
    """The live tensors of the adapter, by PEFT key (saved as they are, loaded in place)."""
    live = {}
    for path, layer in lora_layers(model):
        live[f"{PREFIX}{path}.lora_A.weight"] = layer.lora_A.weight
        live[f"{PREFIX}{path}.lora_B.weight"] = layer.lora_B.weight
    for path in modules_to_save_paths(model, spec.modules_to_save):
        for name, t in model.get_submodule(path).state_dict(keep_vars=True).items():
            live[f"{PREFIX}{path}.{name}"] = t
    return live


def _resize_for(model: nn.Module, spec: LoraSpec, tensors: dict[str, Tensor]) -> None:
    """Match the model's vocabulary rows to a saved wte / lm_head copy with a different row count."""
    rows = {tensors[k].shape[0] for k in (f"{PREFIX}transformer.wte.weight", f"{PREFIX}lm_head.weight") if k in tensors}
    if len(rows) > 1:
        raise AdapterError(f"the adapter's wte and lm_head have different row counts: {sorted(rows)}")
    if rows and rows != {model.transformer.wte.weight.shape[0]}:
        resize_token_rows(model, rows.pop())
