"""A tiny random Qwen2-VL (qwen2_vl.md §8, small-vocab variant) in transformers and in qwenvl, same weights.

transformers is a test dependency only: importing this module skips the calling test file without it.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

VOCAB, IMAGE, VIDEO, VSTART, VEND = 1000, 995, 996, 997, 998
EOS = 1


def hf_config_dict(tie: bool = False) -> dict:
    return {
        "model_type": "qwen2_vl", "image_token_id": IMAGE, "video_token_id": VIDEO,
        "vision_start_token_id": VSTART, "vision_end_token_id": VEND, "tie_word_embeddings": tie,
        "text_config": {
            "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu", "rms_norm_eps": 1e-6,
            "max_position_embeddings": 4096, "bos_token_id": 0, "eos_token_id": EOS,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
        },
        "vision_config": {"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 4, "mlp_ratio": 4,
                          "in_channels": 3, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                          "hidden_act": "quick_gelu"},
    }


def build_hf(seed: int = 0, tie: bool = False):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    config = Qwen2VLConfig(**hf_config_dict(tie))
    config._attn_implementation = "eager"
    model = Qwen2VLForConditionalGeneration(config).eval()
    with torch.no_grad():  # random init gives tiny logits; widen the weights so greedy choices are clear-cut
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
            elif name.endswith("bias"):
                p.normal_(0, 0.02)
    return model


def ours_from_hf(hf_model):
    from qwenvl.qwen2_vl import Qwen2VL
    from qwenvl.qwen2_vl_config import Qwen2VLConfig
    from qwenvl.qwen2_vl_weights import hub_key

    ours = Qwen2VL(Qwen2VLConfig.from_dict(hf_config_dict(hf_model.config.tie_word_embeddings))).eval()
    state = {hub_key(k): v for k, v in hf_model.state_dict().items()}
    ours.load_state_dict(state, strict=True)
    return ours.requires_grad_(False)


def random_image(h: int, w: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def hf_image_processor(**kwargs):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(**kwargs)


def prompt(*parts) -> list[int]:
    """Ids from parts: an int n -> n text ids (cycled from 10..), ("image", k) / ("video", k) -> a span of k pads."""
    ids, nxt = [], 10
    for p in parts:
        if isinstance(p, int):
            ids += [10 + (nxt + i) % 900 for i in range(p)]
            nxt += p
        else:
            kind, k = p
            ids += [VSTART] + [IMAGE if kind == "image" else VIDEO] * k + [VEND]
    return ids


def mm_token_type_ids(input_ids: torch.Tensor) -> torch.Tensor:
    return (input_ids == IMAGE).long() + 2 * (input_ids == VIDEO).long()
