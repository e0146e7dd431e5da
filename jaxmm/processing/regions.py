"""Boxes -> merged image-token indices (methods.md primitive 6, after SAYO's released code).

A box ``(x0, y0, x1, y1)`` in original-image pixels is scaled to the resized image the processor
fed the vision tower (``grid_h·patch_size`` × ``grid_w·patch_size`` pixels), then each corner maps to
a merged cell of ``cell = patch_size · spatial_merge_size`` pixels (28 for Qwen2-VL-family models):
``col = floor(x / cell)``, ``row = floor(y / cell)``. The region is every merged token with row in
``[row(y0), row(y1)]`` and col in ``[col(x0), col(x1)]`` (inclusive, clamped to the grid); its
raster index is ``row · cols + col`` with ``cols = grid_w / spatial_merge_size``.
"""

from __future__ import annotations

import numpy as np


def box_to_token_indices(
    box, image_size: tuple[int, int], grid_thw, patch_size: int = 14, spatial_merge_size: int = 2
) -> np.ndarray:
    """Merged-token raster indices (int64, ascending) of the cells a box covers.

    Args:
        box: (x0, y0, x1, y1) in original-image pixels, x right, y down.
        image_size: (height, width) of the original image in pixels.
        grid_thw: (t, h, w) of the image in patches (a row of ``image_grid_thw``).

    Raises:
        ValueError: a box with x1 < x0 or y1 < y0, or one entirely outside the image.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    if x1 < x0 or y1 < y0:
        raise ValueError(f"box {tuple(box)}: expected (x0, y0, x1, y1) with x0 <= x1 and y0 <= y1")
    h0, w0 = image_size
    if x1 < 0 or y1 < 0 or x0 > w0 or y0 > h0:
        raise ValueError(f"box {tuple(box)} lies outside the {w0}x{h0} image")
    _, gh, gw = (int(v) for v in grid_thw)
    sx, sy = gw * patch_size / w0, gh * patch_size / h0
    cell = patch_size * spatial_merge_size
    rows, cols = gh // spatial_merge_size, gw // spatial_merge_size
    c0, c1 = (int(np.clip(np.floor(x * sx / cell), 0, cols - 1)) for x in (x0, x1))
    r0, r1 = (int(np.clip(np.floor(y * sy / cell), 0, rows - 1)) for y in (y0, y1))
    rr, cc = np.meshgrid(np.arange(r0, r1 + 1), np.arange(c0, c1 + 1), indexing="ij")
    return np.sort((rr * cols + cc).reshape(-1)).astype(np.int64)


def region_weights(
    image_index: np.ndarray,
    grid_pos: np.ndarray,
    grid_hw: np.ndarray,
    boxes_per_image: dict[int, list],
    image_sizes: dict[int, tuple[int, int]],
    image_grid_thw: np.ndarray,
    patch_size: int = 14,
    spatial_merge_size: int = 2,
) -> np.ndarray:
    """A [B,S] float32 region mask (1 inside any box of the token's image, else 0) for a
    TokenLayout, from boxes given per image index (``image_grid_thw`` row).

    ``image_index``, ``grid_pos`` [B,S,3] and ``grid_hw`` [B,S,2] are the TokenLayout fields.
    """
    out = np.zeros(image_index.shape, np.float32)
    for img, boxes in boxes_per_image.items():
        if img >= len(image_grid_thw):
            raise ValueError(f"boxes given for image {img}, but only {len(image_grid_thw)} images")
        inside = set()
        for box in boxes:
            inside.update(
                box_to_token_indices(box, image_sizes[img], image_grid_thw[img], patch_size, spatial_merge_size).tolist()
            )
        sel = image_index == img
        raster = grid_pos[..., 1] * grid_hw[..., 1] + grid_pos[..., 2]
        out[sel & np.isin(raster, sorted(inside))] = 1.0
    return out
