"""TokenLayout: what each position of a token sequence is, for attention-level methods.

Computed once on the host (numpy) from ``input_ids``, ``attention_mask`` and ``image_grid_thw`` and
carried through the forward (and the KV cache) as a pytree of arrays, so attention interventions and
probes can ask "which keys are image tokens, system tokens, the question, generated tokens, inside a
box?" and "where does this image token sit in its merged grid?".

How image tokens map to images (the rule of transformers' ``Qwen2_5_VLModel.get_rope_index``, which
:mod:`jaxmm.models.core.rope` shares through :func:`vision_groups`): drop the padding of a row
(``attention_mask == 0``), split what is left into maximal runs of equal modality (text / image pad
token / video pad token); every image run is one image, every video run one video. Images are
numbered in order of appearance, row-major over the batch, and that number is the row of
``image_grid_thw`` describing it (the order the HF processor emits ``image_grid_thw`` and
``pixel_values``, and the order ``masked_scatter`` writes image features into the sequence).

Within an image, the k-th image token is the k-th merged token the vision tower emits: the tower
permutes merge units into windows for its attention and undoes that permutation (``argsort(
window_index)``) after the merger, so its output is in raster order of the MERGED grid, row-major over
``(t, h/merge, w/merge)``. :data:`TokenLayout.grid_pos` is therefore that raster coordinate.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np

TEXT, IMAGE, VIDEO = 0, 1, 2
_KIND = {IMAGE: "image", VIDEO: "video"}
_GRID_NAME = {IMAGE: "image_grid_thw", VIDEO: "video_grid_thw"}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """Per-position description of a batch of B sequences of S positions (numpy arrays on the host;
    every field is a pytree leaf, so a layout passes through ``jax.jit`` and lands on device).

    Fields:
        image_mask: bool [B,S]. Image pad tokens (``image_token_id``) that are not padding.
        video_mask: bool [B,S]. Video pad tokens (``video_token_id``) that are not padding.
        image_index: int32 [B,S]. Row of ``image_grid_thw`` of the image the token belongs to
            (images numbered row-major over the batch); −1 at every non-image position.
        grid_pos: int32 [B,S,3]. ``(t, row, col)`` of an image token in its image's MERGED grid of
            ``grid_t × grid_h/merge × grid_w/merge`` cells; the k-th image token of an image is the
            k-th merged token of the vision tower's output, i.e. raster order (row-major over
            t, row, col). −1 at every non-image position.
        grid_hw: int32 [B,S,2]. ``(grid_h/merge, grid_w/merge)``: merged rows and columns of the
            token's image; −1 at every non-image position. Raster index within a frame is
            ``grid_pos[...,1] * grid_hw[...,1] + grid_pos[...,2]``.
        attention_mask: int32 [B,S]. 1 = token, 0 = padding.
        system_mask: bool [B,S]. The system-prompt span(s); False unless given.
        question_mask: bool [B,S]. The question span(s); False unless given.
        generated_mask: bool [B,S]. Generated tokens; False unless given or appended by
            :meth:`extend`.
        region_weight: float32 [B,S]. Weight of each key inside the region of interest; 0 unless
            set (see :mod:`jaxmm.processing.regions`).
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

    @property
    def shape(self) -> tuple[int, int]:
        """(B, S)."""
        return tuple(np.shape(self.image_mask))

    def extend(self, n_new: int) -> "TokenLayout":
        """The layout grown by ``n_new`` generated positions at the end of every row (numpy).

        New positions: ``generated_mask`` True, ``attention_mask`` 1, the other masks False,
        ``image_index``/``grid_pos``/``grid_hw`` −1, ``region_weight`` 0. For a KV-cache decoder that
        lays out ``prompt + n_new`` key positions up front.
        """
        n_new = int(n_new)
        if n_new < 0:
            raise ValueError(f"n_new: expected >= 0, got {n_new}")
        b = np.shape(self.image_mask)[0]

        def grow(x, fill, tail=()):
            x = np.asarray(x)
            return np.concatenate([x, np.full((b, n_new) + tail, fill, x.dtype)], axis=1)

        return TokenLayout(
            image_mask=grow(self.image_mask, False),
            video_mask=grow(self.video_mask, False),
            image_index=grow(self.image_index, -1),
            grid_pos=grow(self.grid_pos, -1, (3,)),
            grid_hw=grow(self.grid_hw, -1, (2,)),
            attention_mask=grow(self.attention_mask, 1),
            system_mask=grow(self.system_mask, False),
            question_mask=grow(self.question_mask, False),
            generated_mask=grow(self.generated_mask, True),
            region_weight=grow(self.region_weight, 0.0),
        )

    append = extend
    """Alias of :meth:`extend`."""


# --------------------------------------------------------------------------- segmentation
def as_numpy(x, name: str):
    """``x`` (numpy, JAX or torch array, or a list; None passes through) -> a numpy array; ``name``
    names the tensor in the error raised for anything else."""
    if x is None:
        return None
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        x = x.numpy()
    try:
        return np.asarray(x)
    except Exception as e:  # noqa: BLE001
        raise TypeError(f"{name}: cannot be read as an array ({type(x).__name__})") from e


