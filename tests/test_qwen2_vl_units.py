"""Qwen2-VL pure functions without transformers: sizes, patches, positions, frames, budget, config,
model invariants (cached vs full, batched vs single, count checks), grounding in the v2 formats."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from qwenvl.grounding import Box, BoxFormat, PixelBox, bbox_2d_to_box, format_boxes, parse_bbox_2d, parse_boxes
from qwenvl.positions import decode_position_ids, get_rope_index, vision_position_ids, vision_token_counts
from qwenvl.processor import (VisualBudgetError, check_visual_budget, num_sampled_frames, patchify,
                              preprocess_images, preprocess_video, sample_frame_indices, smart_resize,
                              video_pixel_limits)
from qwenvl.qwen2_vl import Qwen2VL, new_kv_cache
from qwenvl.qwen2_vl_config import Qwen2VLConfig, preset

IMG, VID, VS, VE = 95, 96, 97, 98


# ------------------------------------------------------------------------------------ sizes


@pytest.mark.parametrize("hw, expected", [
    ((100, 150), (112, 140)), ((1080, 1920), (1092, 1932)), ((480, 640), (476, 644)), ((10, 10), (56, 56)),
    ((4000, 3000), (4004, 2996)), ((70, 70), (56, 56)),
])
def test_smart_resize_worked_sizes(hw, expected):
    assert smart_resize(*hw) == expected


def test_smart_resize_limits_per_request():
    assert smart_resize(1080, 1920, max_pixels=1003520) == (728, 1316)
    h, w = smart_resize(1080, 1920, max_pixels=200_000)
    assert h * w <= 200_000 and h % 28 == 0 and w % 28 == 0
    h, w = smart_resize(30, 40, min_pixels=50_000)
    assert h * w >= 50_000
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2100)
    with pytest.raises(ValueError, match="min_pixels"):
        smart_resize(100, 100, min_pixels=10_000, max_pixels=5_000)


def test_preprocess_images_max_pixels_override():
    img = Image.new("RGB", (1920, 1080), (10, 20, 30))
    _, grid = preprocess_images([img])
    assert grid.tolist() == [[1, 78, 138]] and vision_token_counts(grid) == [2691]
    _, small = preprocess_images([img], max_pixels=28 * 28 * 64)
    assert vision_token_counts(small)[0] <= 64


# ---------------------------------------------------------------------------------- patches


def test_patchify_layout_matches_an_explicit_loop():
    frames = torch.randn(4, 3, 56, 84)                                       # 4 frames -> t = 2, grid 4 x 6
    patches, grid = patchify(frames)
    assert grid == (2, 4, 6) and patches.shape == (48, 1176)
    row = 0
    for t in range(2):
        for bh in range(2):
            for bw in range(3):
                for mh in range(2):
                    for mw in range(2):
                        r, c = (2 * bh + mh) * 14, (2 * bw + mw) * 14
                        want = frames[2 * t:2 * t + 2, :, r:r + 14, c:c + 14].permute(1, 0, 2, 3).reshape(-1)
                        assert torch.equal(patches[row], want)
                        row += 1


def test_image_is_two_identical_frames_and_odd_videos_repeat_the_last_frame():
    img = torch.randn(1, 3, 28, 56)
    a, _ = patchify(img)
    b, _ = patchify(img.expand(2, -1, -1, -1))
    assert torch.equal(a, b)
    c, grid = patchify(torch.randn(3, 3, 28, 28))
    assert grid == (2, 2, 2)


def test_vision_position_ids_in_merge_block_order():
    pos = vision_position_ids(torch.tensor([[1, 2, 4]]))
    assert pos[:, 0].tolist() == [0, 0, 1, 1, 0, 0, 1, 1]
    assert pos[:, 1].tolist() == [0, 1, 0, 1, 2, 3, 2, 3]
    assert vision_position_ids(torch.tensor([[2, 2, 2]])).shape == (8, 2)


# -------------------------------------------------------------------------------- positions


def test_rope_index_worked_example():
    ids = torch.tensor([[1, 2, 3, VS] + [IMG] * 20 + [VE, 4, 5, 6, 7, 8, 9]])
    pos, delta = get_rope_index(ids, torch.tensor([[1, 8, 10]]), None, IMG, VID)
    assert pos[:, 0, :4].tolist() == [[0, 1, 2, 3]] * 3
    assert pos[0, 0, 4:24].tolist() == [4] * 20
    assert pos[1, 0, 4:24].tolist() == [4] * 5 + [5] * 5 + [6] * 5 + [7] * 5
    assert pos[2, 0, 4:24].tolist() == [4, 5, 6, 7, 8] * 4
    assert pos[:, 0, 24:].tolist() == [list(range(9, 16))] * 3
    assert delta.tolist() == [16 - 31]


def test_rope_index_text_only_padding_and_decode():
    ids = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    pos, delta = get_rope_index(ids, None, None, IMG, VID, attention_mask=mask)
    assert pos[0, 0].tolist() == [0, 0, 0, 1, 2] and pos[0, 1].tolist() == [0, 1, 2, 3, 4]
    assert delta.tolist() == [0, 0]
    assert decode_position_ids(torch.tensor([31, 5]), torch.tensor([-15, 0]))[:, :, 0].tolist() == [[16, 5]] * 3


def test_rope_index_video_rules():
    ids = torch.tensor([[1, VS] + [VID] * 24 + [VE, 2]])
    grid = torch.tensor([[6, 4, 4]])
    orig, d1 = get_rope_index(ids, None, grid, IMG, VID)
    v5, d2 = get_rope_index(ids, None, grid, IMG, VID, video_rule="transformers5")
    assert orig[0, 0, 2:26].unique().tolist() == list(range(2, 8))        # t = 0..5 from start 2
    assert orig[0, 0, 26] == 2 + 6 and v5[0, 0, 26] == 2 + 2
    assert d1 - d2 == 2          # transformers 5: max id is the video's last temporal id 7, not the text's 5
    with pytest.raises(ValueError, match="video_rule"):
        get_rope_index(ids, None, grid, IMG, VID, video_rule="nope")


def test_rope_index_errors_name_the_counts():
    ids = torch.tensor([[1, VS] + [IMG] * 3 + [VE]])
    with pytest.raises(ValueError, match="has 3 tokens but its grid"):
        get_rope_index(ids, torch.tensor([[1, 4, 4]]), None, IMG, VID)
    with pytest.raises(ValueError, match="more placeholder runs"):
        get_rope_index(ids, None, None, IMG, VID)
    with pytest.raises(ValueError, match="left over"):
        get_rope_index(torch.tensor([[1, 2]]), torch.tensor([[1, 2, 2]]), None, IMG, VID)


def test_two_adjacent_images_without_separator_are_split_by_their_grids():
    ids = torch.tensor([[1] + [IMG] * 5 + [2]])
    pos, _ = get_rope_index(ids, torch.tensor([[1, 2, 2], [1, 4, 4]]), None, IMG, VID)
    assert pos[:, 0, 1].tolist() == [1, 1, 1] and pos[:, 0, 2].tolist() == [2, 2, 2]


def test_vision_token_counts():
    assert vision_token_counts([[1, 8, 10], [2, 4, 4]]) == [20, 8]
    with pytest.raises(ValueError, match="not valid"):
        vision_token_counts([[1, 3, 4]])


@pytest.mark.parametrize("grid, fragment", [
    ([[8, 10]], "grid_thw row 0 is [8, 10]: expected [t, h, w], 3 integers"),
    ([[1, 2, 2], [1, 2, 2, 2]], "grid_thw row 1 is [1, 2, 2, 2]: expected [t, h, w]"),
    ([[1, 2.0, 2]], "grid_thw row 0 is [1, 2.0, 2]: expected [t, h, w], 3 integers"),
    (torch.tensor([[8, 10]]), "grid_thw row 0 is [8, 10]"),
    (torch.tensor([1, 8, 10]), "grid_thw must have shape [n, 3] (one [t, h, w] row per image/video), got shape (3,)"),
    (5, "grid_thw must be a list of [t, h, w] rows or a [n, 3] tensor, got 5"),
])
def test_malformed_grid_rows_are_named_by_every_reader(grid, fragment):
    # Was "not enough values to unpack" (vision_token_counts, vision_position_ids) or an IndexError (get_rope_index).
    with pytest.raises(ValueError) as info:
        vision_token_counts(grid)
    assert fragment in str(info.value)
    if isinstance(grid, torch.Tensor):
        with pytest.raises(ValueError, match=r"^grid_thw (row 0|must have shape)"):
            vision_position_ids(grid)
        with pytest.raises(ValueError, match=r"^image_grid_thw (row 0|must have shape)"):
            get_rope_index(torch.tensor([[5, 5]]), grid, None, 5, 6)


# ----------------------------------------------------------------------------------- frames


@pytest.mark.parametrize("total, fps, expected", [(300, 30, 20), (61, 30, 4), (10, 30, 4), (3000, 25, 240),
                                                  (20000, 25, 768)])
def test_num_sampled_frames_qwen_vl_utils_examples(total, fps, expected):
    assert num_sampled_frames(total, fps) == expected


def test_sample_indices_and_errors():
    idx, sfps = sample_frame_indices(300, 30.0)
    assert len(idx) == 20 and idx[0] == 0 and idx[-1] == 299 and sfps == pytest.approx(2.0)
    assert num_sampled_frames(100, 30, nframes=7) == 8
    with pytest.raises(ValueError, match="cannot sample"):
        num_sampled_frames(1, 30)


def test_video_pixel_limits():
    assert video_pixel_limits(20) == (100352, 602112)
    assert video_pixel_limits(20, max_pixels=200_000) == (100352, 200_000)
    assert video_pixel_limits(768) == (100352, 235200)          # the total budget bites: 90316800 / 768 * 2


def test_video_from_frames_and_from_an_animated_file(tmp_path):
    frames = [Image.fromarray(np.full((56, 56, 3), 10 * k, np.uint8)) for k in range(10)]
    patches, grid, sfps = preprocess_video(frames, video_fps=10.0, fps=2.0, min_pixels=3136)
    assert grid.tolist() == [[2, 4, 4]] and patches.shape == (32, 1176) and sfps == pytest.approx(4 / 10 * 10)
    path = tmp_path / "clip.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    p2, g2, _ = preprocess_video(path, min_pixels=3136)
    assert g2.tolist() == [[2, 4, 4]]
    with pytest.raises(ValueError, match="video_fps"):
        preprocess_video(frames)


def test_visual_token_budget():
    assert check_visual_budget([torch.tensor([[1, 8, 10]])], 100) == 20
    with pytest.raises(VisualBudgetError, match=r"need 2711 visual tokens \(2691 \+ 20\) but at most 1024"):
        check_visual_budget([torch.tensor([[1, 78, 138], [1, 8, 10]]), None], 1024)
    with pytest.raises(VisualBudgetError, match=r"lower min_pixels \(now 2000000"):   # it, not max_pixels, enlarges
        check_visual_budget([torch.tensor([[1, 52, 52]])], 100, min_pixels=2_000_000)


# ----------------------------------------------------------------------------------- config


def test_presets_and_config_roundtrip():
    c = preset("Qwen2-VL-2B-Instruct")
    assert c.text.head_dim == 128 and c.tie_word_embeddings and c.vision.patch_dim == 1176
    assert Qwen2VLConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    with pytest.raises(ValueError, match="merger output"):
        Qwen2VLConfig.from_dict({**c.to_dict(), "vision_config": {"hidden_size": 7}})
    with pytest.raises(ValueError, match="mrope_section"):
        Qwen2VLConfig.from_dict({**c.to_dict(), "rope_scaling": {"type": "mrope", "mrope_section": [1, 2, 3]}})


# ------------------------------------------------------------------------------ model invariants


def _tiny() -> Qwen2VL:
    cfg = Qwen2VLConfig.from_dict({
        "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]},
        "image_token_id": IMG, "video_token_id": VID, "vision_start_token_id": VS, "vision_end_token_id": VE,
        "vision_config": {"depth": 1, "embed_dim": 16, "num_heads": 2, "hidden_size": 32}})
    model = Qwen2VL(cfg).eval().requires_grad_(False)
    model.init_weights(torch.Generator().manual_seed(0), std=0.1)
    return model


def test_cached_decode_matches_full_forward():
    from qwenvl.qwen2_vl_generation import decode_step, prefill, VisionInputs

    model = _tiny()
    patches, grid = torch.randn(16, 1176), torch.tensor([[1, 4, 4]])
    ids = torch.tensor([[1, VS] + [IMG] * 4 + [VE, 5, 6, 7]])
    full = model(ids, pixel_patches=patches, image_grid_thw=grid)                    # [1, T, V]
    cache = new_kv_cache(model.config, 1, 16)
    mask = torch.ones_like(ids)
    last, delta = prefill(model, ids[:, :-1], mask[:, :-1], VisionInputs(patches, grid), cache)
    assert torch.allclose(last, full[:, -2], atol=1e-5)
    step = decode_step(model, ids[:, -1], cache, delta)
    assert torch.allclose(step, full[:, -1], atol=1e-5)


def test_feature_count_mismatch_is_a_clear_error():
    model = _tiny()
    ids = torch.tensor([[1, VS] + [IMG] * 3 + [VE]])
    with pytest.raises(ValueError, match="n_tokens=3 placeholder tokens != n_features=4"):
        model(ids, torch.zeros(3, 1, 6, dtype=torch.long), pixel_patches=torch.randn(16, 1176),
              image_grid_thw=torch.tensor([[1, 4, 4]]))
    with pytest.raises(ValueError, match=r"pixel_patches \(15, 1176\)"):
        model.encode_vision(torch.randn(15, 1176), torch.tensor([[1, 4, 4]]))
    with pytest.raises(ValueError, match=r"grid_thw row 0 is \[4, 4\]: expected \[t, h, w\]"):
        model.encode_vision(torch.randn(16, 1176), torch.tensor([[4, 4]]))   # was "pixel_patches (16, 1176) != ..."


def test_tied_head_shares_the_embedding():
    cfg = _tiny().config
    cfg.tie_word_embeddings = True
    model = Qwen2VL(cfg)
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("layout", ["hub", "transformers"])
def test_save_and_load_round_trip(tmp_path, layout):
    from safetensors import safe_open

    from qwenvl.qwen2_vl_weights import load_model, save_checkpoint

    model = _tiny()
    save_checkpoint(model, tmp_path, layout=layout)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        prefixes = {k.split(".")[0] + "." + k.split(".")[1] for k in f.keys() if k.startswith("model.")}
    assert prefixes == ({"model.embed_tokens", "model.layers", "model.norm"} if layout == "hub"
                        else {"model.language_model", "model.visual"})
    loaded = load_model(tmp_path, dtype="float32")
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(loaded(ids), model(ids))


def test_loader_names_missing_and_misshaped_keys(tmp_path):
    from safetensors.torch import load_file, save_file

    from qwenvl.qwen2_vl_weights import load_model, save_checkpoint
    from qwenvl.weights import CheckpointError

    save_checkpoint(_tiny(), tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["model.norm.weight"]
    state["lm_head.weight"] = state["lm_head.weight"][:10]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing: model.norm.weight; mis-shaped: lm_head.weight"):
        load_model(tmp_path, dtype="float32")


# --------------------------------------------------------------------------------- grounding


def test_qwen2_vl_box_format_round_trip():
    text = ("<|object_ref_start|>the red car<|object_ref_end|><|box_start|>(701,531),(869,675)<|box_end|>"
            " and <|box_start|>(1,2),(3,4)<|box_end|>")
    boxes = parse_boxes(text, BoxFormat.QWEN2_VL)
    assert boxes == [Box(701, 531, 869, 675, "the red car"), Box(1, 2, 3, 4, None)]
    assert parse_boxes(text) == []                                      # v1 tags do not match v2 text
    many = [Box(1, 2, 3, 4, "car"), Box(5, 6, 7, 8, "car"), Box(9, 9, 10, 10, "dog")]
    written = format_boxes(many, BoxFormat.QWEN2_VL)
    assert written.count("<|object_ref_start|>") == 2
    assert parse_boxes(written, BoxFormat.QWEN2_VL) == many
    assert parse_boxes("<|box_start|>(1,2),(3,4)<|object_ref_end|>", BoxFormat.QWEN2_VL) == []


def test_qwen25_json_boxes_are_converted_explicitly():
    answer = ('Sure.\n```json\n[{"bbox_2d": [322, 119, 644, 476], "label": "cat"}, {"bbox_2d": [1, 2]},\n'
              ' {"bbox_2d": [0, 0, 10.5, 20], "label": "dog"}]\n```')
    boxes = parse_bbox_2d(answer)
    assert boxes == [PixelBox(322, 119, 644, 476, "cat"), PixelBox(0, 0, 10.5, 20, "dog")]
    assert bbox_2d_to_box(boxes[0], 644, 476) == Box(500, 250, 999, 999, "cat")
    assert parse_bbox_2d("no json here") == [] and parse_bbox_2d('{"bbox_2d": [1, 2, 3, 4]}') == [PixelBox(1, 2, 3, 4)]


def test_bad_image_inputs_are_clear_errors_not_fallbacks():
    img = Image.new("RGB", (40, 30))
    with pytest.raises(ValueError, match=r"10000 wide and 2 high: its aspect ratio 5000.0 is more than 200"):
        smart_resize(2, 10000)
    with pytest.raises(ValueError, match="needs ints"):
        smart_resize(float("nan"), 2)
    with pytest.raises(ValueError, match="max_pixels=0"):          # 0 was silently the checkpoint default
        preprocess_images([img], max_pixels=0)
    with pytest.raises(ValueError, match="expected a PIL.Image, got str"):
        preprocess_images(["x.png"])
    with pytest.raises(ValueError, match="list of PIL images"):
        preprocess_images(img)


@pytest.mark.parametrize("kwargs, match", [
    ({"fps": 0}, "fps must be a finite number > 0"), ({"fps": float("nan")}, "fps must be"),
    ({"video_fps": 0}, "video_fps must be a finite number > 0"), ({"video_fps": -3}, "video_fps must be"),
])
def test_video_rates_must_be_positive(kwargs, match):
    frames = [Image.new("RGB", (56, 56))] * 4
    with pytest.raises(ValueError, match=match):
        preprocess_video(frames, **{"video_fps": 2.0, **kwargs})


def test_bad_videos_are_clear_errors(tmp_path):
    frames = [Image.fromarray(np.random.default_rng(k).integers(0, 255, (56, 56, 3), np.uint8)) for k in range(10)]
    with pytest.raises(ValueError, match="frame 1 is 200x30 but frame 0 is 56x56"):   # was stretched silently
        preprocess_video([frames[0], Image.new("RGB", (200, 30))], sample=False)
    with pytest.raises(ValueError, match="1-frame video is too short to sample"):
        preprocess_video(frames[:1], video_fps=2.0)
    with pytest.raises(ValueError, match="cannot read video .*nope.gif: FileNotFoundError"):
        preprocess_video(tmp_path / "nope.gif")
    (tmp_path / "junk.gif").write_bytes(b"GIF89a junk")
    with pytest.raises(ValueError, match="cannot read video .*junk.gif"):
        preprocess_video(tmp_path / "junk.gif")
    path = tmp_path / "clip.png"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
    data = path.read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) * 6 // 10])
    with pytest.raises(ValueError, match=r"frame \d+ of 10 is corrupt or truncated"):
        preprocess_video(tmp_path / "cut.png")
