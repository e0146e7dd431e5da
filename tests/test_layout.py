"""TokenLayout: fields against a loop-based construction, raster order against the HF vision tower
(and the HF image processor), spans, extend/append, pytree/jit, and named errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import tiny
from jaxmm.models.core.rope import get_rope_index
from jaxmm.processing.layout import TokenLayout, build_token_layout

IMG, VID, M = tiny.IMAGE_TOKEN, tiny.VIDEO_TOKEN, 2
KW = dict(image_token_id=IMG, video_token_id=VID, spatial_merge_size=M)
FIELDS = [f.name for f in dataclasses.fields(TokenLayout)]


def img(grid):
    return tiny.image_span(int(np.prod(grid)) // (M * M))


def vid(grid):
    return [tiny.VISION_START] + [VID] * (int(np.prod(grid)) // (M * M)) + [tiny.VISION_END]


GRIDS = [(1, 4, 6), (1, 8, 4), (1, 2, 2), (2, 4, 4), (1, 6, 10)]
ROWS = [
    [5, 6] + img(GRIDS[0]) + [7] + img(GRIDS[1]) + [8, 9],
    [10, 11, 12, 13],  # text only
    [14] + img(GRIDS[2]) + [15] + vid((2, 2, 4)) + img(GRIDS[3]) + [16],
    [17] + img(GRIDS[4]) + [18, 19],
]
VGRIDS = [(2, 2, 4)]


def reference_layout(ids, am, grids):
    """Walks every row token by token (independent of the library's run segmentation)."""
    b, s = ids.shape
    ref = dict(
        image_mask=np.zeros((b, s), bool),
        video_mask=np.zeros((b, s), bool),
        image_index=np.full((b, s), -1),
        grid_pos=np.full((b, s, 3), -1),
        grid_hw=np.full((b, s, 2), -1),
    )
    n_img = -1
    for r in range(b):
        prev_was_image, k = False, 0
        for c in range(s):
            if not am[r, c]:
                continue  # padding is skipped: it neither breaks nor belongs to a run
            if ids[r, c] == VID:
                ref["video_mask"][r, c] = True
            if ids[r, c] != IMG:
                prev_was_image = False
                continue
            if not prev_was_image:
                n_img, k = n_img + 1, 0
            prev_was_image = True
            t, h, w = grids[n_img]
            gh, gw = h // M, w // M
            ref["image_mask"][r, c] = True
            ref["image_index"][r, c] = n_img
            ref["grid_pos"][r, c] = (k // (gh * gw), (k // gw) % gh, k % gw)
            ref["grid_hw"][r, c] = (gh, gw)
            k += 1
    assert n_img + 1 == len(grids)
    return ref


@pytest.mark.parametrize("side", ["left", "right"])
def test_fields_match_loop_construction(side):
    ids, am = tiny.make_rows(ROWS, side)
    lay = build_token_layout(ids, am, np.array(GRIDS), video_grid_thw=np.array(VGRIDS), **KW)
    ref = reference_layout(ids, am, GRIDS)
    for name, want in ref.items():
        got = getattr(lay, name)
        np.testing.assert_array_equal(got, want, err_msg=name)
    dtypes = dict(
        image_mask=bool,
        video_mask=bool,
        image_index=np.int32,
        grid_pos=np.int32,
        grid_hw=np.int32,
        attention_mask=np.int32,
        system_mask=bool,
        question_mask=bool,
        generated_mask=bool,
        region_weight=np.float32,
    )
    for name, dt in dtypes.items():
        x = getattr(lay, name)
        assert isinstance(x, np.ndarray) and x.dtype == dt, name
        assert x.shape[:2] == ids.shape, name
    np.testing.assert_array_equal(lay.attention_mask, am)
    for name in ("system_mask", "question_mask", "generated_mask"):
        assert not getattr(lay, name).any()
    assert not lay.region_weight.any()
    assert lay.shape == ids.shape


@pytest.mark.parametrize("side", ["left", "right"])
def test_grid_pos_agrees_with_rope_positions(side):
    """Row/col of an image token = its M-RoPE h/w position minus the image's start position."""
    ids, am = tiny.make_rows(ROWS, side)
    grids = np.array(GRIDS)
    lay = build_token_layout(ids, am, grids, video_grid_thw=np.array(VGRIDS), **KW)
    pos, _ = get_rope_index(
        ids, am, grids, np.array(VGRIDS), image_token_id=IMG, video_token_id=VID, spatial_merge_size=M, tokens_per_second=4
    )
    for i in range(len(grids)):
        sel = lay.image_index == i
        start = pos[1][sel].min()
        np.testing.assert_array_equal(pos[1][sel] - start, lay.grid_pos[..., 1][sel])
        np.testing.assert_array_equal(pos[2][sel] - start, lay.grid_pos[..., 2][sel])
        np.testing.assert_array_equal(pos[0][sel] - start, lay.grid_pos[..., 0][sel])  # images: interval 1


def test_no_images_and_no_mask():
    ids = np.array([[5, 6, 7], [8, 9, 10]])
    lay = build_token_layout(ids, None, None, **KW)
    assert not lay.image_mask.any() and (lay.image_index == -1).all() and (lay.grid_pos == -1).all()
    np.testing.assert_array_equal(lay.attention_mask, np.ones((2, 3), np.int32))


# --------------------------------------------------------------------------- vision tower order
RASTER_GRIDS = [(1, 8, 12), (1, 4, 16), (2, 6, 4), (1, 2, 2)]  # window_size 56 -> 2x2 merged windows


def _layout_of(grids):
    rows = [[5] + img(g) + [6] for g in grids]
    ids, am = tiny.make_rows(rows, "left")
    return build_token_layout(ids, am, np.array(grids), **KW)


def _grid_pos_in_image_order(lay, n):
    """[sum of merged tokens, 3]: grid_pos of image 0's tokens, then image 1's, ... (sequence order)."""
    return np.concatenate([lay.grid_pos[lay.image_index == i] for i in range(n)])


def test_grid_pos_matches_vision_rotary_positions():
    """The tower's per-patch (h, w) rotary positions, grouped into merge units, are the merged cells."""
    from transformers.vision_utils import get_vision_position_ids

    lay = _layout_of(RASTER_GRIDS)
    hw = get_vision_position_ids(torch.tensor(RASTER_GRIDS), M).numpy().reshape(-1, M * M, 2)
    assert (hw // M == (hw // M)[:, :1]).all()  # each merge unit covers one merged cell
    gp = _grid_pos_in_image_order(lay, len(RASTER_GRIDS))
    np.testing.assert_array_equal(hw[:, 0] // M, gp[:, 1:])


class _CoordsOfPatch(torch.nn.Module):
    """Stand-in patch embedding: each patch's (row, col) in patches, decoded from its pixels."""

    def __init__(self, mean, std):
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, x):
        px = x.view(x.shape[0], 3, 2, 14, 14)[:, :2, 0, 7, 7]  # center pixel, R and G
        px = (px * torch.tensor(self.std[:2]) + torch.tensor(self.mean[:2])) * 255
        return torch.round(px / 10)


class _MeanMerger(torch.nn.Module):
    def forward(self, x):
        return x.view(-1, M * M, x.shape[-1]).mean(1)


def _coord_image(h_patches, w_patches):
    from PIL import Image

    y, x = np.mgrid[0 : h_patches * 14, 0 : w_patches * 14]
    return Image.fromarray(np.stack([(y // 14) * 10, (x // 14) * 10, np.full_like(y, 128)], -1).astype(np.uint8))


def test_grid_pos_is_vision_tower_output_order():
    """End to end through HF: images whose pixels encode their patch coordinates, processed by the
    HF image processor, through the real ``Qwen2_5_VisionTransformerPretrainedModel.forward`` (window
    permutation, merge units, inverse permutation) with the patch embedding replaced by a coordinate
    decoder, the blocks removed and the merger replaced by a mean: merged token k of image i must be
    the cell ``grid_pos`` gives to the k-th image token of image i."""
    from transformers import Qwen2VLImageProcessorPil

    proc = Qwen2VLImageProcessorPil()
    images = [_coord_image(8, 12), _coord_image(4, 16), _coord_image(6, 4), _coord_image(2, 8)]
    out = proc(images=images, return_tensors="pt")
    grids = out["image_grid_thw"].numpy()
    np.testing.assert_array_equal(grids, [(1, 8, 12), (1, 4, 16), (1, 6, 4), (1, 2, 8)])

    vis = tiny.build_hf_model("gqa_untied").model.visual
    from transformers.vision_utils import get_vision_window_index

    window_index, _ = get_vision_window_index(out["image_grid_thw"], M, vis.window_size, 14)
    assert (np.diff(window_index.numpy()) < 0).any()  # windows of 2x2 merged cells: not the identity
    vis.patch_embed = _CoordsOfPatch(proc.image_mean, proc.image_std)
    vis.blocks = torch.nn.ModuleList()
    vis.merger = _MeanMerger()
    with torch.no_grad():
        merged = vis(out["pixel_values"], grid_thw=out["image_grid_thw"]).pooler_output.numpy()
    cells = np.floor(merged / M).astype(int)  # mean patch (row, col) of a 2x2 unit -> merged cell

    lay = _layout_of([tuple(g) for g in grids])
    np.testing.assert_array_equal(cells, _grid_pos_in_image_order(lay, len(grids))[:, 1:])


# --------------------------------------------------------------------------- spans, extend, pytree
def test_spans_set_masks_and_skip_padding():
    ids, am = tiny.make_rows([[5, 6, 7, 8, 9, 10], [11, 12, 13]], "left")
    lay = build_token_layout(
        ids, am, None, system_spans=[[(0, 2)], [(0, 5)]], question_spans=[[(3, 5)], []], generated_spans=[None, [(5, 6)]], **KW
    )
    np.testing.assert_array_equal(lay.system_mask, [[1, 1, 0, 0, 0, 0], [0, 0, 0, 1, 1, 0]])
    np.testing.assert_array_equal(lay.question_mask, [[0, 0, 0, 1, 1, 0], [0] * 6])
    np.testing.assert_array_equal(lay.generated_mask, [[0] * 6, [0, 0, 0, 0, 0, 1]])
    rw = np.arange(12, dtype=np.float64).reshape(2, 6)
    lay = build_token_layout(ids, am, None, region_weight=rw, **KW)
    assert lay.region_weight.dtype == np.float32 and np.array_equal(lay.region_weight, rw)
    with pytest.raises(ValueError, match=r"question_spans\[1\]: span \(2, 9\)"):
        build_token_layout(ids, am, None, question_spans=[[], [(2, 9)]], **KW)
    with pytest.raises(ValueError, match="system_spans: 1 rows of spans for a batch of 2"):
        build_token_layout(ids, am, None, system_spans=[[(0, 1)]], **KW)
    with pytest.raises(ValueError, match="region_weight"):
        build_token_layout(ids, am, None, region_weight=np.zeros((2, 5)), **KW)


@pytest.mark.parametrize("method", ["extend", "append"])
def test_extend(method):
    ids, am = tiny.make_rows(ROWS, "left")
    lay = build_token_layout(ids, am, np.array(GRIDS), video_grid_thw=np.array(VGRIDS), system_spans=[[(0, 3)]] * 4, **KW)
    b, s = ids.shape
    big = getattr(lay, method)(3)
    fills = dict(
        image_mask=False,
        video_mask=False,
        image_index=-1,
        grid_pos=-1,
        grid_hw=-1,
        attention_mask=1,
        system_mask=False,
        question_mask=False,
        generated_mask=True,
        region_weight=0.0,
    )
    for name in FIELDS:
        old, new = getattr(lay, name), getattr(big, name)
        assert new.dtype == old.dtype and new.shape == (b, s + 3) + old.shape[2:], name
        np.testing.assert_array_equal(new[:, :s], old, err_msg=name)
        assert (new[:, s:] == fills[name]).all(), name
    same = lay.extend(0)
    assert all(np.array_equal(getattr(same, n), getattr(lay, n)) for n in FIELDS)
    with pytest.raises(ValueError, match="n_new"):
        lay.extend(-1)


def test_pytree_through_jit():
    ids, am = tiny.make_rows(ROWS, "right")
    lay = build_token_layout(ids, am, np.array(GRIDS), video_grid_thw=np.array(VGRIDS), **KW)
    leaves, treedef = jax.tree_util.tree_flatten(lay)
    assert len(leaves) == len(FIELDS)

    @jax.jit
    def f(layout):
        raster = layout.grid_pos[..., 1] * layout.grid_hw[..., 1] + layout.grid_pos[..., 2]
        return layout.image_mask.sum(), jnp.where(layout.image_mask, raster, -1), layout

    n, raster, back = f(lay)
    assert int(n) == lay.image_mask.sum()
    assert isinstance(back, TokenLayout)
    np.testing.assert_array_equal(back.grid_pos, lay.grid_pos)
    np.testing.assert_array_equal(
        np.asarray(raster)[lay.image_mask], np.concatenate([np.arange(t * h * w // 4) % (h * w // 4) for t, h, w in GRIDS])
    )
    assert isinstance(jax.tree_util.tree_unflatten(treedef, leaves), TokenLayout)


# --------------------------------------------------------------------------- errors
def test_errors_name_the_problem():
    ids, am = tiny.make_rows([[5] + img((1, 4, 4)) + [6], [7, 8]], "left")
    with pytest.raises(ValueError, match=r"4 consecutive image pad tokens .* image_grid_thw\[0\]=\[1, 4, 6\] needs"):
        build_token_layout(ids, am, np.array([(1, 4, 6)]), **KW)
    with pytest.raises(
        ValueError,
        match=r"more image token groups than the 0 rows of image_grid_thw "
        r"\(image_grid_thw is None\)",
    ):
        build_token_layout(ids, am, None, **KW)
    with pytest.raises(ValueError, match="image_grid_thw: 2 rows but input_ids hold 1 image token groups"):
        build_token_layout(ids, am, np.array([(1, 4, 4), (1, 2, 2)]), **KW)
    with pytest.raises(ValueError, match=r"attention_mask: shape \(2, 5\) differs from input_ids \(2, 8\)"):
        build_token_layout(ids, am[:, :5], np.array([(1, 4, 4)]), **KW)
    with pytest.raises(ValueError, match=r"input_ids: expected an integer array \[B,S\]"):
        build_token_layout(ids[0], None, np.array([(1, 4, 4)]), **KW)
    with pytest.raises(ValueError, match=r"image_grid_thw: expected an integer array \[n, 3\]"):
        build_token_layout(ids, am, np.array([(4, 4)]), **KW)
    with pytest.raises(ValueError, match="multiples of spatial_merge_size=2"):
        build_token_layout(ids, am, np.array([(1, 4, 5)]), **KW)
    vids, vam = tiny.make_rows([[5] + vid((2, 2, 4)) + [6]])
    with pytest.raises(ValueError, match=r"video_grid_thw\[0\]=\[1, 2, 4\] needs"):
        build_token_layout(vids, vam, None, video_grid_thw=np.array([(1, 2, 4)]), **KW)
    # Two images with no separator form one run of image tokens (as in HF's get_rope_index).
    ids2, am2 = tiny.make_rows([[5] + [IMG] * 8 + [6]])
    with pytest.raises(ValueError, match=r"8 consecutive image pad tokens at columns 1\.\.8"):
        build_token_layout(ids2, am2, np.array([(1, 4, 4), (1, 4, 4)]), **KW)
