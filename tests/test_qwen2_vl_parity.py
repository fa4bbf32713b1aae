"""Qwen2-VL parity with transformers' Qwen2VLForConditionalGeneration (tiny random config, fp32).

Cases: text only, one image, two images of different sizes, a video, a left-padded batch; greedy
`generate` single and batched; the PIL-backend image processor; checkpoint loading in both key layouts.
The text-position rule after a video is tested both ways (see qwenvl/positions.py).
"""
from __future__ import annotations

import json

import pytest
import torch

from qwen2_vl_tiny import (EOS, IMAGE, VIDEO, build_hf, hf_config_dict, hf_image_processor, mm_token_type_ids,
                           ours_from_hf, prompt, random_image)
from qwenvl.generation import left_pad
from qwenvl.positions import get_rope_index
from qwenvl.processor import preprocess_images, preprocess_video, smart_resize
from qwenvl.qwen2_vl_generation import VisionInputs, generate
from qwenvl.sampling import SamplingParams

TOL = 1e-4
MAX_ERR: dict[str, float] = {}   # printed at the end with -s, for the report


@pytest.fixture(scope="module")
def models():
    hf = build_hf(seed=0)
    return hf, ours_from_hf(hf)


@pytest.fixture(scope="module")
def images():
    return [random_image(100, 150, 0), random_image(60, 90, 1)]


def _hf_logits(hf, ids, mask=None, **kw):
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask, mm_token_type_ids=mm_token_type_ids(ids), **kw).logits


def _check(name, ref, ours, where=None):
    ours = ours.detach()
    diff = (ref - ours).abs() if where is None else (ref - ours).abs()[where]
    MAX_ERR[name] = float(diff.max())
    assert MAX_ERR[name] <= TOL, f"{name}: max |Δlogit| {MAX_ERR[name]:.2e} > {TOL}"
    a, b = ref.argmax(-1), ours.argmax(-1)
    assert torch.equal(a if where is None else a[where], b if where is None else b[where])


# ------------------------------------------------------------------------------ preprocessing


@pytest.mark.parametrize("size", [(100, 150), (60, 90), (333, 250), (20, 700)])
def test_processor_matches_transformers_pil_backend(size):
    img = random_image(*size, seed=sum(size))
    ref = hf_image_processor(min_pixels=3136, max_pixels=200_000)(images=[img], return_tensors="pt")
    patches, grid = preprocess_images([img], min_pixels=3136, max_pixels=200_000)
    assert torch.equal(grid, ref["image_grid_thw"])
    assert (grid[0, 1] * 14, grid[0, 2] * 14) == smart_resize(*size, 28, 3136, 200_000)
    assert patches.shape == ref["pixel_values"].shape
    assert float((patches - ref["pixel_values"]).abs().max()) <= 1e-6


def test_processor_rgba_is_composited_on_white_like_transformers():
    img = random_image(56, 84, 3).convert("RGBA")
    img.putalpha(128)
    ref = hf_image_processor()(images=[img], return_tensors="pt")
    patches, grid = preprocess_images([img])
    assert torch.equal(grid, ref["image_grid_thw"])
    assert float((patches - ref["pixel_values"]).abs().max()) <= 1e-6


def test_smart_resize_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    g = torch.Generator().manual_seed(0)
    sizes = torch.randint(14, 3000, (300, 2), generator=g).tolist() + [[14, 200], [1080, 1920], [4000, 3000]]
    for h, w in sizes:
        if max(h, w) / min(h, w) > 200:
            continue
        for lo, hi in ((3136, 12845056), (3136, 1003520), (100352, 602112)):
            assert smart_resize(h, w, 28, lo, hi) == hf_smart_resize(h, w, 28, lo, hi), (h, w, lo, hi)


# ------------------------------------------------------------------------------------ logits


def test_text_only(models):
    hf, ours = models
    ids = torch.tensor([prompt(17)])
    _check("text only", _hf_logits(hf, ids), ours(ids))


def test_one_image(models, images):
    hf, ours = models
    patches, grid = preprocess_images(images[:1])
    ids = torch.tensor([prompt(4, ("image", 20), 7)])
    ref = _hf_logits(hf, ids, pixel_values=patches, image_grid_thw=grid)
    _check("one image", ref, ours(ids, pixel_patches=patches, image_grid_thw=grid))


def test_two_images_of_different_sizes(models, images):
    hf, ours = models
    patches, grid = preprocess_images(images)
    assert grid.tolist() == [[1, 8, 10], [1, 4, 6]]
    ids = torch.tensor([prompt(3, ("image", 20), 2, ("image", 6), 5)])
    ref = _hf_logits(hf, ids, pixel_values=patches, image_grid_thw=grid)
    _check("two images", ref, ours(ids, pixel_patches=patches, image_grid_thw=grid))


