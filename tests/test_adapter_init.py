"""Data-dependent adapter init: whitened, mean-free features at the requested scale, images told apart."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qwenvl.adapter_init import head_interleave, init_adapter_from_data, init_local_attention, whitening_matrix
from qwenvl.vision import Resampler, sincos_pos_table
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


def test_head_interleave_gives_every_head_both_axes_sin_and_cos():
    assert head_interleave(8, 2).tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    perm = head_interleave(256, 2)
    assert sorted(perm.tolist()) == list(range(256))
    for head in perm.view(2, 128):                         # each head: 32 frequencies x 4 blocks
        assert (head // 64).bincount().tolist() == [32, 32, 32, 32]
    with pytest.raises(ValueError):
        head_interleave(250, 2)


def _resampler() -> Resampler:
    torch.manual_seed(0)
    r = Resampler(n_queries=16, embed_dim=64, heads=2, kv_dim=32)      # a 4x4 query grid over 8x8 patches
    for p in r.parameters():
        torch.nn.init.normal_(p, std=0.3)
    with torch.no_grad():
        r.pos_embed.copy_(sincos_pos_table(64, 4))
    return r


def _corner_effect(r: Resampler) -> tuple[float, float]:
    """How much the top-left and bottom-right queries move when only the top-left 2x2 patches change."""
    x = torch.randn(1, 64, 32, generator=torch.Generator().manual_seed(1))
    y = x.clone().view(1, 8, 8, 32)
    y[:, :2, :2] += 3 * torch.randn(2, 2, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        delta = (r(y.view(1, 64, 32)) - r(x)).norm(dim=-1)[0]          # [16]
    return delta[0].item(), delta[15].item()


def test_local_attention_makes_each_query_pool_its_own_region():
    r = _resampler()
    near, far = _corner_effect(r)
    assert far > 0.3 * near                                           # random init: every query sees everything
    init_local_attention(r, sharpness=4.0)
    near, far = _corner_effect(r)
    assert far < 0.05 * near                                          # now only the top-left query reacts
