"""Typed configuration of Qwen-VL (v1), nested like the model: `QWenConfig(visual=VisualConfig(...))`.

Field names are the official `config.json` names, so `from_dict` is a filter, not a renaming table.
`GenerationConfig` mirrors the official `generation_config.json`. Presets hold the real sizes.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Qwen-VL's official files carry these keys; they mean nothing to a plain-PyTorch model.
_IGNORED_KEYS = {
    "architectures", "auto_map", "model_type", "transformers_version", "tokenizer_type",
    "onnx_safe", "use_flash_attn", "scale_attn_weights", "use_cache", "bf16", "fp16", "fp32",
    "attn_dropout_prob", "emb_dropout_prob", "initializer_range", "rotary_pct_note",
}


@dataclass
class VisualConfig:
    """OpenCLIP-geometry ViT + one cross-attention resampler (`transformer.visual`)."""

    image_size: int = 448
    patch_size: int = 14
    width: int = 1664
    layers: int = 48
    heads: int = 16
    mlp_ratio: float = 4.9231
    output_dim: int = 4096          # == LLM hidden_size: the resampler writes straight into the LM
    n_queries: int = 256            # absent from the official config.json: 256 is the code default
    image_start_id: int = 151857    # <img>; </img> = +1, <imgpad> = +2

    def __post_init__(self) -> None:
        _check_positive(self, ("image_size", "patch_size", "width", "layers", "heads", "output_dim", "n_queries",
                               "image_start_id"))
        _check_positive(self, ("mlp_ratio",), (int, float))
        if self.image_size % self.patch_size:
            raise ValueError(f"{self.image_size=} is not a multiple of {self.patch_size=}")
        if self.width % self.heads:
            raise ValueError(f"{self.width=} is not divisible by {self.heads=}")
        if math.isqrt(self.n_queries) ** 2 != self.n_queries:
            raise ValueError(f"{self.n_queries=} must be a square (the resampler's sin-cos grid)")
        if self.output_dim % 128 and self.output_dim >= 128:
            raise ValueError(f"{self.output_dim=}: the resampler uses heads of 128 channels")

    @property
    def grid_size(self) -> int:          # patches per side: 448 / 14 = 32
        return self.image_size // self.patch_size

    @property
    def mlp_width(self) -> int:          # int(1664 * 4.9231) = 8192, as the reference truncates
        return int(self.width * self.mlp_ratio)

    @property
    def resampler_heads(self) -> int:    # the reference uses output_dim // 128 heads
        return max(self.output_dim // 128, 1)

    @property
    def image_end_id(self) -> int:
        return self.image_start_id + 1

    @property
    def image_pad_id(self) -> int:
        return self.image_start_id + 2


@dataclass
class QWenConfig:
    """The Qwen LM (`transformer.h.*`) plus its visual tower (`transformer.visual`)."""

    vocab_size: int = 151936
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    kv_channels: int = 128
    intermediate_size: int = 22016  # both SwiGLU branches together: each is intermediate_size // 2
    layer_norm_epsilon: float = 1e-6
    max_position_embeddings: int = 8192
    seq_length: int = 2048          # training context: dynamic NTK and log-n start beyond it
    rotary_emb_base: float = 10000.0
    rotary_pct: float = 1.0
    use_dynamic_ntk: bool = True
    use_logn_attn: bool = True
    no_bias: bool = True
    tie_word_embeddings: bool = False
    torch_dtype: str = "bfloat16"
    visual: VisualConfig = field(default_factory=VisualConfig)
    quantization_config: dict | None = None

    def __post_init__(self) -> None:
        if isinstance(self.visual, dict):
            self.visual = _visual_from_dict(self.visual)
        if not isinstance(self.visual, VisualConfig):
            raise ValueError(f"config.json's 'visual' must be an object of ViT settings, got {self.visual!r}")
        _check_positive(self, ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_channels",
                               "intermediate_size", "max_position_embeddings", "seq_length"))
        _check_positive(self, ("layer_norm_epsilon", "rotary_emb_base", "rotary_pct"), (int, float))
        if self.visual.output_dim != self.hidden_size:
            raise ValueError(f"{self.visual.output_dim=} must equal {self.hidden_size=}")
        if self.tie_word_embeddings:
            raise ValueError("Qwen-VL has an untied lm_head; tie_word_embeddings=true is not supported")
        if not 0 < self.rotary_pct <= 1:
            raise ValueError(f"{self.rotary_pct=} must be in (0, 1]")

    @property
    def head_dim(self) -> int:
        return self.kv_channels

    @property
    def ffn_dim(self) -> int:            # one SwiGLU branch: 22016 // 2 = 11008
        return self.intermediate_size // 2

    @property
    def rotary_dim(self) -> int:
        return int(self.kv_channels * self.rotary_pct)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "QWenConfig":
        """Build from the official config.json dict; unknown keys that matter are refused."""
        if raw.get("model_type") == "qwen2_vl":
            raise ValueError("config.json is a Qwen2-VL checkpoint's (model_type qwen2_vl); quantize, finetune "
                             "and merge-lora read Qwen-VL checkpoints only (Qwen2-VL: qwenvl chat / serve, "
                             "eval --endpoint)")
        unknown = set(raw) - {f.name for f in dataclasses.fields(cls)} - _IGNORED_KEYS
        if unknown:
            raise ValueError(f"config.json has keys this Qwen-VL implementation does not know: {sorted(unknown)}")
        return cls(**_known(cls, raw))

    @classmethod
    def from_json(cls, path: str | Path) -> "QWenConfig":
        return cls.from_dict(read_json_object(path))

    @classmethod
    def from_name(cls, name: str) -> "QWenConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls.from_dict(json.loads(json.dumps(PRESETS[name])))

    def to_dict(self) -> dict[str, Any]:
        """The official config.json layout (architectures and model_type included)."""
        out = {"architectures": ["QWenLMHeadModel"], "model_type": "qwen"}
        out.update(dataclasses.asdict(self))
        if out["quantization_config"] is None:
            del out["quantization_config"]
        return out


@dataclass
class GenerationConfig:
    """`generation_config.json`: the official chat defaults (Qwen-VL-Chat, commit 548275c)."""

    chat_format: str = "chatml"
    do_sample: bool = True
    eos_token_id: int = 151643
    pad_token_id: int = 151643
    max_new_tokens: int = 512
    max_window_size: int = 6144
    top_k: int = 0
    top_p: float = 0.3
    temperature: float = 1.0
    repetition_penalty: float = 1.0
    stop_words_ids: list[list[int]] | None = None

    def __post_init__(self) -> None:
        """The sampling fields must make valid SamplingParams: a bad value fails on load, not at the first question."""
        from .sampling import SamplingParams

        SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                       top_p=self.top_p, repetition_penalty=self.repetition_penalty)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "GenerationConfig":
        return cls(**_known(cls, raw))

    @classmethod
    def from_json(cls, path: str | Path) -> "GenerationConfig":
        """Example: {"temperature": -1} -> "DIR/generation_config.json: temperature=-1 must be >= 0"."""
        raw = read_json_object(path)
        try:
            return cls.from_dict(raw)
        except ValueError as e:
            raise ValueError(f"{path}: {str(e).removeprefix('self.')}") from None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def _known(cls: type, raw: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in raw.items() if k in names}


def _visual_from_dict(raw: dict[str, Any]) -> VisualConfig:
    unknown = set(raw) - {f.name for f in dataclasses.fields(VisualConfig)}
    if unknown:
        raise ValueError(f"config.json's 'visual' has keys this Qwen-VL implementation does not know: "
                         f"{sorted(unknown)}")
    return VisualConfig(**raw)


def _check_positive(config: Any, names: tuple[str, ...], kind: type | tuple[type, ...] = int) -> None:
    """ValueError naming the first field that is not a positive `kind` (a string or 0 in config.json fails
    here, not as a shape error deep in the model). Example: hidden_size "big" -> "...hidden_size must be a
    positive int, got 'big'"."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, kind) or not 0 < value < math.inf:
            what = "int" if kind is int else "number"
            raise ValueError(f"config.json: {type(config).__name__}.{name} must be a positive {what}, got {value!r}")


def read_json_object(path: str | Path) -> dict[str, Any]:
    """The JSON object in `path` (a config file), or an error naming the file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such config file: {path}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object {{...}}, got a {type(raw).__name__}")
    return raw


_VL_CHAT_VISUAL = {"heads": 16, "image_size": 448, "image_start_id": 151857, "layers": 48,
                   "mlp_ratio": 4.9231, "output_dim": 4096, "patch_size": 14, "width": 1664}

# The real sizes (config.json values of the official repositories, qwen_vl.md §2.1).
PRESETS: dict[str, dict[str, Any]] = {
    "Qwen-VL": {"visual": _VL_CHAT_VISUAL},
    "Qwen-VL-Chat": {"visual": _VL_CHAT_VISUAL},
    # Same shapes at reduced depth: what the benchmark runs with random weights.
    "Qwen-VL-Chat-4layers": {"num_hidden_layers": 4, "visual": {**_VL_CHAT_VISUAL, "layers": 8}},
}
