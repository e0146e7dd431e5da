"""M-RoPE position ids on the host (numpy), identical to transformers' Qwen-VL families (5.x).

Every family computes them the same way (its config gives ``tokens_per_second``). Mirrors, in
``transformers/models/qwen2_5_vl/modeling_qwen2_5_vl.py``:

* ``Qwen2_5_VLModel.get_rope_index`` (:func:`get_rope_index`), called with ``mm_token_type_ids``
  (1 at image pad tokens, 2 at video pad tokens, 0 elsewhere: :func:`mm_token_type_ids`);
* ``Qwen2_5_VLModel.get_vision_position_ids`` (:func:`vision_position_ids`);
* the decoding positions of ``Qwen2_5_VLModel.compute_3d_position_ids`` and
  ``Qwen2_5_VLForConditionalGeneration._prepare_position_ids_for_generation``
  (:func:`decode_position_ids`), and those ``GenerationMixin.generate`` carries from step to step
  (:func:`generate_position_ids`).

The rule, per row, after dropping padding: split the tokens into runs of equal modality. A text run
of n tokens gets ``cur .. cur+n-1`` on all three axes (t, h, w) and ``cur += n``. An image/video run
with grid (t, h, w) (in patches; merged grid t × h/m × w/m) gets, for the merged token (i, r, c) in
raster order, ``(cur + floor(i·interval), cur + r, cur + c)``, then ``cur += max(h, w)/m``;
``interval`` is 1 for images and ``tokens_per_second · second_per_grid_ts[v]`` for video v.
Padding positions are 0, and ``rope_deltas = max(positions of the row) + 1 − (non-padding tokens)``.
"""

from __future__ import annotations

import numpy as np

from jaxmm.processing.layout import IMAGE, TEXT, VIDEO, as_numpy, vision_groups


def mm_token_type_ids(input_ids, image_token_id: int, video_token_id: int) -> np.ndarray:
    """int32 [B,S]: 1 at image pad tokens, 2 at video pad tokens, 0 elsewhere (padding included).

    What the HF Qwen2.5-VL processor returns as ``mm_token_type_ids``.
    """
    ids = np.asarray(as_numpy(input_ids, "input_ids"))
    return ((ids == image_token_id) * IMAGE + (ids == video_token_id) * VIDEO).astype(np.int32)


# --------------------------------------------------------------------------- temporal interval
def _seconds(second_per_grid_ts, n_videos: int):
    """(values, from_array): the entries HF iterates over, and whether they come from a tensor."""
    if second_per_grid_ts is None:
        return None, False
    from_array = not isinstance(second_per_grid_ts, (list, tuple))
    secs = as_numpy(second_per_grid_ts, "second_per_grid_ts")
    if secs.ndim != 1:
        raise ValueError(f"second_per_grid_ts: expected a 1-D array [n_videos], got shape {secs.shape}")
    if from_array and not (np.issubdtype(secs.dtype, np.floating) or np.issubdtype(secs.dtype, np.integer)):
        raise ValueError(f"second_per_grid_ts: expected a numeric array, got {secs.dtype}")
    if n_videos and len(secs) != n_videos:
        raise ValueError(f"second_per_grid_ts: {len(secs)} entries for {n_videos} videos in video_grid_thw")
    return (secs if from_array else list(second_per_grid_ts)), from_array


def _temporal_positions(t: int, tokens_per_second, sec, from_array: bool) -> np.ndarray:
    """``(torch.arange(t) * time_interval).long()`` with torch's type promotion, in numpy.

    HF computes ``time_interval = tokens_per_second * second_per_grid_ts[v]``. For an entry of a
    float tensor of dtype f (the processor returns float32) torch multiplies in f; for a Python
    number (a list, or the default 1) the product is a Python number and ``arange · number`` runs in
    float32 (torch's default dtype) when it is a float, in int64 when it is an int. Truncation toward
    zero (``.long()``) can then differ between float32 and float64 (e.g. 2·1.05·30 -> 62 vs 63).
    """
    ar = np.arange(t)
    if from_array:
        sec = np.asarray(sec)
        if np.issubdtype(sec.dtype, np.floating):
            f = sec.dtype.type
            return (ar.astype(f) * (f(tokens_per_second) * sec)).astype(np.int64)
        if isinstance(tokens_per_second, (int, np.integer)):
            return ar * (int(tokens_per_second) * int(sec))
        f = np.float32
        return (ar.astype(f) * (f(tokens_per_second) * f(sec))).astype(np.int64)
    interval = tokens_per_second * sec  # Python arithmetic (double precision or int)
    if isinstance(interval, (int, np.integer)) and not isinstance(interval, bool):
        return ar * int(interval)
    return (ar.astype(np.float32) * np.float32(interval)).astype(np.int64)