def check_ids_and_mask(input_ids, attention_mask) -> tuple[np.ndarray, np.ndarray]:
    """``input_ids`` as an int array [B,S] and ``attention_mask`` as int32 [B,S] (all ones if None).

    Raises:
        ValueError: naming the tensor, when ``input_ids`` is not a 2-D integer array or the mask's
            shape differs.
    """
    ids = as_numpy(input_ids, "input_ids")
    if ids is None or ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids: expected an integer array [B,S], got {None if ids is None else (ids.dtype, ids.shape)}")
    if attention_mask is None:
        return ids, np.ones(ids.shape, np.int32)
    am = as_numpy(attention_mask, "attention_mask")
    if am.shape != ids.shape:
        raise ValueError(f"attention_mask: shape {am.shape} differs from input_ids {ids.shape}")
    if am.size and not np.isin(am, (0, 1)).all():
        raise ValueError("attention_mask: values must be 0 or 1")
    return ids, am.astype(np.int32)


def check_grid(grid_thw, name: str, spatial_merge_size: int) -> np.ndarray:
    """``grid_thw`` as int64 [n,3] (n = 0 for None).

    Raises:
        ValueError: naming ``name``, when the array is not [n,3], holds a non-positive size, or an
            ``h``/``w`` that is not a multiple of ``spatial_merge_size``.
    """
    if grid_thw is None:
        return np.zeros((0, 3), np.int64)
    g = as_numpy(grid_thw, name)
    if g.ndim != 2 or g.shape[1] != 3 or (g.size and not np.issubdtype(g.dtype, np.integer)):
        raise ValueError(f"{name}: expected an integer array [n, 3] of (t, h, w), got {g.dtype} {g.shape}")
    g = g.astype(np.int64)
    if (g <= 0).any():
        raise ValueError(f"{name}: sizes must be positive, got {g.tolist()}")
    m = int(spatial_merge_size)
    if (g[:, 1:] % m).any():
        raise ValueError(f"{name}: h and w must be multiples of spatial_merge_size={m}, got {g.tolist()}")
    return g


