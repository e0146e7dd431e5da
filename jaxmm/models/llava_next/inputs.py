"""Host side (numpy): HF LLaVA-NeXT processor outputs -> the device :class:`~jaxmm.models.core.model.Batch`.

``LlavaNextProcessor`` (``transformers/models/llava_next/processing_llava_next.py``) gives
``input_ids`` with each ``<image>`` expanded to the image's tokens, ``pixel_values``
[n_images, max_tiles, 3, S, S] (zero tiles pad images with fewer) and ``image_sizes`` [n_images, 2]
(original height, width). jaxmm's :class:`~jaxmm.processing.anyres_image.AnyResImageProcessor`
gives the tiles concatenated, [Σ tiles, 3, S, S], and ``image_grid_thw`` rows
``(tiles, height, width)``; either form is read.

An image of ``height × width`` pixels has ``tiles = 1 + th·tw`` tiles (the base image, then the
``th × tw`` grid at the best of ``image_grid_pinpoints``) and ``g² + rows·(cols + 1)`` LLM tokens
(``g = image_size / patch_size``): the base image's ``g × g`` patches, then the unpadded
``rows × cols`` part of the tiles' ``th·g × tw·g`` patch grid, row by row, each row followed by
``image_newline`` (``LlavaNextModel.pack_image_features``). The tower computes every tile's
features; :func:`pack_index` says, for each image token, which feature (or the newline) it is, so
the packing is one gather on the device.

Positions are 1-D (Llama RoPE), as LLaVA-1.5's: ``attention_mask.cumsum − 1`` on the real tokens.
The layout marks every image token, newlines included, as an image token (``image_mask``); its
``grid_pos`` is ``(0, row, col)`` in the base image's ``g × g`` grid and ``(1, row, col)`` in the
``rows × (cols + 1)`` grid of the tiles (column ``cols`` is the newline), with ``grid_hw`` the grid's size.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from jaxmm.models.core.inputs import as_array, text_position_ids, token_inputs
from jaxmm.models.core.model import Batch
from jaxmm.processing.anyres_image import anyres_tokens, select_best_resolution, unpadded_extent
from jaxmm.processing.layout import build_token_layout


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackIndex:
    """What LLaVA-NeXT's tower reads besides the pixels: ``index`` int32 [M], for each image token
    (all images in order) the row of the tower's table ``[tile features (T·g² rows, tile-major);
    image_newline]`` it takes (``T·g²`` = the newline)."""

    index: Any


def image_sizes_of(image_grid_thw) -> np.ndarray:
    """int64 [n, 2] (height, width) from jaxmm's ``image_grid_thw`` rows ``(tiles, height, width)``."""
    return np.asarray(image_grid_thw, np.int64)[:, 1:]


def tiles_and_tokens(h: int, w: int, cfg) -> tuple[int, int, int]:
    """``(tiles with the base image, rows, cols)`` of an ``h × w`` image (see the module doc)."""
    n, rows, cols = anyres_tokens(h, w, cfg.image_grid_pinpoints, cfg.image_size, cfg.grid)
    return 1 + n, rows, cols


