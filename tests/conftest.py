"""Shared fixtures: the golden tiny checkpoint and its reference outputs."""
from __future__ import annotations

import json
from pathlib import Path

import os

import pytest
import torch
from hypothesis import settings
from safetensors.torch import load_file

# CI replays the same examples every run (a red CI must be reproducible); local runs keep exploring.
settings.register_profile("ci", derandomize=True, deadline=None)
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

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
