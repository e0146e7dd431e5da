"""Host side (numpy): the Qwen2.5-VL vision tower's index arrays, from ``image_grid_thw``.

Mirrors transformers' ``vision_utils.get_vision_position_ids``, ``get_vision_cu_seqlens`` and
``get_vision_window_index`` as ``Qwen2_5_VisionTransformerPretrainedModel`` calls them.
"""

from __future__ import annotations

import numpy as np

from jaxmm.models.core.vision import VisionInputs
from jaxmm.models.core.vision_inputs import patch_positions, segments
from jaxmm.models.qwen2_5_vl.config import VisionConfig


def vision_inputs(image_grid_thw: np.ndarray, cfg: VisionConfig) -> VisionInputs:
    """image_grid_thw int [n_images, 3] -> :class:`VisionInputs` with windows: merged tokens in
    window order (``window_index`` [M], ``reverse_index`` [M]), rotary positions [N,2] in that order,
    frame and window segments."""
    m = cfg.spatial_merge_size
    unit = m * m
    win = cfg.window_size // m // cfg.patch_size
    pos, frame_lens = patch_positions(image_grid_thw, m)
    window_index, window_lens = [], []
    offset = 0
    for t, h, w in np.asarray(image_grid_thw).tolist():
        gh, gw = h // m, w // m
        idx = np.arange(t * gh * gw).reshape(t, gh, gw)
        ph, pw = win - gh % win, win - gw % win
        padded = np.pad(idx, ((0, 0), (0, ph), (0, pw)), constant_values=-100)
        nh, nw = (gh + ph) // win, (gw + pw) // win
        padded = padded.reshape(t, nh, win, nw, win).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, win * win)
        lens = (padded != -100).sum(-1).reshape(-1)
        flat = padded.reshape(-1)
        window_index.append(flat[flat != -100] + offset)
        window_lens += [int(x) * unit for x in lens if x > 0]
        offset += t * gh * gw
    window_index = np.concatenate(window_index).astype(np.int32)
    n = pos.shape[0]
    pos = pos.reshape(n // unit, unit, 2)[window_index].reshape(n, 2)
    return VisionInputs(
        rotary_pos=pos,
        frames=segments(frame_lens),
        window_index=window_index,
        reverse_index=np.argsort(window_index).astype(np.int32),
        windows=segments(window_lens),
    )
