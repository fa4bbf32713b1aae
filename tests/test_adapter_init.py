"""Data-dependent adapter init: whitened, mean-free features at the requested scale, images told apart."""
from __future__ import annotations

from pathlib import Path

import torch

from qwenvl.adapter_init import init_adapter_from_data, whitening_matrix
from qwenvl.weights import load_model

TINY = Path(__file__).parent / "fixtures" / "qwen_vl_tiny"


def test_whitening_removes_the_shared_direction_and_equalises_variance():
    g = torch.Generator().manual_seed(0)
    scales = torch.linspace(0.5, 2.0, 12)
    x = 5.0 + torch.randn(4000, 12, generator=g) * scales            # a big shared mean, unequal variances
    w = whitening_matrix(x, 16, torch.Generator().manual_seed(1))
    assert w.shape == (16, 12)
    y = x @ w.T
    assert y.mean(0).abs().max() < 0.05                               # the mean is gone (vs 5 * |w| before)
    s = torch.linalg.svdvals(y - y.mean(0)) / len(y) ** 0.5           # 11 directions whitened, 1 projected out
    assert (s[:11] > 0.8).all() and (s[:11] < 1.1).all() and s[11:].max() < 0.3


def test_init_adapter_makes_features_differ_between_images():
    model = load_model(TINY, "float32")
    visual = model.transformer.visual
    g = torch.Generator().manual_seed(0)
    base = torch.rand(1, 3, 1, 1, generator=g)
    pixels = base + 0.3 * torch.randn(16, 3, 112, 112, generator=g)     # the tiny config: 112 px, width 32
    assert isinstance(visual.attn_pool.kv_proj, torch.nn.Linear)
    stats = init_adapter_from_data(visual, pixels, feature_norm=0.8, generator=g)
    assert abs(stats["after"]["norm"] - 0.8) < 0.05
    ratio_after = stats["after"]["spread_across_images"] / stats["after"]["norm"]
    ratio_before = stats["before"]["spread_across_images"] / stats["before"]["norm"]
    assert ratio_after > 2 * ratio_before
