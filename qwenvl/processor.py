"""Qwen2-VL image and video preprocessing (pure functions): smart_resize, normalise, patchify, frames.

    image (PIL) -> RGB (transparency composited onto white) -> smart_resize to multiples of 28 within
    [min_pixels, max_pixels] (PIL bicubic on uint8) -> /255, OpenAI-CLIP mean/std -> patches [N, 1176]
    in 2×2 merge-block order, + grid_thw (t, h, w) in patches.

This is transformers' PIL-backend image processor (`Qwen2VLImageProcessorPil`, qwen2_vl.md §4); the
torchvision backend resamples slightly differently. Videos: frames sampled as qwen-vl-utils 0.0.14 does
(`sample_frame_indices`), every frame resized with the per-frame video limits (`video_pixel_limits`),
again with PIL bicubic (qwen-vl-utils resizes with torchvision, so pixels differ slightly), frame count
padded to a multiple of the temporal patch (2), consecutive frames paired into temporal patches.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageSequence
from torch import Tensor

from .images import TRUSTED, check_pixel_count
from .images import to_rgb as _to_rgb
from .positions import vision_token_counts

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200
# qwen-vl-utils 0.0.14 video constants (qwen2_vl.md §5.1); factor 28 = patch 14 × merge 2.
VIDEO_FPS, VIDEO_MIN_FRAMES, VIDEO_MAX_FRAMES = 2.0, 4, 768
VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS = 128 * 28 * 28, 768 * 28 * 28
VIDEO_TOTAL_PIXELS = int(128000 * 28 * 28 * 0.9)


class VisualBudgetError(ValueError):
    """The images/videos of a request need more visual tokens than allowed."""


@dataclass(frozen=True)
class VisionProcessorConfig:
    """`preprocessor_config.json` values (hub defaults); min/max_pixels may be overridden per request."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56                  # 3136 = 4 tokens
    max_pixels: int = 16384 * 28 * 28          # 12 845 056 = 16384 tokens
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD

    @property
    def factor(self) -> int:                   # 28: every side is a multiple of patch × merge
        return self.patch_size * self.merge_size

    @classmethod
    def from_dict(cls, raw: dict) -> "VisionProcessorConfig":
        size = raw.get("size") or {}
        return cls(patch_size=raw.get("patch_size", 14), temporal_patch_size=raw.get("temporal_patch_size", 2),
                   merge_size=raw.get("merge_size", 2),
                   min_pixels=raw.get("min_pixels", size.get("shortest_edge", cls.min_pixels)),
                   max_pixels=raw.get("max_pixels", size.get("longest_edge", cls.max_pixels)),
                   image_mean=tuple(raw.get("image_mean", OPENAI_CLIP_MEAN)),
                   image_std=tuple(raw.get("image_std", OPENAI_CLIP_STD)))


# ---------------------------------------------------------------------------------------- sizes


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 16384 * 28 * 28) -> tuple[int, int]:
    """(new_height, new_width): multiples of `factor`, area within [min_pixels, max_pixels], aspect kept.

    Round each side to the nearest multiple (Python's round: 70 -> 56); if the area is too large,
    shrink both by sqrt(area / max_pixels) and floor; if too small, grow by sqrt(min_pixels / area) and ceil.
    Examples: (100, 150) -> (112, 140); (1080, 1920) -> (1092, 1932); (10, 10) -> (56, 56);
    (1080, 1920) with max_pixels 1003520 -> (728, 1316).
    """
    if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool)
               for v in (height, width, min_pixels, max_pixels)):
        raise ValueError(f"smart_resize needs ints, got {height=!r} {width=!r} {min_pixels=!r} {max_pixels=!r}")
    if height <= 0 or width <= 0:
        raise ValueError(f"image has no pixels: {height=} {width=}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"the image is {width} wide and {height} high: its aspect ratio "
                         f"{max(height, width) / min(height, width):.1f} is more than {MAX_ASPECT_RATIO}, the "
                         "official Qwen2-VL processor's limit; crop it or pad it to a squarer shape")
    if not 0 < min_pixels <= max_pixels:
        raise ValueError(f"need 0 < {min_pixels=} <= {max_pixels=}")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