def test_video_where_both_position_rules_agree(models):
    hf, ours = models
    frames = [random_image(56, 84, 10 + k) for k in range(4)]
    patches, grid, _ = preprocess_video(frames, sample=False, min_pixels=3136)
    assert grid.tolist() == [[2, 4, 6]]                     # t=2 <= max(h, w)/2 = 3: rules agree
    ids = torch.tensor([prompt(3, ("video", 12), 6)])
    ref = _hf_logits(hf, ids, pixel_values_videos=patches, video_grid_thw=grid)
    _check("video", ref, ours(ids, video_patches=patches, video_grid_thw=grid))


def test_long_low_resolution_video_position_rules(models):
    """grid (6, 4, 4): transformers 5 resumes text at start + 2, the original rule at start + 6."""
    hf, ours = models
    frames = [random_image(56, 56, 20 + k) for k in range(12)]
    patches, grid, _ = preprocess_video(frames, sample=False, min_pixels=3136)
    assert grid.tolist() == [[6, 4, 4]]
    ids = torch.tensor([prompt(3, ("video", 24), 6)])
    args = (None, grid, IMAGE, VIDEO, 2)
    hf_pos, hf_delta = hf.model.get_rope_index(ids, mm_token_type_ids(ids), None, grid)
    v5_pos, v5_delta = get_rope_index(ids, *args, video_rule="transformers5")
    assert torch.equal(v5_pos, hf_pos) and v5_delta.tolist() == hf_delta.view(-1).tolist()
    orig_pos, _ = get_rope_index(ids, *args)                # default: max + 1
    after = slice(3 + 1 + 24, None)                         # <|vision_end|> and the text after the video
    assert (orig_pos[:, :, after] - v5_pos[:, :, after]).unique().tolist() == [6 - 2]
    ref = _hf_logits(hf, ids, pixel_values_videos=patches, video_grid_thw=grid)
    _check("video, transformers5 rule", ref,
           ours(ids, v5_pos, video_patches=patches, video_grid_thw=grid))
    ref_orig = _hf_logits(hf, ids, position_ids=orig_pos, pixel_values_videos=patches, video_grid_thw=grid)
    _check("video, max+1 rule (positions given to both)", ref_orig,
           ours(ids, video_patches=patches, video_grid_thw=grid))


def test_left_padded_batch(models, images):
    hf, ours = models
    p1, g1 = preprocess_images(images[:1])
    p2, g2 = preprocess_images(images[1:])
    rows = [prompt(4, ("image", 20), 7), prompt(9), prompt(2, ("image", 6), 3)]
    ids, mask = left_pad(rows, pad_id=0)
    patches, grid = torch.cat([p1, p2]), torch.cat([g1, g2])
    ref = _hf_logits(hf, ids, mask, pixel_values=patches, image_grid_thw=grid)
    got = ours(ids, attention_mask=mask, pixel_patches=patches, image_grid_thw=grid)
    _check("batch, left padding", ref, got, where=mask.bool())
    alone = ours(torch.tensor([rows[1]]))                   # batched row == the same prompt alone
    assert float((alone[0] - got[1, -len(rows[1]):]).abs().max()) <= 1e-5


# ---------------------------------------------------------------------------------- generate


def _hf_generate(hf, ids, mask, n, **kw):
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, mm_token_type_ids=mm_token_type_ids(ids),
                          max_new_tokens=n, do_sample=False, eos_token_id=EOS, pad_token_id=0, **kw)
    return out[:, ids.shape[1]:]


def test_greedy_generate_one_image(models, images):
    hf, ours = models
    patches, grid = preprocess_images(images[:1])
    ids = torch.tensor([prompt(4, ("image", 20), 7)])
    ref = _hf_generate(hf, ids, torch.ones_like(ids), 10, pixel_values=patches, image_grid_thw=grid)
    got = generate(ours, ids, SamplingParams(max_new_tokens=10, do_sample=False),
                   vision=VisionInputs(patches, grid), eos_token_id=EOS)
    assert got.tolist() == ref.tolist()


def test_greedy_generate_batched_left_padding(models, images):
    hf, ours = models
    patches, grid = preprocess_images(images)
    rows = [prompt(4, ("image", 20), 7), prompt(2, ("image", 6), 3), prompt(5)]
    ids, mask = left_pad(rows, pad_id=0)
    ref = _hf_generate(hf, ids, mask, 10, pixel_values=patches, image_grid_thw=grid)
    got = generate(ours, ids, SamplingParams(max_new_tokens=10, do_sample=False), attention_mask=mask,
                   vision=VisionInputs(patches, grid), eos_token_id=EOS)
    assert got.tolist() == ref.tolist()
    p0, g0 = preprocess_images(images[:1])                  # and row 0 decodes the same alone
    alone = generate(ours, torch.tensor([rows[0]]), SamplingParams(max_new_tokens=10, do_sample=False),
                     vision=VisionInputs(p0, g0), eos_token_id=EOS)
    assert alone[0].tolist() == got[0].tolist()


