"""A tiny random Qwen-VL checkpoint on the real vocabulary, in the official layout (shared by the chat, CLI,
server, page and evaluation tests): config.json, generation_config.json, weights and qwen.tiktoken."""
from __future__ import annotations

import shutil
from pathlib import Path

from qwenvl.config import GenerationConfig, QWenConfig
from qwenvl.weights import save_random_checkpoint

VOCAB = Path(__file__).parent / "fixtures" / "qwen.tiktoken"


def tiny_config(layers: int = 1, n_queries: int = 64) -> QWenConfig:
    """hidden 64, 2 heads of 32, 56-px images (4x4 patches of 14), the real 151936-row vocabulary."""
    return QWenConfig.from_dict(dict(
        vocab_size=151936, hidden_size=64, num_hidden_layers=layers, num_attention_heads=2, kv_channels=32,
        intermediate_size=128, torch_dtype="float32",
        visual=dict(image_size=56, patch_size=14, width=32, layers=1, heads=2, mlp_ratio=2.0, output_dim=64,
                    n_queries=n_queries, image_start_id=151857)))


def write_tiny_checkpoint(folder: Path, layers: int = 1, n_queries: int = 64,
                          generation_config: GenerationConfig | None = None) -> Path:
    save_random_checkpoint(tiny_config(layers, n_queries), folder, seed=0,
                           generation_config=generation_config or GenerationConfig())
    shutil.copy(VOCAB, folder / "qwen.tiktoken")
    return folder