WHITE = (255, 255, 255)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB with any transparency composited onto white (what transformers and qwen-vl-utils do).

    Example: an RGBA pixel (0, 0, 0, 0) becomes (255, 255, 255). Other modes go through Pillow's convert, as
    there (16-bit greyscale is clipped; `images.load_image` scales it to 0..255 before it gets here).
    """
    if not isinstance(image, Image.Image):
        raise ValueError(f"expected a PIL.Image, got {type(image).__name__} {str(image)[:60]!r}; "
                         "load files, URLs and data URIs with qwenvl.images.load_image")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        return _to_rgb(image, WHITE)
    return image.convert("RGB") if image.mode != "RGB" else image


def normalize(rgb: np.ndarray, mean: Sequence[float] = OPENAI_CLIP_MEAN,
              std: Sequence[float] = OPENAI_CLIP_STD) -> Tensor:
    """uint8 [H, W, 3] -> float32 [3, H, W]: x / 255, then (x - mean) / std per channel.

    Example: a white pixel -> [1.9303, 2.0749, 2.1459].
    """
    x = torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).float() / 255          # [3, H, W]
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (x - m) / s


def patchify(frames: Tensor, patch_size: int = 14, temporal_patch_size: int = 2,
             merge_size: int = 2) -> tuple[Tensor, tuple[int, int, int]]:
    """frames [F, C, H, W] -> (patches [t·gh·gw, C·Tp·P·P], (t, gh, gw)) in the model's order.

    F is padded to a multiple of Tp by repeating the last frame (an image, F = 1, becomes Tp identical
    frames). Rows: temporal patch, then 2×2 merge blocks in raster order, then the 4 patches of a block;
    each row flattens (C, Tp, P, P). Example: one 3×28×56 image -> patches [8, 1176], grid (1, 2, 4).
    """
    f, c, h, w = frames.shape
    p, m, tp = patch_size, merge_size, temporal_patch_size
    if h % (p * m) or w % (p * m):
        raise ValueError(f"frame size {h}x{w} is not a multiple of patch*merge = {p * m}; smart_resize first")
    if f % tp:
        frames = torch.cat([frames, frames[-1:].expand(tp - f % tp, -1, -1, -1)])
    t, gh, gw = frames.shape[0] // tp, h // p, w // p
    x = frames.reshape(t, tp, c, gh // m, m, p, gw // m, m, p)           # [t, Tp, C, bh, mh, P, bw, mw, P]
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)                             # [t, bh, bw, mh, mw, C, Tp, P, P]
    return x.reshape(t * gh * gw, c * tp * p * p), (t, gh, gw)


# --------------------------------------------------------------------------------------- images


def resize_image(image: Image.Image, min_pixels: int, max_pixels: int, factor: int = 28) -> Image.Image:
    """RGB image resized (PIL bicubic) to smart_resize's size."""
    rgb = to_rgb(image)
    h, w = smart_resize(rgb.height, rgb.width, factor, min_pixels, max_pixels)
    return rgb if (h, w) == (rgb.height, rgb.width) else rgb.resize((w, h), Image.Resampling.BICUBIC)


def preprocess_images(images: Sequence[Image.Image], config: VisionProcessorConfig = VisionProcessorConfig(),
                      min_pixels: int | None = None, max_pixels: int | None = None) -> tuple[Tensor, Tensor]:
    """pixel_patches [N, 1176] (all images concatenated) and grid_thw [num_images, 3] (int64).

    `min_pixels`/`max_pixels` override the config for this request. Example: one 100×150 (h×w) image
    -> resized 112×140 -> patches [80, 1176], grid_thw [[1, 8, 10]] -> 20 placeholder tokens.
    """
    lo = config.min_pixels if min_pixels is None else min_pixels    # 0 is an error (smart_resize), not "default"
    hi = config.max_pixels if max_pixels is None else max_pixels
    if isinstance(images, (Image.Image, str, Path)):
        raise ValueError(f"images must be a list of PIL images, got one {type(images).__name__}; wrap it in a list")
    patches, grids = [], []
    for image in images:
        resized = resize_image(image, lo, hi, config.factor)
        x = normalize(np.asarray(resized), config.image_mean, config.image_std)[None]   # [1, 3, H, W]
        p, grid = patchify(x, config.patch_size, config.temporal_patch_size, config.merge_size)
        patches.append(p)
        grids.append(grid)
    if not patches:
        return torch.zeros(0, 3 * config.temporal_patch_size * config.patch_size ** 2), torch.zeros(0, 3).long()
    return torch.cat(patches), torch.tensor(grids, dtype=torch.long)


# --------------------------------------------------------------------------------------- videos


def _round_to(n: float, k: int) -> int:
    return round(n / k) * k