def modality_runs(types_row: np.ndarray, keep_row: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """Maximal runs of equal modality among the kept positions of one row.

    Mirrors the ``itertools.groupby`` over ``mm_token_type_ids[attention_mask.bool()]`` in HF's
    ``get_rope_index``: padding is dropped first, so a run may straddle padding.

    Returns:
        ``[(kind, cols), ...]`` with kind 0 (text), 1 (image), 2 (video) and ``cols`` the int64
        column indices of the run in the unfiltered row, in order.
    """
    cols = np.flatnonzero(keep_row)
    t = np.asarray(types_row)[cols]
    if not len(cols):
        return []
    cuts = np.flatnonzero(t[1:] != t[:-1]) + 1
    return [(int(t[s]), cols[s:e]) for s, e in zip(np.r_[0, cuts], np.r_[cuts, len(cols)])]


def vision_groups(
    input_ids,
    attention_mask,
    image_grid_thw,
    video_grid_thw,
    *,
    image_token_id: int,
    video_token_id: int,
    spatial_merge_size: int,
):
    """Segments a batch and pairs every image/video run with its grid (see the module doc).

    Args:
        input_ids: int [B,S]. attention_mask: {0,1} [B,S] or None (no padding).
        image_grid_thw, video_grid_thw: int [n,3] (t, h, w) in patches, or None.

    Returns:
        ``(ids, am, rows)``: ``ids`` int [B,S], ``am`` int32 [B,S], and for each row a list of
        ``(kind, cols, grid_index)``: kind 0/1/2 (text/image/video), ``cols`` int64 columns of the
        run, ``grid_index`` the row of the image/video grid it uses (−1 for text).

    Raises:
        ValueError: naming the tensor, when shapes mismatch, a row holds more image (video) runs
            than ``image_grid_thw`` (``video_grid_thw``) has rows, a run's length differs from its
            grid's ``t·h·w / merge²``, or grids are left over.
    """
    ids, am = check_ids_and_mask(input_ids, attention_mask)
    m = int(spatial_merge_size)
    grids = {IMAGE: check_grid(image_grid_thw, "image_grid_thw", m), VIDEO: check_grid(video_grid_thw, "video_grid_thw", m)}
    types = (ids == image_token_id) * IMAGE + (ids == video_token_id) * VIDEO
    used = {IMAGE: 0, VIDEO: 0}
    rows = []
    for row in range(ids.shape[0]):
        out = []
        for kind, cols in modality_runs(types[row], am[row] > 0):
            if kind == TEXT:
                out.append((kind, cols, -1))
                continue
            k, g, name = used[kind], grids[kind], _GRID_NAME[kind]
            if k >= len(g):
                extra = f" ({name} is None)" if (image_grid_thw if kind == IMAGE else video_grid_thw) is None else ""
                raise ValueError(
                    f"input_ids row {row}: more {_KIND[kind]} token groups than the {len(g)} rows of "
                    f"{name}{extra}; group {k} is {len(cols)} {_KIND[kind]} pad tokens at columns "
                    f"{int(cols[0])}..{int(cols[-1])}"
                )
            t, h, w = (int(v) for v in g[k])
            want = t * h * w // (m * m)
            if len(cols) != want:
                raise ValueError(
                    f"input_ids row {row}: {len(cols)} consecutive {_KIND[kind]} pad tokens at columns "
                    f"{int(cols[0])}..{int(cols[-1])}, but {name}[{k}]={[t, h, w]} needs "
                    f"t*h*w/merge^2 = {want} (merge={m})"
                )
            out.append((kind, cols, k))
            used[kind] += 1
        rows.append(out)
    for kind in (IMAGE, VIDEO):
        if used[kind] != len(grids[kind]):
            raise ValueError(
                f"{_GRID_NAME[kind]}: {len(grids[kind])} rows but input_ids hold "
                f"{used[kind]} {_KIND[kind]} token groups (after dropping padding)"
            )
    return ids, am, rows


# --------------------------------------------------------------------------- builder
def spans_to_mask(spans, b: int, s: int, name: str) -> np.ndarray:
    """bool [B,S] from per-row lists of half-open ``(start, end)`` spans (None -> all False).

    Raises:
        ValueError: naming ``name``, when the number of rows differs from B or a span is outside
            ``[0, S]`` or has ``end < start``.
    """
    m = np.zeros((b, s), bool)
    if spans is None:
        return m
    if len(spans) != b:
        raise ValueError(f"{name}: {len(spans)} rows of spans for a batch of {b}")
    for row, row_spans in enumerate(spans):
        for span in row_spans or ():
            start, end = (int(v) for v in span)
            if not 0 <= start <= end <= s:
                raise ValueError(f"{name}[{row}]: span ({start}, {end}) outside [0, {s}] or reversed")
            m[row, start:end] = True
    return m


def build_token_layout(
    input_ids,
    attention_mask,
    image_grid_thw,
    *,
    image_token_id: int,
    video_token_id: int,
    spatial_merge_size: int,
    video_grid_thw=None,
    system_spans: Sequence | None = None,
    question_spans: Sequence | None = None,
    generated_spans: Sequence | None = None,
    region_weight=None,
) -> TokenLayout:
    """Builds the :class:`TokenLayout` of a batch (numpy, host side).

    Args:
        input_ids: int [B,S]. attention_mask: {0,1} [B,S], or None for no padding.
        image_grid_thw: int [n_images, 3] (t, h, w) in patches, rows in the order images appear
            (row-major over the batch), or None.
        image_token_id, video_token_id: the pad-token ids standing for merged image/video tokens.
        spatial_merge_size: the vision tower's merge factor (2 for Qwen2/2.5-VL).
        video_grid_thw: int [n_videos, 3] or None; only validated (video tokens get ``video_mask``).
        system_spans, question_spans, generated_spans: per row, a list of half-open ``(start, end)``
            column spans (or None) setting ``system_mask``/``question_mask``/``generated_mask``;
            padding positions are cleared.
        region_weight: float [B,S] or None (zeros).

    Raises:
        ValueError: naming the tensor, when the image/video tokens do not match the grids (see
            :func:`vision_groups`), a shape differs, or a span is out of range.
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
    grids = check_grid(image_grid_thw, "image_grid_thw", m)
    b, s = ids.shape
    valid = am > 0
    image_index = np.full((b, s), -1, np.int32)
    grid_pos = np.full((b, s, 3), -1, np.int32)
    grid_hw = np.full((b, s, 2), -1, np.int32)
    for row, runs in enumerate(rows):
        for kind, cols, k in runs:
            if kind != IMAGE:
                continue
            t, gh, gw = int(grids[k, 0]), int(grids[k, 1]) // m, int(grids[k, 2]) // m
            tt, rr, cc = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
            pos = np.stack([tt.ravel(), rr.ravel(), cc.ravel()], -1)
            # The k-th token of the run is the k-th merged token of the tower: raster order.
            assert np.array_equal((pos[:, 0] * gh + pos[:, 1]) * gw + pos[:, 2], np.arange(len(cols)))
            image_index[row, cols] = k
            grid_pos[row, cols] = pos
            grid_hw[row, cols] = (gh, gw)
    image_mask = (ids == image_token_id) & valid
    assert np.array_equal(image_mask, image_index >= 0)
    if region_weight is None:
        rw = np.zeros((b, s), np.float32)
    else:
        rw = np.asarray(as_numpy(region_weight, "region_weight"), np.float32)
        if rw.shape != (b, s):
            raise ValueError(f"region_weight: shape {rw.shape} differs from input_ids {(b, s)}")
    return TokenLayout(
        image_mask=image_mask,
        video_mask=(ids == video_token_id) & valid,
        image_index=image_index,
        grid_pos=grid_pos,
        grid_hw=grid_hw,
        attention_mask=am,
        system_mask=spans_to_mask(system_spans, b, s, "system_spans") & valid,
        question_mask=spans_to_mask(question_spans, b, s, "question_spans") & valid,
        generated_mask=spans_to_mask(generated_spans, b, s, "generated_spans") & valid,
        region_weight=rw,
    )