def test_greedy_generate_video(models):
    hf, ours = models
    frames = [random_image(56, 84, 30 + k) for k in range(4)]
    patches, grid, _ = preprocess_video(frames, sample=False, min_pixels=3136)
    ids = torch.tensor([prompt(3, ("video", 12), 6)])
    ref = _hf_generate(hf, ids, torch.ones_like(ids), 8, pixel_values_videos=patches, video_grid_thw=grid)
    got = generate(ours, ids, SamplingParams(max_new_tokens=8, do_sample=False),
                   vision=VisionInputs(video_patches=patches, video_grid_thw=grid), eos_token_id=EOS)
    assert got.tolist() == ref.tolist()


def test_sampling_is_reproducible_with_a_generator(models):
    _, ours = models
    ids = torch.tensor([prompt(6)])
    params = SamplingParams(max_new_tokens=6, temperature=0.9, top_k=50, top_p=0.9, repetition_penalty=1.05)
    a = generate(ours, ids, params, generator=torch.Generator().manual_seed(3))
    b = generate(ours, ids, params, generator=torch.Generator().manual_seed(3))
    assert a.tolist() == b.tolist()


# ---------------------------------------------------------------------------------- checkpoints


def _write_config(d, raw):
    (d / "config.json").write_text(json.dumps(raw))


@pytest.mark.parametrize("layout", ["transformers_state_dict", "save_pretrained_sharded"])
@pytest.mark.parametrize("tie", [False, True])
def test_loading_both_key_layouts(tmp_path, images, layout, tie):
    from safetensors.torch import save_file

    from qwenvl.qwen2_vl_weights import load_model

    hf = build_hf(seed=1, tie=tie)
    if layout == "transformers_state_dict":                 # model.language_model.*, model.visual.*
        state = {k: v.contiguous() for k, v in hf.state_dict().items() if not (tie and k == "lm_head.weight")}
        save_file(state, str(tmp_path / "model.safetensors"))
        _write_config(tmp_path, {**hf_config_dict(tie), "torch_dtype": "float32"})
    else:                                                   # hub layout model.*, visual.*, in shards
        hf.save_pretrained(tmp_path, max_shard_size="100KB")
        assert (tmp_path / "model.safetensors.index.json").is_file()
        raw = json.loads((tmp_path / "config.json").read_text())
        assert any(k.startswith("visual.") for k in json.loads(
            (tmp_path / "model.safetensors.index.json").read_text())["weight_map"])
        _write_config(tmp_path, raw)
    ours = load_model(tmp_path, dtype="float32")
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tie
    patches, grid = preprocess_images(images[:1])
    ids = torch.tensor([prompt(4, ("image", 20), 7)])
    _check(f"loaded {layout}, tie={tie}", _hf_logits(hf, ids, pixel_values=patches, image_grid_thw=grid),
           ours(ids, pixel_patches=patches, image_grid_thw=grid))


def test_flat_hub_config_with_legacy_rope_scaling(tmp_path):
    from qwenvl.qwen2_vl_config import Qwen2VLConfig

    nested = hf_config_dict()
    flat = {k: v for k, v in nested.items() if k != "text_config"}
    text = dict(nested["text_config"])
    rope = text.pop("rope_parameters")
    flat.update(text, rope_theta=rope["rope_theta"],
                rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]})
    flat["vision_config"] = {**flat["vision_config"], "in_chans": 3}
    a, b = Qwen2VLConfig.from_dict(flat), Qwen2VLConfig.from_dict(nested)
    assert a == b and a.text.mrope_section == [2, 3, 3] and a.text.num_key_value_heads == 2
    assert Qwen2VLConfig.from_dict(a.to_dict()) == a
    from transformers import Qwen2VLConfig as HFConfig   # transformers reads our flat layout the same way

    hf = HFConfig(**a.to_dict())
    assert hf.text_config.rope_parameters["mrope_section"] == [2, 3, 3]
    assert hf.vision_config.hidden_size == 64 and hf.text_config.num_key_value_heads == 2


def test_report_max_errors():
    print("\nmax |Δlogit| per case:", json.dumps({k: f"{v:.2e}" for k, v in MAX_ERR.items()}, indent=1))