def num_sampled_frames(total_frames: int, video_fps: float, fps: float = VIDEO_FPS,
                       min_frames: int = VIDEO_MIN_FRAMES, max_frames: int = VIDEO_MAX_FRAMES,
                       nframes: int | None = None, frame_factor: int = 2) -> int:
    """How many frames to sample (qwen-vl-utils 0.0.14 `smart_nframes`): a multiple of 2 in [2, total].

    Without `nframes`: total / video_fps * fps, clamped to [min_frames, min(max_frames, total)], floored
    to a multiple of 2. Examples: 300 frames @ 30 fps -> 20; 61 @ 30 -> 4; 3000 @ 25 -> 240; 20000 @ 25 -> 768.
    """
    if nframes is not None:
        n = _round_to(nframes, frame_factor)
    else:
        lo = math.ceil(min_frames / frame_factor) * frame_factor
        hi = math.floor(min(max_frames, total_frames) / frame_factor) * frame_factor
        n = min(max(total_frames / video_fps * fps, lo), hi, total_frames)
        n = math.floor(n / frame_factor) * frame_factor
    if not frame_factor <= n <= total_frames:
        raise ValueError(f"cannot sample {n} frames from a {total_frames}-frame video "
                         f"(need {frame_factor} <= n <= {total_frames})")
    return int(n)


def sample_frame_indices(total_frames: int, video_fps: float, **kwargs) -> tuple[list[int], float]:
    """(frame indices, sampled fps): `num_sampled_frames` frames spread with linspace(0, total-1).round().

    Example: 300 frames @ 30 fps -> 20 indices 0, 16, 31, ..., 299 and sample fps 2.0.
    """
    n = num_sampled_frames(total_frames, video_fps, **kwargs)
    idx = torch.linspace(0, total_frames - 1, n).round().long().tolist()
    return idx, n / total_frames * video_fps


def video_pixel_limits(nframes: int, max_pixels: int | None = None,
                       min_pixels: int | None = None) -> tuple[int, int]:
    """(min_pixels, max_pixels) per frame (qwen-vl-utils 0.0.14): a total budget shared by the frames.

    max = max(min(768·28², total / nframes · 2), 1.05 · 128·28²), lowered by a user `max_pixels`;
    min = 128·28² unless the user gives one. Example: 20 frames -> (100352, 602112).
    """
    lo = min_pixels or VIDEO_MIN_PIXELS
    hi = max(min(VIDEO_MAX_PIXELS, VIDEO_TOTAL_PIXELS / nframes * 2), int(VIDEO_MIN_PIXELS * 1.05))
    hi = int(min(hi, max_pixels) if max_pixels else hi)
    if lo > hi:
        raise ValueError(f"video frame limits: {min_pixels=} > max_pixels={hi} for {nframes} frames")
    return lo, hi


def read_video_frames(path: str | Path, indices: Sequence[int] | None = None) -> tuple[list[Image.Image], float]:
    """Frames of an animated image file (GIF, APNG, WebP) and its fps (from the mean frame duration), with
    Pillow only. `indices` picks frames (default: all); only those are kept in memory.

    Every problem is a ValueError naming the file (and the frame): missing, not an image, not animated,
    a corrupt or truncated frame. Other containers (mp4, ...) need a video decoder: pass PIL frames.
    """
    try:
        with Image.open(path) as im:
            n = getattr(im, "n_frames", 1)
            if n < 2:
                raise ValueError(f"cannot read video {path}: it has {n} frame, not an animation; send it as an "
                                 "image, or pass a list of frames")
            check_pixel_count(im.size, TRUSTED.max_pixels, str(path))
            durations = [_frame_duration(im, k, path) for k in range(n)]
            frames = [_frame(im, k, n, path) for k in (range(n) if indices is None else indices)]
    except (ValueError, OSError, EOFError, IndexError) as e:    # IndexError: Pillow on some truncated GIFs
        if isinstance(e, ValueError) and str(e).startswith(("cannot read video", "cannot load image")):
            raise
        raise ValueError(f"cannot read video {path}: {type(e).__name__}: {e}") from None
    return frames, 1000.0 / (sum(durations) / n)


def _frame_duration(im: Image.Image, k: int, path: str | Path) -> float:
    """Display time of frame k in ms (100 when the file gives none or 0, as browsers treat 0)."""
    _seek(im, k, im.n_frames, path)
    return im.info.get("duration") or 100


def _frame(im: Image.Image, k: int, n: int, path: str | Path) -> Image.Image:
    _seek(im, k, n, path)
    try:
        return to_rgb(im.copy())
    except OSError as e:
        raise ValueError(f"cannot read video {path}: frame {k} of {n} is corrupt or truncated ({e})") from None


def _seek(im: Image.Image, k: int, n: int, path: str | Path) -> None:
    try:
        im.seek(k)
        im.load()
    except (OSError, EOFError, ValueError, IndexError) as e:
        raise ValueError(f"cannot read video {path}: frame {k} of {n} is corrupt or truncated "
                         f"({type(e).__name__}: {e})") from None


