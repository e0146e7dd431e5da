"""M-RoPE position ids on the host (numpy), identical to transformers' Qwen2.5-VL.

Mirrors ``Qwen2_5_VLModel.get_rope_index`` and ``get_vision_position_ids`` in
``transformers/models/qwen2_5_vl/modeling_qwen2_5_vl.py`` (5.x), called with
``mm_token_type_ids`` (1 at image pad tokens, 2 at video pad tokens).

Text tokens advance all three axes together; the tokens of an image with merged grid
(t, h/m, w/m) get (t·interval, row, col) offset by the current position, after which the position
advances by max(h, w)/m. Padding positions are 0. ``rope_deltas = max(position) + 1 − n_tokens``.
"""

from __future__ import annotations

import itertools

import numpy as np


def mm_token_type_ids(input_ids: np.ndarray, image_token_id: int, video_token_id: int) -> np.ndarray:
    """int32 [B,S]: 1 at image pad tokens, 2 at video pad tokens, 0 elsewhere."""
    ids = np.asarray(input_ids)
    return ((ids == image_token_id) * 1 + (ids == video_token_id) * 2).astype(np.int32)


def _vision_positions(start: int, grid_thw, merge: int, interval: float) -> np.ndarray:
    t, h, w = (int(x) for x in grid_thw)
    gt, gh, gw = t, h // merge, w // merge
    tt = (np.arange(gt) * interval).astype(np.int64)
    T, H, W = np.meshgrid(tt, np.arange(gh) + start, np.arange(gw) + start, indexing="ij")
    pos = np.stack([T, H, W]).reshape(3, -1)
    pos[0] += start
    return pos


def get_rope_index(input_ids, attention_mask=None, image_grid_thw=None, video_grid_thw=None,
                   second_per_grid_ts=None, *, image_token_id: int, video_token_id: int,
                   spatial_merge_size: int, tokens_per_second: float) -> tuple[np.ndarray, np.ndarray]:
    """M-RoPE positions for a batch.

    Args:
        input_ids: int [B,S]. attention_mask: {0,1} [B,S] (default all ones).
        image_grid_thw / video_grid_thw: int [n, 3] in patches, consumed in order across the batch.
        second_per_grid_ts: float [n_videos] seconds per temporal grid step (default 1).

    Returns:
        position_ids int64 [3,B,S] (0 at padding) and rope_deltas int64 [B,1].

    Raises:
        ValueError: naming the tensor, when a row holds more image/video groups than the grids
            describe, or a group's token count differs from its grid's ``t·h·w/merge²``.
    """
    ids = np.asarray(input_ids)
    b, s = ids.shape
    am = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
    types = mm_token_type_ids(ids, image_token_id, video_token_id)
    grids = {1: list(np.asarray(image_grid_thw).reshape(-1, 3)) if image_grid_thw is not None else [],
             2: list(np.asarray(video_grid_thw).reshape(-1, 3)) if video_grid_thw is not None else []}
    used = {1: 0, 2: 0}
    secs = list(np.asarray(second_per_grid_ts).reshape(-1)) if second_per_grid_ts is not None else []
    names = {1: "image_grid_thw", 2: "video_grid_thw"}
    position_ids = np.zeros((3, b, s), np.int64)
    deltas = np.zeros((b, 1), np.int64)
    for row in range(b):
        keep = am[row].astype(bool)
        row_types = types[row][keep]
        parts, cur = [], 0
        i = 0
        for kind, grp in itertools.groupby(row_types.tolist()):
            n = len(list(grp))
            if kind == 0:
                parts.append(np.broadcast_to(np.arange(n) + cur, (3, n)))
                cur += n
                i += n
                continue
            if used[kind] >= len(grids[kind]):
                raise ValueError(f"input_ids row {row}: more {'image' if kind == 1 else 'video'} token groups "
                                 f"than rows in {names[kind]} ({len(grids[kind])})")
            grid = grids[kind][used[kind]]
            want = int(np.prod(grid)) // spatial_merge_size ** 2
            if n != want:
                raise ValueError(f"input_ids row {row}: a group of {n} {'image' if kind == 1 else 'video'} tokens "
                                 f"at position {i}, but {names[kind]}[{used[kind]}]={list(map(int, grid))} "
                                 f"needs {want}")
            interval = 1
            if kind == 2:
                interval = tokens_per_second * (secs[used[kind]] if used[kind] < len(secs) else 1)
            parts.append(_vision_positions(cur, grid, spatial_merge_size, interval))
            cur += max(int(grid[1]), int(grid[2])) // spatial_merge_size
            used[kind] += 1
            i += n
        pos = np.concatenate(parts, axis=1) if parts else np.zeros((3, 0), np.int64)
        position_ids[:, row, keep] = pos
        deltas[row, 0] = (pos.max() + 1 if pos.size else 0) - int(keep.sum())
    return position_ids, deltas


def get_rope_index_for_config(config, input_ids, attention_mask=None, image_grid_thw=None,
                              video_grid_thw=None, second_per_grid_ts=None):
    """:func:`get_rope_index` with token ids and sizes read from a ``Qwen2_5_VLConfig``."""
    return get_rope_index(input_ids, attention_mask, image_grid_thw, video_grid_thw, second_per_grid_ts,
                          image_token_id=config.image_token_id, video_token_id=config.video_token_id,
                          spatial_merge_size=config.vision.spatial_merge_size,
                          tokens_per_second=config.vision.tokens_per_second)
