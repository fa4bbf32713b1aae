"""Typed configuration of Qwen2-VL, nested like the model: `Qwen2VLConfig(vision=..., text=...)`.

Field names are the official `config.json` names. Two layouts of that file exist and both are read by
`Qwen2VLConfig.from_dict` (qwen2_vl.md §1.1–1.2):

* the hub layout: text keys at the top level, `rope_scaling = {"type": "mrope", "mrope_section": [...]}`,
  a nested `vision_config` (whose `hidden_size` is the merger's *output* width = the LLM width);
* the transformers ≥ 5 layout: text keys under `text_config`, rope under `rope_parameters`.

`to_dict` writes the hub layout.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import read_json_object

VISION_ACTS = ("quick_gelu", "gelu", "silu")


@dataclass
class Qwen2VLVisionConfig:
    """The ViT (Conv3d patches, 2-D rotary, per-frame attention) and the 2×2 patch merger (`visual`)."""

    depth: int = 32
    embed_dim: int = 1280
    num_heads: int = 16
    mlp_ratio: float = 4.0
    hidden_size: int = 3584          # merger output == text hidden_size (NOT the ViT width)
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    hidden_act: str = "quick_gelu"   # absent from hub files: transformers' default
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ValueError(f"{self.embed_dim=} is not divisible by {self.num_heads=}")
        if self.head_dim % 4:
            raise ValueError(f"vision head_dim {self.head_dim} must be divisible by 4 (2-D rotary: rows + cols)")
        if self.hidden_act not in VISION_ACTS:
            raise ValueError(f"vision {self.hidden_act=} is not one of {VISION_ACTS}")

    @property
    def head_dim(self) -> int:       # 1280 / 16 = 80
        return self.embed_dim // self.num_heads

    @property
    def mlp_dim(self) -> int:        # 1280 * 4 = 5120
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def patch_dim(self) -> int:      # 3 * 2 * 14 * 14 = 1176
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2


@dataclass
class Qwen2VLTextConfig:
    """The Qwen2 decoder (`model.*`): GQA attention with q/k/v biases, SwiGLU, RMSNorm, M-RoPE."""

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    mrope_section: list[int] = field(default_factory=lambda: [16, 24, 24])
    max_position_embeddings: int = 32768

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"{self.hidden_size=} is not divisible by {self.num_attention_heads=}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"{self.num_attention_heads=} is not a multiple of {self.num_key_value_heads=}")
        if len(self.mrope_section) != 3 or 2 * sum(self.mrope_section) != self.head_dim:
            raise ValueError(f"{self.mrope_section=} must be 3 numbers summing to head_dim/2 = {self.head_dim // 2}")
        if self.hidden_act != "silu":
            raise ValueError(f"text {self.hidden_act=}: only 'silu' (SwiGLU) is implemented")

    @property
    def head_dim(self) -> int:       # 3584 / 28 = 128
        return self.hidden_size // self.num_attention_heads


@dataclass
class Qwen2VLConfig:
    """The whole model: vision tower, decoder, the placeholder token ids, head tying."""

    vision: Qwen2VLVisionConfig = field(default_factory=Qwen2VLVisionConfig)
    text: Qwen2VLTextConfig = field(default_factory=Qwen2VLTextConfig)
    image_token_id: int = 151655          # <|image_pad|>
    video_token_id: int = 151656          # <|video_pad|>
    vision_start_token_id: int = 151652   # <|vision_start|>
    vision_end_token_id: int = 151653     # <|vision_end|>
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = 151645
    tie_word_embeddings: bool = False     # true for 2B (its files have no lm_head.weight)
    torch_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        if self.vision.hidden_size != self.text.hidden_size:
            raise ValueError(f"vision_config.hidden_size={self.vision.hidden_size} (the merger output) must equal "
                             f"the text hidden_size={self.text.hidden_size}")
        ids = (self.image_token_id, self.video_token_id, self.vision_start_token_id, self.vision_end_token_id)
        if max(ids) >= self.text.vocab_size:
            raise ValueError(f"special token ids {ids} must be < vocab_size={self.text.vocab_size}")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Qwen2VLConfig":
        """Read either layout (hub flat, or transformers-5 nested `text_config`)."""
        if raw.get("use_sliding_window") or (raw.get("text_config") or {}).get("use_sliding_window"):
            raise ValueError("use_sliding_window=true is not supported (no official Qwen2-VL checkpoint uses it)")
        text_raw = {**raw, **(raw.get("text_config") or {})}
        vision_raw = dict(raw.get("vision_config") or {})
        tie = raw.get("tie_word_embeddings", (raw.get("text_config") or {}).get("tie_word_embeddings", False))
        top = _known(cls, raw)
        top.pop("vision", None), top.pop("text", None)
        for key in ("bos_token_id", "eos_token_id"):
            if key in text_raw:
                top[key] = text_raw[key]
        top["torch_dtype"] = str(raw.get("torch_dtype") or raw.get("dtype") or text_raw.get("dtype") or "bfloat16")
        return cls(vision=_vision_from_dict(vision_raw), text=_text_from_dict(text_raw),
                   **{**top, "tie_word_embeddings": bool(tie)})

    @classmethod
    def from_json(cls, path: str | Path) -> "Qwen2VLConfig":
        return cls.from_dict(read_json_object(path))

    def to_dict(self) -> dict[str, Any]:
        """The hub (flat) layout of config.json."""
        text = dataclasses.asdict(self.text)
        mrope = text.pop("mrope_section")
        vision = dataclasses.asdict(self.vision)
        vision["in_chans"] = vision["in_channels"]
        if float(vision["mlp_ratio"]).is_integer():
            vision["mlp_ratio"] = int(vision["mlp_ratio"])     # the hub files' 4; transformers 5 refuses 4.0
        top = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("vision", "text")}
        return {"architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl", **top, **text,
                "rope_scaling": {"type": "mrope", "mrope_section": mrope}, "vision_config": vision}


def _text_from_dict(raw: dict[str, Any]) -> Qwen2VLTextConfig:
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    kwargs = _known(Qwen2VLTextConfig, raw)
    if "mrope_section" in rope:
        kwargs["mrope_section"] = list(rope["mrope_section"])
    if "rope_theta" in rope:
        kwargs["rope_theta"] = rope["rope_theta"]
    if kwargs.get("num_key_value_heads") is None:
        kwargs["num_key_value_heads"] = kwargs.get("num_attention_heads", Qwen2VLTextConfig.num_attention_heads)
    return Qwen2VLTextConfig(**kwargs)


def _vision_from_dict(raw: dict[str, Any]) -> Qwen2VLVisionConfig:
    kwargs = _known(Qwen2VLVisionConfig, raw)
    if "in_channels" not in raw and "in_chans" in raw:
        kwargs["in_channels"] = raw["in_chans"]
    if "spatial_patch_size" in raw and "patch_size" not in raw:
        kwargs["patch_size"] = raw["spatial_patch_size"]
    theta = (raw.get("rope_parameters") or {}).get("rope_theta")
    if theta is not None:
        kwargs["rope_theta"] = theta
    return Qwen2VLVisionConfig(**kwargs)


def _known(cls: type, raw: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in raw.items() if k in names}


# The real sizes (hub config.json values, qwen2_vl.md §1.1).
PRESETS: dict[str, dict[str, Any]] = {
    "Qwen2-VL-2B-Instruct": {
        "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
        "num_attention_heads": 12, "num_key_value_heads": 2, "tie_word_embeddings": True,
        "vision_config": {"depth": 32, "embed_dim": 1280, "num_heads": 16, "hidden_size": 1536},
    },
    "Qwen2-VL-7B-Instruct": {
        "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "tie_word_embeddings": False,
        "vision_config": {"depth": 32, "embed_dim": 1280, "num_heads": 16, "hidden_size": 3584},
    },
}


def preset(name: str) -> Qwen2VLConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return Qwen2VLConfig.from_dict(PRESETS[name])
