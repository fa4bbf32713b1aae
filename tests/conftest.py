"""Shared fixtures: the golden tiny checkpoint and its reference outputs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "qwen_vl_tiny"
VOCAB = FIXTURES / "qwen.tiktoken"


@pytest.fixture(scope="session")
def tiny_model():
    from qwenvl.weights import load_model

    return load_model(TINY, dtype="float32")


@pytest.fixture(scope="session")
def tiny_cases() -> dict:
    return {c["name"]: c for c in json.loads((TINY / "cases.json").read_text())}


@pytest.fixture(scope="session")
def tiny_pixels() -> dict[str, torch.Tensor]:
    return load_file(str(TINY / "pixels.safetensors"))


@pytest.fixture(scope="session")
def tiny_logits() -> dict[str, torch.Tensor]:
    return load_file(str(TINY / "logits.safetensors"))


@pytest.fixture(scope="session")
def tiny_features() -> dict[str, torch.Tensor]:
    return load_file(str(TINY / "visual_features.safetensors"))
