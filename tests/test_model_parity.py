"""Parity with the original reference implementation on the golden tiny checkpoint (fp32)."""
from __future__ import annotations

import pytest
import torch

CASES = ["text_only", "one_image", "two_images", "batch2"]


def _images(case, pixels):
    if not case["images"]:
        return None
    return torch.stack([pixels[name] for name in case["images"]])


def test_visual_features_match_reference(tiny_model, tiny_pixels, tiny_features):
    for name, pixels in tiny_pixels.items():
        with torch.no_grad():
            ours = tiny_model.encode_images(pixels[None])[0]
        err = (ours - tiny_features[name]).abs().max().item()
        assert err <= 1e-5, f"{name}: visual features differ by {err}"


@pytest.mark.parametrize("name", CASES)
def test_logits_match_reference(name, tiny_model, tiny_cases, tiny_pixels, tiny_logits):
    case = tiny_cases[name]
    ids = torch.tensor(case["input_ids"])
    with torch.no_grad():
        logits = tiny_model(ids, images=_images(case, tiny_pixels))
    ref = tiny_logits[case["logits_key"]]
    assert logits.shape == ref.shape
    err = (logits - ref).abs().max().item()
    assert err <= 1e-4, f"{name}: logits differ by {err}"


def test_resampler_table_is_the_sincos_recipe(tiny_model):
    from qwenvl.vision import sincos_pos_table

    table = tiny_model.transformer.visual.attn_pool.pos_embed
    expected = sincos_pos_table(table.shape[1], 4)
    assert torch.allclose(table, expected, atol=1e-6)
    assert not table.requires_grad


@pytest.mark.parametrize("size,patch", [(8, 2), (9, 4), (28, 14)])
def test_conv1_is_a_linear_map_of_the_flattened_patches(size, patch):
    from qwenvl.vision import flatten_patches

    g = torch.Generator().manual_seed(size)
    pixels = torch.randn(2, 3, size, size, generator=g, dtype=torch.float64)
    weight = torch.randn(5, 3, patch, patch, generator=g, dtype=torch.float64)
    conv = torch.nn.functional.conv2d(pixels, weight, stride=patch)                  # [2, 5, g, g]: the reference
    ours = flatten_patches(pixels, patch) @ weight.flatten(1).T                      # [2, g*g, 5]
    assert ours.shape == (2, (size // patch) ** 2, 5)
    assert torch.allclose(ours, conv.flatten(2).transpose(1, 2), atol=1e-12)
