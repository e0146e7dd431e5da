"""Host side (numpy): HF LLaVA processor outputs -> the device :class:`~jaxmm.models.core.model.Batch`.

``LlavaProcessor`` (``transformers/models/llava/processing_llava.py``) gives ``input_ids`` with each
``<image>`` expanded to ``image_seq_length`` image tokens and ``pixel_values`` [n_images, 3, S, S].
Positions are 1-D (Llama RoPE): ``attention_mask.cumsum − 1`` on the real tokens, 0 on padding —
what ``GenerationMixin`` gives a left-padded batch, and ``arange(S)`` for an unpadded one — on all
three M-RoPE rows. Each image is described to the layout as a one-frame grid ``(1, g, g)`` of
``g = image_size // patch_size`` patches (merge size 1), so region and border methods see the
patch grid.
"""

from __future__ import annotations

import numpy as np

from jaxmm.models.core.inputs import as_array, text_position_ids, token_inputs
from jaxmm.models.core.model import Batch
from jaxmm.processing.layout import build_token_layout


def vision_inputs(image_grid_thw, cfg) -> None:
    """The CLIP tower needs no index arrays."""
    return None


def image_grid(n_images: int, cfg) -> np.ndarray:
    """int64 [n_images, 3]: the ``(1, g, g)`` patch grid of every image (``(1, 1, g²+1)`` with the
    "full" feature strategy, whose CLS token has no place in the grid)."""
    row = [1, cfg.grid, cfg.grid] if cfg.vision_feature_select_strategy == "default" else [1, 1, cfg.tokens_per_image]
    return np.tile(np.array([row], np.int64), (n_images, 1))


def prepare_batch(
    config,
    input_ids,
    attention_mask=None,
    pixel_values=None,
    image_grid_thw=None,
    position_ids=None,
    system_spans=None,
    question_spans=None,
) -> Batch:
    """Validates HF-style LLaVA inputs and builds a :class:`Batch`.

    Args:
        input_ids: int [B,S] (a 1-D sequence is taken as B=1); every image is ``tokens_per_image``
            consecutive ``image_token_id`` tokens.
        attention_mask: {0,1} [B,S]; default all ones. Left or right padding.
        pixel_values: float [n_images, C, S, S] (S = ``image_size``), images in row-major order.
        image_grid_thw: optional; when given it must be the ``(1, g, g)`` grid of each image.
        position_ids: optional int [B,S] (or [3,B,S] with equal rows) overriding the 1-D positions.
        system_spans, question_spans: optional per-row lists of half-open (start, end) spans.

    Raises:
        ValueError: naming the tensor whose shape, dtype or content is inconsistent.
    """
    vc = config.vision
    ids, am = token_inputs(config, input_ids, attention_mask)
    pv = as_array(pixel_values, "pixel_values")
    n_tok = int(((ids == config.image_token_id) & (am > 0)).sum())
    grid = None
    if pv is not None:
        want = (vc.in_channels, vc.image_size, vc.image_size)
        if pv.ndim != 4 or tuple(pv.shape[1:]) != want:
            raise ValueError(f"pixel_values: expected [n_images, {want[0]}, {want[1]}, {want[2]}], got {pv.shape}")
        grid = image_grid(pv.shape[0], vc)
        given = as_array(image_grid_thw, "image_grid_thw")
        if given is not None and (given.shape != grid.shape or (given != grid).any()):
            raise ValueError(
                f"image_grid_thw: {given.tolist()} does not describe {pv.shape[0]} images of "
                f"{vc.grid}x{vc.grid} patches (expected {grid.tolist()})"
            )
        if n_tok != pv.shape[0] * vc.tokens_per_image:
            raise ValueError(
                f"input_ids: {n_tok} image tokens (id {config.image_token_id}) but {pv.shape[0]} images "
                f"of {vc.tokens_per_image} tokens in pixel_values"
            )
        pv = pv.astype(np.float32)
    elif n_tok:
        raise ValueError(f"input_ids: {n_tok} image tokens but no pixel_values")
    position_ids = text_position_ids(am, position_ids, ids.shape)
    layout = build_token_layout(
        ids,
        am,
        grid,
        image_token_id=config.image_token_id,
        video_token_id=-1,
        spatial_merge_size=1,
        system_spans=system_spans,
        question_spans=question_spans,
    )
    return Batch(
        input_ids=ids.astype(np.int32),
        attention_mask=am.astype(np.int32),
        position_ids=np.ascontiguousarray(position_ids, np.int32),
        pixel_values=pv,
        vision=None,
        layout=layout,
    )
