"""Host side (numpy): the Qwen3-VL vision tower's index arrays, from ``image_grid_thw``: frame
segments, rotary positions and the bilinear taps into the learned position table."""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxmm.models.core.vision import VisionInputs
from jaxmm.models.core.vision_inputs import frame_inputs
from jaxmm.models.qwen3_vl.config import VisionConfig


def interpolation_taps(image_grid_thw, side: int, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear (align_corners=True, border) taps and weights resampling a side×side position table
    to each image's patch grid, patches in merge-block order: [N,4] int32, [N,4] float32. Mirrors
    transformers' ``vision_utils.get_vision_interpolation_indices_and_weights``."""
    idx, wts = [], []
    for t, h, w in np.asarray(image_grid_thw).tolist():
        within = np.arange(h * w)
        in_col, in_row = within % merge, (within // merge) % merge
        block_col = (within // (merge * merge)) % (w // merge)
        block_row = within // (merge * merge * (w // merge))
        row, col = block_row * merge + in_row, block_col * merge + in_col

        def axis(index, size):
            src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
            floor = np.floor(src)
            taps = np.clip(floor.astype(np.int64)[:, None] + np.arange(2), 0, side - 1)
            weights = np.clip(1 - np.abs(src[:, None] - floor[:, None] - np.arange(2)), 0, None)
            return taps, weights.astype(np.float32)

        ht, hw_ = axis(row, h)
        wt, ww = axis(col, w)
        i = (ht[:, :, None] * side + wt[:, None, :]).reshape(-1, 4)
        wgt = (hw_[:, :, None] * ww[:, None, :]).reshape(-1, 4)
        idx.append(np.tile(i, (t, 1)))
        wts.append(np.tile(wgt, (t, 1)))
    return np.concatenate(idx).astype(np.int32), np.concatenate(wts).astype(np.float32)


def vision_inputs(image_grid_thw: np.ndarray, cfg: VisionConfig) -> VisionInputs:
    """image_grid_thw int [n_images, 3] -> :class:`VisionInputs`: frames, rotary positions and the
    position table's taps (``interp_index``, ``interp_weight`` [N,4])."""
    index, weight = interpolation_taps(image_grid_thw, int(round(cfg.num_position_embeddings**0.5)), cfg.spatial_merge_size)
    return dataclasses.replace(frame_inputs(image_grid_thw, cfg), interp_index=index, interp_weight=weight)
