"""Qwen2-VL checkpoints: the only module that knows their key names (file reading is `weights.py`'s).

Our module tree uses the hub layout (`visual.*`, `model.embed_tokens/layers/norm.*`, `lm_head.weight`),
so the hub files load as they are. The layout of transformers ≥ 4.52 modules (`model.visual.*`,
`model.language_model.*`; what `state_dict()` of transformers' model gives) is mapped back with two prefix
renames (qwen2_vl.md §7.2). Tied checkpoints (2B) have no `lm_head.weight`: the head is the embedding.
Single or sharded safetensors (`model.safetensors.index.json`) and `.bin` files are read the same way.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from .config import read_json_object
from .processor import VisionProcessorConfig
from .qwen2_vl import Qwen2VL
from .qwen2_vl_config import Qwen2VLConfig
from .weights import (
    SAFE_SINGLE,
    atomic_write,
    checkpoint_files,
    config_path,
    iter_tensors,
    own_storage,
    raise_if_mismatched,
    resolve_dtype,
)

# transformers-module prefix -> hub prefix. Order matters: `model.visual.` before the `model.` catch-all.
_RENAMES = (("model.visual.", "visual."), ("model.language_model.", "model."))
HEAD = "lm_head.weight"


def hub_key(key: str) -> str:
    """Our (= hub) name for a checkpoint key in either layout.

    Examples: `model.language_model.layers.0.mlp.up_proj.weight` -> `model.layers.0.mlp.up_proj.weight`;
    `model.visual.merger.mlp.0.bias` -> `visual.merger.mlp.0.bias`; hub keys are unchanged.
    """
    for old, new in _RENAMES:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def transformers_key(key: str) -> str:
    """The inverse of `hub_key` for our keys (the layout of transformers' `state_dict()`)."""
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model."):
        return "model.language_model." + key[len("model."):]
    return key


def load_config(model_dir: str | Path) -> Qwen2VLConfig:
    return Qwen2VLConfig.from_json(config_path(model_dir, "Qwen2-VL"))


def load_processor_config(model_dir: str | Path) -> VisionProcessorConfig:
    path = Path(model_dir) / "preprocessor_config.json"
    return VisionProcessorConfig.from_dict(read_json_object(path)) if path.is_file() else VisionProcessorConfig()


def load_model(model_dir: str | Path, dtype: str | torch.dtype | None = "auto") -> Qwen2VL:
    """Build on the meta device, then materialise every tensor once from the (sharded) checkpoint."""
    config = load_config(model_dir)
    dtype = resolve_dtype(dtype, config)     # reads only config.torch_dtype
    with torch.device("meta"):
        model = Qwen2VL(config)
    files = checkpoint_files(model_dir)
    state = _read_state(files, model, dtype)
    model.load_state_dict(state, strict=not config.tie_word_embeddings, assign=True)
    model.tie_weights()                     # assign=True replaced the embedding: point the head at it again
    return model.eval()


def _read_state(files: list[Path], model: Qwen2VL, dtype: torch.dtype) -> dict[str, Tensor]:
    """Checkpoint tensors under our names, checked against the model's keys and shapes."""
    tied = model.config.tie_word_embeddings
    expected = {k: v.shape for k, v in model.state_dict().items() if not (tied and k == HEAD)}
    state: dict[str, Tensor] = {}
    unexpected, misshaped, seen = [], [], set()
    for path in files:
        for raw_key, tensor in iter_tensors(path):
            key = hub_key(raw_key)
            seen.add(key)
            if tied and key == HEAD:
                continue                    # some tools write the tied head too; the embedding wins
            if key not in expected:
                unexpected.append(raw_key)
            elif tensor.shape != expected[key]:
                misshaped.append(f"{raw_key}: checkpoint {tuple(tensor.shape)} vs model {tuple(expected[key])}")
            elif key in state:
                unexpected.append(f"{raw_key} (a second copy of {key})")
            else:
                state[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    missing = sorted(set(expected) - seen)
    raise_if_mismatched(files[0].parent, missing, unexpected, misshaped)
    return state


def save_checkpoint(model: Qwen2VL, out_dir: str | Path, layout: str = "hub", dtype: torch.dtype | None = None) -> Path:
    """config.json (hub layout) + model.safetensors with keys in the `hub` or `transformers` layout."""
    if layout not in ("hub", "transformers"):
        raise ValueError(f"{layout=} must be 'hub' or 'transformers'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rename = hub_key if layout == "hub" else transformers_key
    state = {rename(k): own_storage((v.to(dtype) if dtype and v.is_floating_point() else v).contiguous())
             for k, v in model.state_dict().items() if not (model.config.tie_word_embeddings and k == HEAD)}
    config = model.config.to_dict()
    if dtype is not None:
        config["torch_dtype"] = str(dtype).removeprefix("torch.")
    atomic_write(out / SAFE_SINGLE, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    atomic_write(out / "config.json", lambda p: p.write_text(json.dumps(config, indent=2)))
    return out

