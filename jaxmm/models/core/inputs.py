"""Host side (numpy): HF-processor outputs -> the device :class:`~jaxmm.models.core.model.Batch`,
for every family.

Checks every tensor and names the one that is wrong; computes M-RoPE ``position_ids`` (HF
``get_rope_index``), the vision tower's index arrays (its ``host_inputs``) and the
:class:`TokenLayout`.
"""

from __future__ import annotations

import numpy as np

from jaxmm.models.core.model import Batch, model_class
from jaxmm.models.core.rope import get_rope_index
from jaxmm.processing.layout import build_token_layout


def as_array(x, name: str):
    """``x`` (numpy, torch or a nested list) as a numpy array, or None.

    Raises:
        TypeError: naming ``name`` when ``x`` cannot be read as an array.
    """
    if x is None:
        return None
    if hasattr(x, "detach"):  # a torch tensor from an HF processor called with return_tensors="pt"
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except Exception as e:  # noqa: BLE001
        raise TypeError(f"{name}: cannot be read as an array ({type(x).__name__})") from e


def text_position_ids(attention_mask, position_ids, shape: tuple[int, int]) -> np.ndarray:
    """1-D positions on the three M-RoPE rows [3,B,S] for decoders without M-RoPE (LLaVA's Llama):
    ``attention_mask.cumsum − 1`` on the real tokens (0 at padding), as transformers' generation
    builds them, or the given ``position_ids`` (:func:`mrope_position_ids`)."""
    if position_ids is not None:
        return mrope_position_ids(position_ids, shape)
    am = np.asarray(attention_mask)
    pos = np.where(am > 0, np.cumsum(am > 0, axis=-1) - 1, 0)
    return np.broadcast_to(pos[None], (3,) + pos.shape)


def mrope_position_ids(position_ids, shape: tuple[int, int]) -> np.ndarray:
    """Position ids as HF passes them -> the M-RoPE rows [3,B,S] (t, h, w).

    Accepts [3,B,S]; HF's [4,B,S] = [text; t; h; w] (transformers >= 5.x builds these in
    ``generate``: the text row only feeds its attention mask, so it is dropped and rows 1..3 kept);
    or [B,S] 1-D positions, used on all three axes. ``shape`` is input_ids' (B, S).

    Raises:
        ValueError: naming ``position_ids``, the accepted shapes and the shape given.
    """
    pos = as_array(position_ids, "position_ids")
    if pos.ndim == 2 and pos.shape == tuple(shape):
        pos = np.broadcast_to(pos[None], (3,) + pos.shape)
    elif pos.ndim == 3 and pos.shape[0] == 4 and pos.shape[1:] == tuple(shape):
        pos = pos[1:]
    if pos.shape != (3,) + tuple(shape):
        b, s = shape
        raise ValueError(
            f"position_ids: expected [3,B,S]=(3, {b}, {s}), HF's [4,B,S]=(4, {b}, {s}) "
            f"([text; t; h; w]) or [B,S]=({b}, {s}) for input_ids [B,S]=({b}, {s}), "
            f"got {pos.shape}"
        )
    if not np.issubdtype(pos.dtype, np.integer):
        raise ValueError(f"position_ids: expected an integer array, got {pos.dtype}")
    return pos