def pack_index(image_sizes, cfg) -> np.ndarray:
    """int32 [M]: ``pack_image_features`` as a gather (see :class:`PackIndex`), for images of
    ``image_sizes`` [n, 2] (height, width) whose tiles are concatenated in order."""
    g = cfg.grid
    out, start = [], 0
    newline = sum(tiles_and_tokens(int(h), int(w), cfg)[0] for h, w in image_sizes) * g * g
    for h, w in image_sizes:
        h, w = int(h), int(w)
        bh, bw = select_best_resolution((h, w), cfg.image_grid_pinpoints)
        th, tw = -(-bh // cfg.image_size), -(-bw // cfg.image_size)
        r0, r1, c0, c1 = unpadded_extent(h, w, th * g, tw * g)
        out.append(start + np.arange(g * g))  # base image
        y, x = np.meshgrid(np.arange(r0, r1), np.arange(c0, c1), indexing="ij")
        tile = 1 + (y // g) * tw + x // g  # tile of patch (y, x)
        feat = start + tile * g * g + (y % g) * g + x % g
        out.append(np.concatenate([feat, np.full((r1 - r0, 1), newline)], axis=1).reshape(-1))
        start += (1 + th * tw) * g * g
    return np.concatenate(out).astype(np.int32) if out else np.zeros((0,), np.int32)


def vision_inputs(image_grid_thw, cfg) -> PackIndex:
    """The tower's :class:`PackIndex` from ``image_grid_thw`` rows ``(tiles, height, width)``."""
    return PackIndex(index=pack_index(image_sizes_of(image_grid_thw), cfg))


def _grid_positions(n_tok: int, rows: int, cols: int, g: int) -> tuple[np.ndarray, np.ndarray]:
    """grid_pos [n_tok, 3] and grid_hw [n_tok, 2] of one image's tokens (see the module doc)."""
    r, c = np.divmod(np.arange(g * g), g)
    rr, cc = np.divmod(np.arange(rows * (cols + 1)), cols + 1)
    pos = np.concatenate([np.stack([np.zeros_like(r), r, c], -1), np.stack([np.ones_like(rr), rr, cc], -1)])
    hw = np.concatenate([np.tile([g, g], (g * g, 1)), np.tile([rows, cols + 1], (rows * (cols + 1), 1))])
    assert len(pos) == n_tok
    return pos, hw


def prepare_batch(
    config,
    input_ids,
    attention_mask=None,
    pixel_values=None,
    image_grid_thw=None,
    position_ids=None,
    system_spans=None,
    question_spans=None,
    image_sizes=None,
) -> Batch:
    """Validates HF-style LLaVA-NeXT inputs and builds a :class:`Batch`.

    Args:
        input_ids: int [B,S] (a 1-D sequence is taken as B=1); every image is its run of
            ``image_token_id`` tokens (``g² + rows·(cols + 1)``, see the module doc).
        attention_mask: {0,1} [B,S]; default all ones. Left or right padding.
        pixel_values: float [n_images, max_tiles, C, S, S] (HF's, zero-padded tiles) or
            [Σ tiles, C, S, S] (concatenated), S = ``image_size``, images in row-major order.
        image_grid_thw: int [n_images, 3] rows ``(tiles, height, width)`` (jaxmm's processor), or
            give ``image_sizes``.
        image_sizes: int [n_images, 2] (height, width) of the original images (HF's processor).
        position_ids: optional int [B,S] (or [3,B,S] with equal rows) overriding the 1-D positions.
        system_spans, question_spans: optional per-row lists of half-open (start, end) spans.

    Raises:
        ValueError: naming the tensor whose shape, dtype or content is inconsistent: pixel_values
            without image sizes, tile counts that differ from what the sizes and
            ``image_grid_pinpoints`` give, image-token runs of the wrong length.
    """
    vc = config.vision
    ids, am = token_inputs(config, input_ids, attention_mask)
    pv = as_array(pixel_values, "pixel_values")
    grid_thw = as_array(image_grid_thw, "image_grid_thw")
    sizes = as_array(image_sizes, "image_sizes")
    n_tok = int(((ids == config.image_token_id) & (am > 0)).sum())
    vis, layout_grid, counts = None, None, []
    if pv is not None:
        if sizes is None and grid_thw is None:
            raise ValueError(
                "pixel_values given without image_sizes [n_images, 2] (height, width) or "
                "image_grid_thw [n_images, 3] (tiles, height, width): LLaVA-NeXT needs each image's size"
            )
        if grid_thw is not None and (grid_thw.ndim != 2 or grid_thw.shape[1] != 3):
            raise ValueError(f"image_grid_thw: expected [n_images, 3] rows (tiles, height, width), got {grid_thw.shape}")
        if sizes is not None and (sizes.ndim != 2 or sizes.shape[1] != 2):
            raise ValueError(f"image_sizes: expected [n_images, 2] rows (height, width), got {sizes.shape}")
        if sizes is None:
            sizes = image_sizes_of(grid_thw)
        elif grid_thw is not None and not np.array_equal(image_sizes_of(grid_thw), sizes):
            raise ValueError(f"image_sizes {sizes.tolist()} differ from the sizes in image_grid_thw {grid_thw.tolist()}")
        if (sizes <= 0).any():
            raise ValueError(f"image_sizes: sizes must be positive, got {sizes.tolist()}")
        layout = [tiles_and_tokens(int(h), int(w), vc) for h, w in sizes]
        tiles = [t for t, _, _ in layout]
        if grid_thw is not None and grid_thw[:, 0].tolist() != tiles:
            raise ValueError(
                f"image_grid_thw: tile counts {grid_thw[:, 0].tolist()}, but the image sizes and "
                f"image_grid_pinpoints give {tiles}"
            )
        want = (vc.in_channels, vc.image_size, vc.image_size)
        if pv.ndim == 5 and tuple(pv.shape[2:]) == want:
            if pv.shape[0] != len(sizes):
                raise ValueError(f"pixel_values: {pv.shape[0]} images but {len(sizes)} image sizes")
            if max(tiles) > pv.shape[1]:
                raise ValueError(f"pixel_values: {pv.shape[1]} tiles per image, but the image sizes give {tiles}")
            pv = np.concatenate([pv[i, :t] for i, t in enumerate(tiles)])
        elif pv.ndim == 4 and tuple(pv.shape[1:]) == want:
            if pv.shape[0] != sum(tiles):
                raise ValueError(f"pixel_values: {pv.shape[0]} tiles, but the image sizes give {tiles} (= {sum(tiles)}) tiles")
        else:
            raise ValueError(
                f"pixel_values: expected [n_images, tiles, {want[0]}, {want[1]}, {want[2]}] or "
                f"[total tiles, {want[0]}, {want[1]}, {want[2]}], got {pv.shape}"
            )
        g = vc.grid
        counts = [g * g + rows * (cols + 1) for _, rows, cols in layout]
        if n_tok != sum(counts):
            raise ValueError(
                f"input_ids: {n_tok} image tokens (id {config.image_token_id}) but the {len(sizes)} "
                f"images need {counts} (= {sum(counts)}) tokens for their sizes {sizes.tolist()}"
            )
        pv = pv.astype(np.float32)
        vis = PackIndex(index=pack_index(sizes, vc))
        layout_grid = np.array([[1, 1, n] for n in counts], np.int64)
    elif n_tok:
        raise ValueError(f"input_ids: {n_tok} image tokens but no pixel_values")
    position_ids = text_position_ids(am, position_ids, ids.shape)
    try:
        lay = build_token_layout(
            ids,
            am,
            layout_grid,
            image_token_id=config.image_token_id,
            video_token_id=-1,
            spatial_merge_size=1,
            system_spans=system_spans,
            question_spans=question_spans,
        )
    except ValueError as e:
        if pv is None:
            raise
        raise ValueError(
            f"input_ids: the runs of image tokens do not match the images, which need {counts} tokens "
            f"each (for their sizes and image_grid_pinpoints): {e}"
        ) from None
    if pv is not None:
        index = np.asarray(lay.image_index)
        grid_pos, grid_hw = np.array(lay.grid_pos), np.array(lay.grid_hw)
        for k, (_, rows, cols) in enumerate(layout):
            where = np.nonzero(index == k)
            grid_pos[where], grid_hw[where] = _grid_positions(counts[k], rows, cols, vc.grid)
        lay = dataclasses.replace(lay, grid_pos=grid_pos, grid_hw=grid_hw)
    return Batch(
        input_ids=ids.astype(np.int32),
        attention_mask=am.astype(np.int32),
        position_ids=np.ascontiguousarray(position_ids, np.int32),
        pixel_values=pv,
        vision=vis,
        layout=lay,
    )


def region_weights(
    image_index,
    grid_pos,
    grid_hw,
    boxes_per_image: dict,
    image_sizes: dict,
    image_grid_thw=None,
    patch_size: int = 14,
    spatial_merge_size: int = 1,
) -> np.ndarray:
    """A [B,S] float32 region mask for a LLaVA-NeXT layout (the signature of
    :func:`jaxmm.processing.regions.region_weights`; ``image_grid_thw``, ``patch_size`` and
    ``spatial_merge_size`` are not needed).

    A box ``(x0, y0, x1, y1)`` in original-image pixels covers, in each grid of its image — the base
    image's ``g × g`` (the whole image resized) and the tiles' unpadded ``rows × cols`` (the whole
    image up to ``unpad_image``'s rounding) — the cells with row in ``[⌊y0·rows/H⌋, ⌊y1·rows/H⌋]``
    and col in ``[⌊x0·cols/W⌋, ⌊x1·cols/W⌋]`` (clamped); ``image_newline`` tokens are never inside.

    Raises:
        ValueError: a box with x1 < x0 or y1 < y0, one outside its image, or boxes for an image the
            layout does not hold.
    """
    image_index, grid_pos, grid_hw = np.asarray(image_index), np.asarray(grid_pos), np.asarray(grid_hw)
    out = np.zeros(image_index.shape, np.float32)
    for img, boxes in boxes_per_image.items():
        sel = image_index == img
        if not sel.any():
            raise ValueError(f"boxes given for image {img}, but the layout has {int(image_index.max()) + 1} images")
        h0, w0 = image_sizes[img]
        t, r, c = grid_pos[sel].T
        rows, cols = grid_hw[sel, 0], grid_hw[sel, 1] - (t == 1)  # the tiles' grid: minus the newline
        inside = np.zeros(len(t), bool)
        for box in boxes:
            x0, y0, x1, y1 = (float(v) for v in box)
            if x1 < x0 or y1 < y0:
                raise ValueError(f"box {tuple(box)}: expected (x0, y0, x1, y1) with x0 <= x1 and y0 <= y1")
            if x1 < 0 or y1 < 0 or x0 > w0 or y0 > h0:
                raise ValueError(f"box {tuple(box)} lies outside the {w0}x{h0} image")
            cell = lambda v, n, size: np.clip(np.floor(v * n / size), 0, n - 1)
            inside |= (
                (r >= cell(y0, rows, h0)) & (r <= cell(y1, rows, h0)) & (c >= cell(x0, cols, w0)) & (c <= cell(x1, cols, w0))
            )
        out[sel] = inside
    return out
