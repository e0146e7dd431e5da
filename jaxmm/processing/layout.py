"""TokenLayout: what each position of a token sequence is, for attention-level methods.

Computed once on the host from ``input_ids`` and ``image_grid_thw`` and carried through the
forward (and the KV cache) as a pytree of arrays, so attention interventions and probes can ask
"which keys are image tokens, system tokens, the question, generated tokens, inside a box?" and
"where does this image token sit in its merged grid?".
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """Per-position description of a batch of sequences (all arrays [B,S, ...]).

    image_mask bool [B,S]: image pad tokens (not padding). video_mask bool [B,S]: video pad tokens.
    image_index int32 [B,S]: row of ``image_grid_thw`` of the image a token belongs to, −1 elsewhere.
    grid_pos int32 [B,S,3]: (t, row, col) of an image token in its image's MERGED grid
        (h/merge × w/merge), raster order as the vision tower emits merged tokens; −1 elsewhere.
    grid_hw int32 [B,S,2]: merged (rows, cols) of the token's image; −1 elsewhere.
    attention_mask int32 [B,S]: 1 = token, 0 = padding.
    system_mask, question_mask, generated_mask bool [B,S]: the system-prompt span, the question
        span and generated tokens (False unless given).
    region_weight float32 [B,S]: weight of each key inside the region of interest (0 unless set;
        see :mod:`jaxmm.processing.regions`).
    """

    image_mask: Any
    video_mask: Any
    image_index: Any
    grid_pos: Any
    grid_hw: Any
    attention_mask: Any
    system_mask: Any
    question_mask: Any
    generated_mask: Any
    region_weight: Any

    def extend(self, n_new: int) -> "TokenLayout":
        """The layout grown by ``n_new`` generated positions at the end of every row (numpy)."""
        b = np.asarray(self.image_mask).shape[0]

        def grow(x, fill, tail=()):
            x = np.asarray(x)
            return np.concatenate([x, np.full((b, n_new) + tail, fill, x.dtype)], axis=1)

        return TokenLayout(
            image_mask=grow(self.image_mask, False), video_mask=grow(self.video_mask, False),
            image_index=grow(self.image_index, -1), grid_pos=grow(self.grid_pos, -1, (3,)),
            grid_hw=grow(self.grid_hw, -1, (2,)), attention_mask=grow(self.attention_mask, 1),
            system_mask=grow(self.system_mask, False), question_mask=grow(self.question_mask, False),
            generated_mask=grow(self.generated_mask, True), region_weight=grow(self.region_weight, 0.0))


def _span_mask(spans, b: int, s: int, name: str) -> np.ndarray:
    m = np.zeros((b, s), bool)
    if spans is None:
        return m
    if len(spans) != b:
        raise ValueError(f"{name}: {len(spans)} rows of spans for a batch of {b}")
    for row, row_spans in enumerate(spans):
        for start, end in row_spans or ():
            if not 0 <= start <= end <= s:
                raise ValueError(f"{name}[{row}]: span ({start}, {end}) outside [0, {s}]")
            m[row, start:end] = True
    return m


def build_token_layout(input_ids, attention_mask, image_grid_thw, *, image_token_id: int,
                       video_token_id: int, spatial_merge_size: int, video_grid_thw=None,
                       system_spans=None, question_spans=None, generated_spans=None) -> TokenLayout:
    """Builds the layout of a batch.

    Args:
        input_ids, attention_mask: [B,S]. image_grid_thw: int [n_images, 3] in patches (rows in the
            order images appear, row-major over the batch), or None.
        system_spans, question_spans, generated_spans: per row, a list of half-open (start, end)
            token spans, or None.

    Raises:
        ValueError: when the image tokens do not match ``image_grid_thw`` (names the row) or a span
            is out of range.
    """
    ids = np.asarray(input_ids)
    b, s = ids.shape
    am = np.ones((b, s), np.int32) if attention_mask is None else np.asarray(attention_mask, np.int32)
    image_mask = (ids == image_token_id) & (am > 0)
    video_mask = (ids == video_token_id) & (am > 0)
    image_index = np.full((b, s), -1, np.int32)
    grid_pos = np.full((b, s, 3), -1, np.int32)
    grid_hw = np.full((b, s, 2), -1, np.int32)
    grids = np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw).reshape(-1, 3)
    m = spatial_merge_size
    img = 0
    for row in range(b):
        pos = np.flatnonzero(image_mask[row])
        k = 0
        while k < len(pos):
            if img >= len(grids):
                raise ValueError(f"input_ids row {row}: image tokens beyond the {len(grids)} images of image_grid_thw")
            t, h, w = (int(x) for x in grids[img])
            gh, gw = h // m, w // m
            n = t * gh * gw
            block = pos[k:k + n]
            if len(block) != n or (n and block[-1] - block[0] != n - 1):
                raise ValueError(f"input_ids row {row}: image {img} (grid {[t, h, w]}) needs {n} consecutive "
                                 f"image tokens at position {pos[k]}")
            tt, rr, cc = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
            image_index[row, block] = img
            grid_pos[row, block] = np.stack([tt.ravel(), rr.ravel(), cc.ravel()], -1)
            grid_hw[row, block] = (gh, gw)
            img += 1
            k += n
    if img != len(grids):
        raise ValueError(f"image_grid_thw has {len(grids)} images but input_ids hold image tokens for {img}")
    return TokenLayout(
        image_mask=image_mask, video_mask=video_mask, image_index=image_index, grid_pos=grid_pos,
        grid_hw=grid_hw, attention_mask=am,
        system_mask=_span_mask(system_spans, b, s, "system_spans") & (am > 0),
        question_mask=_span_mask(question_spans, b, s, "question_spans") & (am > 0),
        generated_mask=_span_mask(generated_spans, b, s, "generated_spans") & (am > 0),
        region_weight=np.zeros((b, s), np.float32))