def token_inputs(config, input_ids, attention_mask=None) -> tuple[np.ndarray, np.ndarray]:
    """``input_ids`` as an int array [B,S] (a 1-D sequence is one row) with ids below the config's
    ``vocab_size``, and ``attention_mask`` [B,S] (all ones when None).

    Raises:
        ValueError: naming ``input_ids`` or ``attention_mask`` and what is wrong with it.
    """
    ids = as_array(input_ids, "input_ids")
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids: expected an int array [B,S], got {ids.dtype} {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= config.text.vocab_size):
        raise ValueError(
            f"input_ids: token ids must lie in [0, vocab_size={config.text.vocab_size}), found [{ids.min()}, {ids.max()}]"
        )
    am = as_array(attention_mask, "attention_mask")
    am = np.ones_like(ids) if am is None else (am[None] if am.ndim == 1 else am)
    if am.shape != ids.shape:
        raise ValueError(f"attention_mask: shape {am.shape} differs from input_ids {ids.shape}")
    return ids, am


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
    """Validates HF-style inputs and builds a :class:`Batch` for ``config``'s family.

    Args:
        input_ids: int [B,S] (a 1-D sequence is taken as B=1).
        attention_mask: {0,1} [B,S]; default all ones. Left or right padding.
        pixel_values: float [N, C·T·P·P] as the HF/jaxmm image processor returns them.
        image_grid_thw: int [n_images, 3] (t, h, w in patches), images in row-major order of the batch.
        position_ids: optional int positions to override the computed M-RoPE ones: [3,B,S] (t, h, w),
            HF's [4,B,S] ([text; t; h; w], the text row is dropped) or [B,S] (the same on all three
            axes); see :func:`mrope_position_ids`.
        system_spans, question_spans: optional per-row lists of half-open (start, end) spans,
            carried in the TokenLayout for attention methods.

    Raises:
        ValueError: naming the tensor whose shape, dtype or content is inconsistent.
    """
    ids, am = token_inputs(config, input_ids, attention_mask)
    pv, grid = as_array(pixel_values, "pixel_values"), as_array(image_grid_thw, "image_grid_thw")
    n_img_tokens = int(((ids == config.image_token_id) & (am > 0)).sum())
    vis = None
    if pv is not None or grid is not None:
        if pv is None or grid is None:
            raise ValueError("pixel_values and image_grid_thw must be given together")
        vc = config.vision
        patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
        if grid.ndim != 2 or grid.shape[1] != 3:
            raise ValueError(f"image_grid_thw: expected [n_images, 3], got {grid.shape}")
        if pv.ndim != 2 or pv.shape[1] != patch_dim:
            raise ValueError(f"pixel_values: expected [N, {patch_dim}] (C·T·P·P), got {pv.shape}")
        n_patches = int(grid.prod(-1).sum())
        if pv.shape[0] != n_patches:
            raise ValueError(f"pixel_values: {pv.shape[0]} patches, but image_grid_thw describes {n_patches}")
        m = vc.spatial_merge_size
        if (grid[:, 1] % m).any() or (grid[:, 2] % m).any():
            raise ValueError(f"image_grid_thw: h and w must be multiples of spatial_merge_size={m}, got {grid.tolist()}")
        expected = n_patches // (m * m)
        if n_img_tokens != expected:
            raise ValueError(
                f"input_ids: {n_img_tokens} image tokens (id {config.image_token_id}) but "
                f"image_grid_thw describes {expected} merged image tokens"
            )
        vis = model_class(config).VisionTower.host_inputs(grid, vc)
        pv = pv.astype(np.float32)
    elif n_img_tokens:
        raise ValueError(f"input_ids: {n_img_tokens} image tokens but no pixel_values")
    if position_ids is None:
        position_ids, _ = get_rope_index(
            ids,
            am,
            grid,
            image_token_id=config.image_token_id,
            video_token_id=config.video_token_id,
            spatial_merge_size=config.vision.spatial_merge_size,
            tokens_per_second=config.vision.tokens_per_second,
        )
    else:
        position_ids = mrope_position_ids(position_ids, ids.shape)
    layout = build_token_layout(
        ids,
        am,
        grid,
        image_token_id=config.image_token_id,
        video_token_id=config.video_token_id,
        spatial_merge_size=config.vision.spatial_merge_size,
        system_spans=system_spans,
        question_spans=question_spans,
    )
    return Batch(
        input_ids=ids.astype(np.int32),
        attention_mask=am.astype(np.int32),
        position_ids=np.asarray(position_ids, np.int32),
        pixel_values=pv,
        vision=vis,
        layout=layout,
    )
