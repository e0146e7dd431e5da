"""M-RoPE position ids and rope_deltas against transformers' get_rope_index (with mm_token_type_ids)."""

import numpy as np
import pytest
import torch

import tiny
from jaxmm.models.qwen2_5_vl.rope import get_rope_index


@pytest.fixture(scope="module")
def hf_model():
    return tiny.build_hf_model("gqa_untied")


def image_tokens(grid):
    return tiny.image_span(int(np.prod(grid)) // 4)


def video_tokens(grid):
    return [tiny.VISION_START] + [tiny.VIDEO_TOKEN] * (int(np.prod(grid)) // 4) + [tiny.VISION_END]


CASES = {
    "several_images_per_row_left": ([[5, 6] + image_tokens((1, 4, 6)) + [7] + image_tokens((1, 8, 4)) + [8, 9],
                                     [10] + image_tokens((1, 2, 2)) + [11, 12, 13]],
                                    [(1, 4, 6), (1, 8, 4), (1, 2, 2)], "left"),
    "text_only_row_right": ([[5, 6, 7, 8, 9, 10, 11],
                             [12] + image_tokens((1, 6, 10)) + [13]],
                            [(1, 6, 10)], "right"),
    "no_images": ([[5, 6, 7], [8, 9, 10, 11, 12]], [], "left"),
}


def hf_rope(model, ids, am, grids, vgrids=None, secs=None):
    t = lambda x: None if x is None else torch.tensor(np.asarray(x))
    pos, deltas = model.model.get_rope_index(
        t(ids), mm_token_type_ids=t(tiny.mm_token_type_ids(ids)), image_grid_thw=t(grids) if len(grids) else None,
        video_grid_thw=t(vgrids), second_per_grid_ts=t(secs), attention_mask=t(am))
    return pos.numpy(), deltas.numpy()


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_transformers(hf_model, case):
    rows, grids, side = CASES[case]
    ids, am = tiny.make_rows(rows, side)
    grids = np.array(grids, np.int64).reshape(-1, 3)
    ref_pos, ref_deltas = hf_rope(hf_model, ids, am, grids)
    pos, deltas = get_rope_index(ids, am, grids if len(grids) else None, image_token_id=tiny.IMAGE_TOKEN,
                                 video_token_id=tiny.VIDEO_TOKEN, spatial_merge_size=2, tokens_per_second=4)
    np.testing.assert_array_equal(pos, ref_pos)
    np.testing.assert_array_equal(deltas, ref_deltas)
    assert (deltas != 0).any() or not len(grids)


def test_videos_with_seconds_per_grid(hf_model):
    vg = [(2, 4, 4), (3, 2, 6)]
    rows = [[5] + video_tokens(vg[0]) + [6] + image_tokens((1, 4, 4)), [7, 8] + video_tokens(vg[1]) + [9]]
    ids, am = tiny.make_rows(rows, "left")
    secs = np.array([0.5, 2.0])
    ref_pos, ref_deltas = hf_rope(hf_model, ids, am, np.array([(1, 4, 4)]), np.array(vg), secs)
    pos, deltas = get_rope_index(ids, am, np.array([(1, 4, 4)]), np.array(vg), secs, image_token_id=tiny.IMAGE_TOKEN,
                                 video_token_id=tiny.VIDEO_TOKEN, spatial_merge_size=2,
                                 tokens_per_second=hf_model.config.vision_config.tokens_per_second)
    np.testing.assert_array_equal(pos, ref_pos)
    np.testing.assert_array_equal(deltas, ref_deltas)


def test_mismatched_grid_is_named():
    ids, am = tiny.make_rows([[5] + image_tokens((1, 4, 4)) + [6]])
    with pytest.raises(ValueError, match=r"image_grid_thw\[0\]"):
        get_rope_index(ids, am, np.array([(1, 4, 6)]), image_token_id=tiny.IMAGE_TOKEN,
                       video_token_id=tiny.VIDEO_TOKEN, spatial_merge_size=2, tokens_per_second=4)
    with pytest.raises(ValueError, match="more image token groups"):
        get_rope_index(ids, am, None, image_token_id=tiny.IMAGE_TOKEN,
                       video_token_id=tiny.VIDEO_TOKEN, spatial_merge_size=2, tokens_per_second=4)
