"""Position ids for Qwen2-VL (pure functions): the LLM's M-RoPE ids and the ViT's 2-D rotary ids.

Also the one helper that says how many placeholder tokens an image or video takes
(`vision_token_counts`), shared by the chat renderer and the model's count check, and `grid_rows`, the one
reader (and checker) of grid_thw rows that every function here and the ViT go through.

M-RoPE (qwen2_vl.md §6.1): every token has three ids (temporal, height, width). Text tokens get the same
running id in all three rows; the tokens of an image/video with merged grid (t, h, w) get
(start + ti, start + hi, start + wi). What comes after a vision run depends on `video_rule`:

* `"max_plus_one"` (default): the next id is max(ids so far) + 1 = start + max(t, h, w). This is the rule
  the model was trained with (original Qwen code, transformers ≤ 4.57, vLLM).
* `"transformers5"`: start + max(h, w), ignoring t (transformers 5.x). The two rules differ only for videos
  with more temporal patches than merged rows and columns; for images they are identical.

Decoding: the token at cache slot i (counting only real tokens) has id i + rope_delta in all rows, where
rope_delta = max_id + 1 - n_real_tokens is kept per request by the caller.
"""
from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

VIDEO_RULES = ("max_plus_one", "transformers5")


def vision_token_counts(grid_thw: Tensor | Sequence[Sequence[int]] | None, merge_size: int = 2,
                        name: str = "grid_thw") -> list[int]:
    """Placeholder tokens per image/video: t·h·w / merge² for each grid row (h, w in patches).

    Example: grids [[1, 8, 10], [2, 4, 4]] with merge 2 -> [20, 8]. Bad rows raise (see `grid_rows`).
    """
    return [t * h * w // merge_size ** 2 for t, h, w in grid_rows(grid_thw, merge_size, name)]


def grid_rows(grid_thw: Tensor | Sequence[Sequence[int]] | None, merge_size: int = 2,
              name: str = "grid_thw") -> list[tuple[int, int, int]]:
    """The (t, h, w) rows of a grid_thw [n, 3], or a ValueError naming `name` and the bad row.

    Every reader of grid_thw goes through here, so a row of 2 numbers or a 1-D grid is refused by name instead
    of failing inside an unpack. Example: `grid_rows([[1, 8, 10]])` -> `[(1, 8, 10)]`; `grid_rows([[8, 10]])`
    -> "grid_thw row 0 is [8, 10]: expected [t, h, w], 3 integers".
    """
    if grid_thw is None:
        return []
    if isinstance(grid_thw, Tensor) and grid_thw.numel() and grid_thw.dim() != 2:
        raise ValueError(f"{name} must have shape [n, 3] (one [t, h, w] row per image/video), "
                         f"got shape {tuple(grid_thw.shape)}")
    rows = grid_thw.tolist() if isinstance(grid_thw, Tensor) else grid_thw
    if isinstance(rows, (str, bytes, dict)) or not hasattr(rows, "__iter__"):
        raise ValueError(f"{name} must be a list of [t, h, w] rows or a [n, 3] tensor, got {rows!r:.80}")
    return [_grid_row(row, k, merge_size, name) for k, row in enumerate(rows)]


def _grid_row(row: Any, k: int, merge_size: int, name: str) -> tuple[int, int, int]:
    """One checked row: 3 integers, t >= 1, h and w positive multiples of the merge size."""
    values = row.tolist() if hasattr(row, "tolist") else row      # a tensor or numpy row -> Python numbers
    if not isinstance(values, (list, tuple)) or len(values) != 3 or not all(_is_int(v) for v in values):
        raise ValueError(f"{name} row {k} is {row!r:.80}: expected [t, h, w], 3 integers")
    t, h, w = (int(v) for v in values)
    if t < 1 or h % merge_size or w % merge_size or h < 1 or w < 1:
        raise ValueError(f"{name} row {k} {(t, h, w)} is not valid for merge_size={merge_size} "
                         "(t >= 1, h and w positive multiples of the merge size)")
    return t, h, w


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def vision_position_ids(grid_thw: Tensor, merge_size: int = 2) -> Tensor:
    """(row, col) [N, 2] of every patch on the un-merged grid, in the processor's patch order.

    Patches come in 2×2 merge blocks (block rows, then block cols; inside a block (0,0), (0,1), (1,0),
    (1,1)); the list repeats for each temporal patch. Example, grid [[1, 2, 4]] (one block row, two blocks):
    rows [0, 0, 1, 1, 0, 0, 1, 1], cols [0, 1, 0, 1, 2, 3, 2, 3].
    """
    out = []
    for t, h, w in grid_rows(grid_thw, merge_size):
        m = merge_size
        rows = torch.arange(h).view(h // m, m, 1, 1).expand(h // m, m, w // m, m)   # [bh, mh, bw, mw]
        cols = torch.arange(w).view(1, 1, w // m, m).expand(h // m, m, w // m, m)
        pairs = torch.stack([rows, cols], dim=-1).permute(0, 2, 1, 3, 4)              # [bh, bw, mh, mw, 2]
        out.append(pairs.reshape(h * w, 2).repeat(t, 1))                              # [t*h*w, 2]
    return torch.cat(out) if out else torch.zeros(0, 2, dtype=torch.long)


def _vision_run_ids(start: int, grid: Sequence[int], merge_size: int) -> Tensor:
    """ids [3, t*h*w/m²] of one image/video starting at `start`. Example: start 4, grid (1, 4, 6), m 2 ->
    T = 4 ×6, H = 4 4 4 5 5 5, W = 4 5 6 4 5 6."""
    t, h, w = grid[0], grid[1] // merge_size, grid[2] // merge_size
    ti = torch.arange(t).view(t, 1, 1).expand(t, h, w)
    hi = torch.arange(h).view(1, h, 1).expand(t, h, w)
    wi = torch.arange(w).view(1, 1, w).expand(t, h, w)
    return torch.stack([ti, hi, wi]).reshape(3, -1) + start


def _row_ids(ids: list[int], kinds: dict[int, list[list[int]]], merge_size: int, video_rule: str) -> Tensor:
    """M-RoPE ids [3, len(ids)] of one row of real tokens; `kinds` maps image/video id -> its remaining grids."""
    pieces, pos, i = [], 0, 0
    while i < len(ids):
        if ids[i] not in kinds:
            j = i
            while j < len(ids) and ids[j] not in kinds:
                j += 1
            pieces.append(torch.arange(pos, pos + j - i).expand(3, -1))
            pos, i = pos + j - i, j
            continue
        grids = kinds[ids[i]]
        if not grids:
            raise ValueError(f"more placeholder runs of token {ids[i]} than grids for them")
        grid = grids.pop(0)
        n = grid[0] * grid[1] * grid[2] // merge_size ** 2
        if ids[i:i + n] != [ids[i]] * n:
            run = next((k for k in range(i, len(ids)) if ids[k] != ids[i]), len(ids)) - i
            raise ValueError(f"a placeholder run of token {ids[i]} has {run} tokens but its grid {grid} needs {n}")
        pieces.append(_vision_run_ids(pos, grid, merge_size))
        advance = max(grid[1], grid[2]) // merge_size
        pos += advance if video_rule == "transformers5" else max(grid[0], advance)
        i += n
    return torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long)


def get_rope_index(
    input_ids: Tensor,                         # [B, T]
    image_grid_thw: Tensor | None,             # [num_images, 3], in order of appearance (row-major)
    video_grid_thw: Tensor | None,             # [num_videos, 3]
    image_token_id: int,
    video_token_id: int,
    spatial_merge_size: int = 2,
    attention_mask: Tensor | None = None,      # [B, T], 0 = padding (skipped)
    video_rule: str = "max_plus_one",
) -> tuple[Tensor, Tensor]:
    """M-RoPE position_ids [3, B, T] and rope_delta [B] (padded slots get id 0).

    Example (qwen2_vl.md §6.1): `[<|im_start|>, user, \\n, <|vision_start|>] + 20 <|image_pad|>` (grid
    1×8×10 -> 4×5 merged) + 7 text tokens:
        T: 0 1 2 3 | 4 ×20                  | 9 10 .. 15
        H: 0 1 2 3 | 4 ×5, 5 ×5, 6 ×5, 7 ×5 | 9 10 .. 15
        W: 0 1 2 3 | 4 5 6 7 8 (×4)         | 9 10 .. 15
    rope_delta = 16 - 31 = -15. Pure text reduces to arange in all three rows with delta 0.
    """
    if video_rule not in VIDEO_RULES:
        raise ValueError(f"{video_rule=} is not one of {VIDEO_RULES}")
    b, t = input_ids.shape
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    kinds = {image_token_id: _grid_list(image_grid_thw, spatial_merge_size, "image_grid_thw"),
             video_token_id: _grid_list(video_grid_thw, spatial_merge_size, "video_grid_thw")}
    position_ids = torch.zeros(3, b, t, dtype=torch.long)
    deltas = torch.zeros(b, dtype=torch.long)
    for row in range(b):
        real = input_ids[row][mask[row]].tolist()
        ids = _row_ids(real, kinds, spatial_merge_size, video_rule)                  # [3, n_real]
        position_ids[:, row, mask[row]] = ids
        deltas[row] = (int(ids.max()) + 1 if ids.numel() else 0) - len(real)
    left = {k: len(v) for k, v in kinds.items() if v}
    if left:
        raise ValueError(f"grids left over after all placeholder runs (token id -> count): {left}")
    return position_ids.to(input_ids.device), deltas.to(input_ids.device)


def _grid_list(grid_thw: Tensor | None, merge_size: int, name: str) -> list[list[int]]:
    return [list(row) for row in grid_rows(grid_thw, merge_size, name)]


def decode_position_ids(next_position: Tensor, rope_delta: Tensor) -> Tensor:
    """position_ids [3, B, 1] of one decode step: each row's count of real cached tokens + its rope_delta.

    Example: next_position [31, 5], rope_delta [-15, 0] -> [[16], [5]] in all three rows.
    """
    return (next_position + rope_delta).view(1, -1, 1).expand(3, -1, 1)