def _check_rate(name: str, value: float | None) -> None:
    """fps-like values must be finite and > 0 (0 would divide by zero, NaN would sample nothing sensible)."""
    if value is not None and not (isinstance(value, numbers.Real) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _checked_frames(frames: Sequence[Image.Image]) -> list[Image.Image]:
    """RGB frames, all of one size (a frame of another size would be stretched: refused instead)."""
    rgb = [to_rgb(f) for f in frames]
    for k, f in enumerate(rgb):
        if f.size != rgb[0].size:
            raise ValueError(f"video frame {k} is {f.width}x{f.height} but frame 0 is {rgb[0].width}x"
                             f"{rgb[0].height}; all frames of a video must have one size (resize or crop them first)")
    return rgb


def preprocess_video(frames: Sequence[Image.Image] | str | Path, video_fps: float | None = None,
                     config: VisionProcessorConfig = VisionProcessorConfig(), fps: float = VIDEO_FPS,
                     nframes: int | None = None, max_pixels: int | None = None, min_pixels: int | None = None,
                     sample: bool = True) -> tuple[Tensor, Tensor, float]:
    """video_patches [t·gh·gw, 1176], grid_thw [1, 3], sampled fps, from frames (PIL) or an animated file.

    With `sample` the frames are sampled at `fps` (needs `video_fps` for a list); otherwise all frames are
    used (an odd count is padded by repeating the last). All frames must have one size.
    """
    _check_rate("fps", fps)
    _check_rate("video_fps", video_fps)
    if nframes is not None and not (isinstance(nframes, numbers.Real) and math.isfinite(nframes)):
        raise ValueError(f"nframes must be a number, got {nframes!r}")
    if isinstance(frames, (str, Path)):
        frames, out_fps = _read_sampled(frames, fps, nframes) if sample else read_video_frames(frames)
    elif not frames:
        raise ValueError("a video needs at least one frame")
    else:
        frames, out_fps = _sampled(list(frames), video_fps, fps, nframes) if sample else (list(frames), video_fps or fps)
    frames = _checked_frames(frames)
    lo, hi = video_pixel_limits(len(frames), max_pixels, min_pixels)
    h, w = smart_resize(frames[0].height, frames[0].width, config.factor, lo, hi)
    x = torch.stack([normalize(np.asarray(f.resize((w, h), Image.Resampling.BICUBIC)),
                               config.image_mean, config.image_std) for f in frames])   # [F, 3, H, W]
    patches, grid = patchify(x, config.patch_size, config.temporal_patch_size, config.merge_size)
    return patches, torch.tensor([grid], dtype=torch.long), out_fps


def _sampled(frames: list[Image.Image], video_fps: float | None, fps: float,
             nframes: int | None) -> tuple[list[Image.Image], float]:
    """The frames `sample_frame_indices` picks from a list, and the sampled fps."""
    if video_fps is None:
        raise ValueError("sampling frames needs video_fps (or pass sample=False)")
    if len(frames) < 2:
        raise ValueError(f"a {len(frames)}-frame video is too short to sample (it needs at least 2 frames); "
                         "pass sample=False to use its frames as they are")
    idx, out_fps = sample_frame_indices(len(frames), video_fps, fps=fps, nframes=nframes)
    return [frames[i] for i in idx], out_fps


def _read_sampled(path: str | Path, fps: float, nframes: int | None) -> tuple[list[Image.Image], float]:
    """The sampled frames of an animated file and the sampled fps; only those frames are kept in memory."""
    _, video_fps = read_video_frames(path, indices=[])       # timing only, after the file's checks
    with Image.open(path) as im:
        total = im.n_frames
    idx, out_fps = sample_frame_indices(total, video_fps, fps=fps, nframes=nframes)
    return read_video_frames(path, idx)[0], out_fps


# --------------------------------------------------------------------------------------- budget


def check_visual_budget(grids: Sequence[Tensor | None], max_visual_tokens: int, merge_size: int = 2,
                        min_pixels: int | None = None) -> int:
    """The number of visual tokens of all grids, or VisualBudgetError when it is over the budget.

    Example: grids [[1, 78, 138]] (a 1080p image at hub limits, 2691 tokens) with a budget of 1024 raises
    with the count and the per-image/video max_pixels that would fit. When `min_pixels` (the limit in effect)
    is above that size, every image is enlarged to it, so the hint names min_pixels instead.
    """
    counts = [c for g in grids if g is not None for c in vision_token_counts(g, merge_size)]
    total = sum(counts)
    if total > max_visual_tokens:
        fits = max(max_visual_tokens // max(len(counts), 1), 4) * 28 * 28
        knob = f"lower min_pixels (now {min_pixels}: it enlarges every image to at least that)" \
            if min_pixels is not None and min_pixels > fits else "lower max_pixels"
        raise VisualBudgetError(
            f"the images/videos need {total} visual tokens ({' + '.join(map(str, counts))}) but at most "
            f"{max_visual_tokens} are allowed; send fewer or smaller images, or {knob} "
            f"(about {fits} pixels each would fit)")
    return total