def vision_position_ids(start_position: int, grid_thw, spatial_merge_size: int, temporal: np.ndarray | None = None) -> np.ndarray:
    """int64 [3, t·h/m·w/m]: M-RoPE positions of one image/video's merged tokens in raster order.

    Mirrors ``Qwen2_5_VLModel.get_vision_position_ids(start, grid_thw, 1, m, time_interval)``:
    axis 0 ``start + temporal[i]`` (``temporal`` defaults to ``arange(t)``, i.e. interval 1),
    axis 1 ``start + row``, axis 2 ``start + col``.
    """
    t, h, w = (int(v) for v in grid_thw)
    m = int(spatial_merge_size)
    tt = np.arange(t, dtype=np.int64) if temporal is None else np.asarray(temporal, np.int64)
    T, H, W = np.meshgrid(tt, np.arange(h // m), np.arange(w // m), indexing="ij")
    return np.stack([T, H, W]).reshape(3, -1).astype(np.int64) + int(start_position)


# --------------------------------------------------------------------------- prefill
def get_rope_index(
    input_ids,
    attention_mask=None,
    image_grid_thw=None,
    video_grid_thw=None,
    second_per_grid_ts=None,
    *,
    image_token_id: int,
    video_token_id: int,
    spatial_merge_size: int,
    tokens_per_second,
) -> tuple[np.ndarray, np.ndarray]:
    """M-RoPE positions of a batch, as ``Qwen2_5_VLModel.get_rope_index`` computes them.

    Identical (values and dtype) to HF called with ``mm_token_type_ids`` from
    :func:`mm_token_type_ids` and the same tensors (torch tensors are accepted too).

    Args:
        input_ids: int [B,S].
        attention_mask: {0,1} [B,S], left or right padding; None = no padding.
        image_grid_thw: int [n_images, 3] (t, h, w) in patches, consumed in order of appearance
            row-major over the batch; None when there are no images.
        video_grid_thw: int [n_videos, 3], the same for videos; None when there are none.
        second_per_grid_ts: float [n_videos] seconds per temporal grid step (None = 1 each). The
            dtype matters as in torch: a float32 array (what the processor returns) multiplies in
            float32, a float64 array in float64, a Python list in float32.
        image_token_id, video_token_id: pad-token ids of image / video tokens.
        spatial_merge_size: ``vision_config.spatial_merge_size``.
        tokens_per_second: ``vision_config.tokens_per_second``.

    Returns:
        position_ids: int64 [3,B,S] (t, h, w axes); 0 at padding. Text-only rows get
            ``0..n−1`` on their non-padding tokens.
        rope_deltas: int64 [B,1], ``max(position_ids of the row) + 1 − n_row`` with ``n_row`` the
            row's non-padding tokens (0 for text-only rows).

    Raises:
        ValueError: naming the tensor, when a shape is wrong, a row holds more image/video groups
            than the grids have rows, a group's token count differs from its grid's
            ``t·h·w/merge²``, a grid is left unused, or ``second_per_grid_ts`` has the wrong length.

    Differences from HF, all on inputs HF cannot handle: HF raises on an all-padding row (here:
    zeros and delta 0), and silently ignores unused grid rows (here: ValueError).
    """
    m = int(spatial_merge_size)
    ids, am, rows = vision_groups(
        input_ids,
        attention_mask,
        image_grid_thw,
        video_grid_thw,
        image_token_id=image_token_id,
        video_token_id=video_token_id,
        spatial_merge_size=m,
    )
    grids = {
        IMAGE: None if image_grid_thw is None else np.asarray(as_numpy(image_grid_thw, "image_grid_thw")),
        VIDEO: None if video_grid_thw is None else np.asarray(as_numpy(video_grid_thw, "video_grid_thw")),
    }
    n_videos = 0 if grids[VIDEO] is None else len(grids[VIDEO])
    secs, from_array = _seconds(second_per_grid_ts, n_videos)
    b, s = ids.shape
    position_ids = np.zeros((3, b, s), np.int64)
    deltas = np.zeros((b, 1), np.int64)
    for row, runs in enumerate(rows):
        parts, cur = [], 0
        for kind, cols, k in runs:
            if kind == TEXT:
                parts.append(np.broadcast_to(np.arange(len(cols), dtype=np.int64) + cur, (3, len(cols))))
                cur += len(cols)
                continue
            t, h, w = (int(v) for v in grids[kind][k])
            temporal = None
            if kind == VIDEO:
                temporal = _temporal_positions(
                    t, tokens_per_second, 1 if secs is None else secs[k], from_array and secs is not None
                )
            parts.append(vision_position_ids(cur, (t, h, w), m, temporal))
            cur += max(h, w) // m
        if not parts:  # an all-padding row (HF raises here)
            continue
        pos = np.concatenate(parts, axis=1)
        keep = am[row] > 0
        position_ids[:, row, keep] = pos
        deltas[row, 0] = pos.max() + 1 - int(keep.sum())
    return position_ids, deltas


def get_rope_index_for_config(
    config, input_ids, attention_mask=None, image_grid_thw=None, video_grid_thw=None, second_per_grid_ts=None
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`get_rope_index` with the token ids, ``spatial_merge_size`` and ``tokens_per_second``
    read from a model config (:class:`~jaxmm.models.core.config.VLConfig`)."""
    return get_rope_index(
        input_ids,
        attention_mask,
        image_grid_thw,
        video_grid_thw,
        second_per_grid_ts,
        image_token_id=config.image_token_id,
        video_token_id=config.video_token_id,
        spatial_merge_size=config.vision.spatial_merge_size,
        tokens_per_second=config.vision.tokens_per_second,
    )


# --------------------------------------------------------------------------- decoding
def decode_position_ids(rope_deltas, cache_position_or_lengths, n_new: int = 1) -> np.ndarray:
    """M-RoPE positions of ``n_new`` tokens appended after a cached prefix, from ``rope_deltas``.

    HF (``compute_3d_position_ids`` when ``past_key_values`` is non-empty and ``rope_deltas`` is
    cached; ``_prepare_position_ids_for_generation`` when continuing from a cache) gives a new token
    its 1-D text position plus the row's ``rope_deltas``, the same on all three axes::

        position[:, b, i] = text_position(b, i) + rope_deltas[b]

    The text position is either

    * the cache position (``past_key_values.get_seq_length() + i``, padding included): HF's path
      without ``attention_mask``. Pass a scalar ``cache_position_or_lengths``; right only for
      unpadded batches; or
    * ``attention_mask.cumsum(-1) − 1`` at the new columns = the number of non-padding tokens
      before it: HF's path with ``attention_mask``. Pass an int [B] of per-row non-padding token
      counts so far (``attention_mask[:, :past].sum(-1)``).

    With a left-padded prompt of ``n_b`` real tokens, the i-th generated token therefore sits at
    ``max(prompt positions of row b) + 1 + i`` on every axis.

    (HF's own ``compute_3d_position_ids`` with an ``attention_mask`` returns positions for all
    ``past + n_new`` columns, not the last ``n_new``, and the forward fails; this gives the last
    ``n_new`` columns, the intended values. ``generate()`` itself uses
    :func:`generate_position_ids`, which agrees with this unless the prompt ends with vision tokens
    or a video's temporal positions exceed the text positions after it.)

    Args:
        rope_deltas: int [B,1] or [B], from :func:`get_rope_index`.
        cache_position_or_lengths: int scalar (cache position of the first new token, same for all
            rows) or int [B] (per-row text position of the first new token).
        n_new: how many consecutive new tokens.

    Returns:
        int64 [3,B,n_new].
    """
    d = np.asarray(as_numpy(rope_deltas, "rope_deltas"), np.int64)
    if d.ndim == 2 and d.shape[1] == 1:
        d = d[:, 0]
    if d.ndim != 1:
        raise ValueError(f"rope_deltas: expected [B,1] or [B], got shape {d.shape}")
    start = np.asarray(as_numpy(cache_position_or_lengths, "cache_position_or_lengths"), np.int64)
    if start.ndim == 0:
        start = np.broadcast_to(start, d.shape)
    if start.shape != d.shape:
        raise ValueError(f"cache_position_or_lengths: expected a scalar or [B]={d.shape}, got shape {start.shape}")
    text = start[:, None] + np.arange(int(n_new), dtype=np.int64)[None, :]
    return np.broadcast_to((text + d[:, None])[None], (3,) + text.shape).copy()


def generate_position_ids(prompt_position_ids, n_new: int = 1) -> np.ndarray:
    """M-RoPE positions ``GenerationMixin.generate`` gives the first ``n_new`` generated tokens.

    ``generate()`` computes the prompt's positions once (``_prepare_position_ids_for_generation``
    -> ``get_rope_index``) and then, in ``_update_model_kwargs_for_generation``, appends
    ``position_ids[..., -1:] + 1 + i`` per axis: the LAST COLUMN of the prompt plus one. For a
    left-padded prompt ending in text this equals :func:`decode_position_ids`; it differs when the
    prompt ends with vision tokens (axes then differ) or when a video's temporal positions reach
    past the text after it (``rope_deltas`` counts from the max), and it is meaningless for
    right-padded prompts (the last column is padding, position 0), as in HF.

    Args:
        prompt_position_ids: int [3,B,S] from :func:`get_rope_index`.
        n_new: number of generated tokens.

    Returns:
        int64 [3,B,n_new].
    """
    p = np.asarray(as_numpy(prompt_position_ids, "prompt_position_ids"), np.int64)
    if p.ndim != 3 or p.shape[0] != 3:
        raise ValueError(f"prompt_position_ids: expected [3,B,S], got shape {p.shape}")
    return p[..., -1:] + 1 + np.arange(int(n_new), dtype=np.int64)
