"""Host side (numpy) of the vision towers: packed segments, patch positions, bucketing.

Mirrors transformers' ``vision_utils.get_vision_position_ids`` and ``get_vision_cu_seqlens``; the
families' ``inputs.py`` add what only their tower needs (Qwen2.5-VL's windows, a learned
position table's taps).
"""

from __future__ import annotations

import numpy as np

from jaxmm.models.core.vision import Segments, VisionInputs


def segments(lengths) -> Segments:
    """Contiguous segments of the given lengths packed into a padded batch [nS, max(lengths)]."""
    lengths = np.asarray(lengths, np.int64)
    width = int(lengths.max())
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    slot = np.arange(width)
    valid = slot[None, :] < lengths[:, None]
    index = np.where(valid, starts[:, None] + slot[None, :], 0)
    inverse = np.concatenate([i * width + np.arange(n) for i, n in enumerate(lengths)])
    return Segments(index.astype(np.int32), valid, inverse.astype(np.int32))


def patch_positions(image_grid_thw, merge: int) -> tuple[np.ndarray, list[int]]:
    """(row, col) [N,2] int32 of every patch in the processor's order (merge×merge blocks in raster
    order, each block's patches in raster order, repeated over frames), and the frame lengths."""
    pos, frame_lens = [], []
    for t, h, w in np.asarray(image_grid_thw).tolist():
        hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        blocks = (h // merge, merge, w // merge, merge)
        hp = hh.reshape(blocks).transpose(0, 2, 1, 3).reshape(-1)
        wp = ww.reshape(blocks).transpose(0, 2, 1, 3).reshape(-1)
        pos.append(np.tile(np.stack([hp, wp], -1), (t, 1)))
        frame_lens += [h * w] * t
    return np.concatenate(pos).astype(np.int32), frame_lens


def frame_inputs(image_grid_thw, cfg) -> VisionInputs:
    """:class:`VisionInputs` of a tower whose blocks all attend within each frame (no windows)."""
    pos, frame_lens = patch_positions(image_grid_thw, cfg.spatial_merge_size)
    return VisionInputs(rotary_pos=pos, frames=segments(frame_lens))


def _pad_segments(seg: Segments, n: int, n_b: int, width: int, rows: int) -> Segments:
    """``seg`` (over n positions) grown to ``rows`` segments of ``width`` slots over n_b positions:
    positions n … n_b−1 fill the new segments (each gets at least one; more segments when they do
    not fit), so no segment is empty and the real ones are unchanged."""
    index, valid = np.asarray(seg.index), np.asarray(seg.valid)
    n_seg, old_width = index.shape
    extra = n_b - n
    n_new = max(rows - n_seg, -(-extra // width))
    if extra < n_new:
        raise ValueError(f"vision padding: {extra} padding patches cannot fill {n_new} segments")
    sizes = np.full(n_new, extra // n_new)
    sizes[: extra % n_new] += 1
    lengths = np.concatenate([valid.sum(-1), sizes])
    slot = np.arange(width)
    idx = np.zeros((len(lengths), width), np.int64)
    starts = np.concatenate([[n], n + np.cumsum(sizes)[:-1]])
    idx[:n_seg, :old_width] = index
    idx[n_seg:] = np.where(slot[None] < sizes[:, None], starts[:, None] + slot[None], 0)
    val = slot[None] < lengths[:, None]
    flat = np.zeros(n_b, np.int64)
    rows_, cols = np.nonzero(val)
    flat[idx[rows_, cols]] = rows_ * width + cols
    return Segments(idx.astype(np.int32), val, flat.astype(np.int32))


def _widen_segments(seg: Segments, n: int, n_b: int, width: int) -> Segments:
    """``seg`` (over n positions) with ``width`` slots per segment over n_b positions: no segment is
    added; positions n … n_b−1 join none (they read back flat slot 0, a real one)."""
    index, valid = np.asarray(seg.index), np.asarray(seg.valid)
    grow = width - index.shape[1]
    index = np.pad(index, ((0, 0), (0, grow)))
    valid = np.pad(valid, ((0, 0), (0, grow)))
    rows, cols = np.nonzero(valid)
    inverse = np.zeros(n_b, np.int64)
    inverse[index[rows, cols]] = rows * width + cols
    return Segments(index.astype(np.int32), valid, inverse.astype(np.int32))


def pad_vision(
    pixel_values, vis: VisionInputs, cfg, multiple: int = 256, width: int = 64, rows: int = 8
) -> tuple[np.ndarray, VisionInputs]:
    """Pads the packed vision inputs of a batch to bucketed shapes, so that images of similar size
    share one compiled program (``generate``'s bucketing).

    The N patches grow to a multiple of ``multiple`` with zero patches, whose merged tokens come
    after the real ones in the tower's output, where :func:`~jaxmm.models.core.decoder.splice` never
    reads; no padding patch attends to or from a real patch. Segment tables grow to a multiple of
    ``width`` slots. Window tables (short segments) also grow to a power of two segments (at least
    ``rows``), the padding patches forming the new segments; frame tables (one segment per image
    frame, each as long as the frame: an extra row would cost a frame's full attention) keep their
    segments, and the padding patches take part in no frame attention. The real patches' values are
    unchanged — except in vision-tower probes, whose segment axis then holds the padding too.

    Returns ``(pixel_values [N_b, C·T·P·P], VisionInputs)``.
    """
    pv = np.asarray(pixel_values)
    unit = cfg.spatial_merge_size**2
    n = pv.shape[0]
    bk = lambda x, m: -(-x // m) * m
    tables = {name: getattr(vis, name) for name in ("frames", "windows") if getattr(vis, name) is not None}
    segs = {}
    need = 0
    for name, seg in tables.items():
        n_rows = seg.index.shape[0] if name == "frames" else max(rows, 1 << int(seg.index.shape[0]).bit_length())
        segs[name] = (n_rows, bk(seg.index.shape[1], width))
        need = max(need, n_rows - seg.index.shape[0])
    n_b = bk(n + need * unit, multiple)
    m, m_b = n // unit, n_b // unit
    pad = lambda x, fill=0: (
        None if x is None else np.concatenate([np.asarray(x), np.full((n_b - n,) + np.shape(x)[1:], fill, np.asarray(x).dtype)])
    )
    window_index = reverse_index = None
    if vis.window_index is not None:
        window_index = np.concatenate([np.asarray(vis.window_index), np.arange(m, m_b)]).astype(np.int32)
        reverse_index = np.argsort(window_index).astype(np.int32)
    padded = {
        name: _widen_segments(seg, n, n_b, segs[name][1])
        if name == "frames"
        else _pad_segments(seg, n, n_b, segs[name][1], segs[name][0])
        for name, seg in tables.items()
    }
    new = VisionInputs(
        rotary_pos=pad(vis.rotary_pos),
        frames=padded["frames"],
        window_index=window_index,
        reverse_index=reverse_index,
        windows=padded.get("windows"),
        interp_index=pad(vis.interp_index),
        interp_weight=pad(vis.interp_weight),
    )
    return pad(pv).astype(pv.dtype), new
