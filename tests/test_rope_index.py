"""M-RoPE position ids and rope_deltas against transformers' ``get_rope_index`` (called with
``mm_token_type_ids``), decoding positions against ``compute_3d_position_ids``,
a cached continuation forward and ``generate()``, and named errors."""

import numpy as np
import pytest
import torch
from transformers import DynamicCache

import tiny
from jaxmm.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from jaxmm.models.core.rope import (
    decode_position_ids,
    generate_position_ids,
    get_rope_index,
    get_rope_index_for_config,
    mm_token_type_ids,
)

IMG, VID, M = tiny.IMAGE_TOKEN, tiny.VIDEO_TOKEN, 2


@pytest.fixture(scope="module")
def hf_model():
    return tiny.build_hf_model("gqa_untied")


@pytest.fixture(scope="module")
def tps(hf_model):
    return hf_model.config.vision_config.tokens_per_second


def img(grid):
    return tiny.image_span(int(np.prod(grid)) // (M * M))


def vid(grid):
    return [tiny.VISION_START] + [VID] * (int(np.prod(grid)) // (M * M)) + [tiny.VISION_END]


def hf_rope(model, ids, am, grids=None, vgrids=None, secs=None):
    t = lambda x: None if x is None else (x if isinstance(x, (list, torch.Tensor)) else torch.tensor(np.asarray(x)))
    pos, deltas = model.model.get_rope_index(
        torch.tensor(ids),
        mm_token_type_ids=torch.tensor(mm_token_type_ids(ids, IMG, VID)),
        image_grid_thw=t(grids),
        video_grid_thw=t(vgrids),
        second_per_grid_ts=t(secs),
        attention_mask=t(am),
    )
    return pos.numpy(), deltas.numpy()


def ours(ids, am, grids=None, vgrids=None, secs=None, tps=4):
    return get_rope_index(
        ids, am, grids, vgrids, secs, image_token_id=IMG, video_token_id=VID, spatial_merge_size=M, tokens_per_second=tps
    )


def assert_same(a, b):
    (pos, deltas), (ref_pos, ref_deltas) = a, b
    assert pos.dtype == np.int64 and deltas.dtype == np.int64
    assert pos.shape == ref_pos.shape and deltas.shape == ref_deltas.shape
    np.testing.assert_array_equal(pos, ref_pos)
    np.testing.assert_array_equal(deltas, ref_deltas)


G = [(1, 4, 6), (1, 8, 4), (1, 2, 2), (1, 6, 10), (2, 4, 4)]
CASES = {
    # several images per row, non-square grids, one image with t=2
    "several_images": (
        [
            [5, 6] + img(G[0]) + [7] + img(G[1]) + [8, 9],
            [10] + img(G[2]) + [11, 12, 13] + img(G[3]) + [14],
            [15] + img(G[4]) + [16],
        ],
        G,
    ),
    # text-only rows between and around image rows
    "text_only_rows": (
        [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17], [12] + img(G[3]) + [13], [20, 21], [22] + img(G[0]) + [23] + img(G[2])],
        [G[3], G[0], G[2]],
    ),
    # image at the very start and the very end of rows
    "image_at_edges": ([img(G[1])[1:-1] + [5, 6], [7] + img(G[0])[1:-1]], [G[1], G[0]]),
    "no_images": ([[5, 6, 7], [8, 9, 10, 11, 12], [13]], None),
}


@pytest.mark.parametrize("side", ["left", "right", "none"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_transformers(hf_model, case, side):
    rows, grids = CASES[case]
    if side == "none":  # no attention_mask: rows filled up to one length with text tokens
        ids, am = tiny.make_rows(rows, "right", pad_id=4)[0], None
    else:
        ids, am = tiny.make_rows(rows, side)
    grids_np = None if grids is None else np.array(grids)
    ref = hf_rope(hf_model, ids, am, grids_np)
    got = ours(ids, am, grids_np)
    assert_same(got, ref)
    if am is not None:
        assert (got[0][:, am == 0] == 0).all()
    text_rows = ~(ids == IMG).any(1)
    assert (got[1][text_rows] == 0).all()


def test_torch_inputs_and_config(hf_model):
    rows, grids = CASES["several_images"]
    ids, am = tiny.make_rows(rows, "left")
    ref = hf_rope(hf_model, ids, am, np.array(grids))
    assert_same(ours(torch.tensor(ids), torch.tensor(am), torch.tensor(grids)), ref)
    cfg = Qwen2_5_VLConfig.from_dict(hf_model.config.to_dict())
    assert_same(get_rope_index_for_config(cfg, ids, am, np.array(grids)), ref)


@pytest.mark.parametrize("side", ["left", "right"])
def test_videos_with_seconds_per_grid(hf_model, tps, side):
    vg = [(2, 4, 4), (3, 2, 6), (4, 4, 2)]
    rows = [
        [5] + vid(vg[0]) + [6] + img((1, 4, 4)),
        [7, 8] + vid(vg[1]) + [9] + img((1, 2, 6)) + [10] + vid(vg[2]) + [11],
        [12, 13],
    ]
    ids, am = tiny.make_rows(rows, side)
    grids = np.array([(1, 4, 4), (1, 2, 6)])
    for secs in (
        np.array([0.5, 2.0, 1.0], np.float32),
        np.array([0.5, 2.0, 1.0]),
        [0.5, 2.0, 1.0],
        torch.tensor([0.5, 3.0, 1.25]),
        np.array([1, 2, 3]),
        None,
    ):
        ref = hf_rope(hf_model, ids, am, grids, np.array(vg), secs)
        got = ours(ids, am, grids, np.array(vg), secs, tps)
        assert_same(got, ref)


def test_video_interval_follows_torch_dtype(hf_model, tps):
    """``(arange(t) * tokens_per_second * s).long()`` truncates differently in float32 and float64."""
    vg = np.array([(16, 2, 2)])
    ids, am = tiny.make_rows([[5] + vid(vg[0]) + [6]])
    results = {}
    for name, secs in {
        "f32": np.array([1.05], np.float32),
        "f64": np.array([1.05]),
        "list": [1.05],
        "torch32": torch.tensor([1.05]),
    }.items():
        ref = hf_rope(hf_model, ids, am, None, vg, secs)
        got = ours(ids, am, None, vg, secs, tps)
        assert_same(got, ref)
        results[name] = got[0]
    assert (results["f32"] != results["f64"]).any()  # the case is sensitive to the dtype


def test_random_batches(hf_model, tps):
    rng = np.random.default_rng(0)
    grid_choices = [(1, 2, 2), (1, 4, 6), (1, 8, 4), (1, 6, 2), (2, 4, 4), (1, 2, 10)]
    for trial in range(25):
        rows, grids, vgrids = [], [], []
        for _ in range(rng.integers(1, 5)):
            row = list(rng.integers(3, 200, rng.integers(1, 4)))
            for _ in range(rng.integers(0, 4)):
                if rng.random() < 0.7:
                    g = grid_choices[rng.integers(len(grid_choices))]
                    row += img(g)
                    grids.append(g)
                else:
                    g = (int(rng.integers(1, 5)), 2 * int(rng.integers(1, 4)), 2 * int(rng.integers(1, 4)))
                    row += vid(g)
                    vgrids.append(g)
                row += list(rng.integers(3, 200, rng.integers(0, 3)))
            rows.append(row)
        ids, am = tiny.make_rows(rows, ["left", "right"][trial % 2])
        secs = rng.choice([0.5, 2 / 3, 1.05, 1.0, 2.0], len(vgrids)).astype(np.float32) if vgrids else None
        args = (np.array(grids) if grids else None, np.array(vgrids) if vgrids else None, secs)
        assert_same(ours(ids, am, *args, tps=tps), hf_rope(hf_model, ids, am, *args))


# --------------------------------------------------------------------------- decoding
def _fake_cache(model, b, length):
    cfg = model.config.text_config
    cache = DynamicCache(config=model.config)
    kv = torch.zeros(b, cfg.num_key_value_heads, length, cfg.hidden_size // cfg.num_attention_heads)
    for layer in range(cfg.num_hidden_layers):
        cache.update(kv, kv, layer)
    return cache


def _prompt():
    rows = [[5, 6] + img((1, 4, 6)) + [7, 8], [9] + img((1, 2, 8)) + [3], [4, 4, 4]]
    return tiny.make_rows(rows, "left"), np.array([(1, 4, 6), (1, 2, 8)])


def test_decode_matches_compute_3d_position_ids_without_mask(hf_model):
    rows = [[5, 6] + img((1, 4, 6)) + [7, 8], [9] + img((1, 8, 8)) + [3]]
    rows[0] += [4] * (len(rows[1]) - len(rows[0]))
    ids, grids = np.array(rows), np.array([(1, 4, 6), (1, 8, 8)])
    _, deltas = ours(ids, None, grids)
    hf_model.model.rope_deltas = torch.tensor(deltas)
    n_new = 3
    emb = torch.zeros(len(ids), n_new, hf_model.config.text_config.hidden_size)
    cache = _fake_cache(hf_model, len(ids), ids.shape[1])
    ref = hf_model.model.compute_3d_position_ids(None, None, None, emb, None, cache)
    got = decode_position_ids(deltas, ids.shape[1], n_new)
    assert got.dtype == np.int64 and got.shape == (3, len(ids), n_new)
    np.testing.assert_array_equal(got, ref.numpy())


class _Captured(Exception):
    pass


def _continuation_positions(model, ids, am, pixel_values, grids, n_new):
    """The M-RoPE position ids [3, B, n_new] HF's forward gives ``n_new`` continuation tokens after
    a cached prompt: a prefill forward with ``use_cache=True``, then a forward of the new tokens with
    the full attention mask and the cache; the positions are read where they reach
    ``model.model.language_model``. HF builds them from the full mask (``cumsum(mask) - 1 +
    rope_deltas``, [3 or 4, B, S + n_new]) and the forward is stopped there, before the layers, which
    would reject that length: the last ``n_new`` columns are the new tokens'."""
    t = lambda x: torch.tensor(np.asarray(x))
    b = len(ids)
    new = np.full((b, n_new), 5)
    full_am = np.concatenate([am, np.ones((b, n_new), am.dtype)], 1)
    with torch.no_grad():
        prefill = model(
            input_ids=t(ids),
            attention_mask=t(am),
            pixel_values=pixel_values,
            image_grid_thw=t(grids),
            mm_token_type_ids=t(mm_token_type_ids(ids, IMG, VID)),
            use_cache=True,
        )
        seen = []

        def stop(mod, args, kw):
            seen.append(kw["position_ids"].clone())
            raise _Captured

        hook = model.model.language_model.register_forward_pre_hook(stop, with_kwargs=True)
        try:
            model(
                input_ids=t(new),
                attention_mask=t(full_am),
                cache=prefill.cache,
                mm_token_type_ids=t(mm_token_type_ids(new, IMG, VID)),
                image_grid_thw=t(grids),
                use_cache=True,
            )
        except _Captured:
            pass
        finally:
            hook.remove()
    (pos,) = seen
    pos = pos.numpy()
    if pos.shape[0] == 4:  # [text; t; h; w]: the M-RoPE axes are rows 1..3
        pos = pos[1:]
    assert pos.shape[:2] == (3, b) and pos.shape[-1] in (n_new, ids.shape[1] + n_new), pos.shape
    return np.broadcast_to(pos[..., -n_new:], (3, b, n_new))


def test_decode_matches_continuation_with_mask(hf_model):
    """HF's forward continuing from a cache: cumsum(mask) − 1 + rope_deltas."""
    (ids, am), grids = _prompt()
    pv = torch.randn(int(grids.prod(-1).sum()), 3 * 2 * 14 * 14)
    n_new, s = 3, ids.shape[1]
    ref = _continuation_positions(hf_model, ids, am, pv, grids, n_new)
    # every row is off a plain continuation arange(S, S + n) — the image shifts row 0 (rope_deltas −3),
    # left padding rows 1 and 2 — so the comparison below can tell a wrong decode_position_ids
    assert (ref != np.arange(s, s + n_new)).any(axis=(0, 2)).all()
    _, deltas = ours(ids, am, grids)
    np.testing.assert_array_equal(decode_position_ids(deltas, am.sum(-1), n_new), ref)
    np.testing.assert_array_equal(decode_position_ids(deltas[:, 0], am.sum(-1), n_new), ref)


def _generate_positions(model, ids, am, pixel_values=None, grids=None, pixel_values_videos=None, vgrids=None, secs=None, n_new=4):
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda mod, args, kw: seen.append(kw["position_ids"].clone()), with_kwargs=True
    )
    t = lambda x: None if x is None else torch.tensor(np.asarray(x))
    try:
        extra = dict(
            pixel_values=pixel_values,
            image_grid_thw=t(grids),
            pixel_values_videos=pixel_values_videos,
            video_grid_thw=t(vgrids),
            second_per_grid_ts=t(secs),
        )
        model.generate(
            input_ids=t(ids),
            attention_mask=t(am),
            mm_token_type_ids=t(mm_token_type_ids(ids, IMG, VID)),
            max_new_tokens=n_new,
            min_new_tokens=n_new,
            do_sample=False,
            **{k: v for k, v in extra.items() if v is not None},
        )
    finally:
        hook.remove()
    prefill, steps = seen[0], seen[1:]
    assert prefill.shape[0] == 4 and all(p.shape[-1] == 1 for p in steps)
    # rows 1: are the M-RoPE axes (row 0 is the text position used for masking); step k feeds back
    # generated token k
    return prefill[1:].numpy(), np.concatenate([p[1:].numpy() for p in steps], -1)


def test_generate_positions(hf_model):
    (ids, am), grids = _prompt()
    pv = torch.randn(int(grids.prod(-1).sum()), 3 * 2 * 14 * 14)
    prefill, steps = _generate_positions(hf_model, ids, am, pv, grids)
    pos, deltas = ours(ids, am, grids)
    np.testing.assert_array_equal(prefill, pos)
    n = steps.shape[-1]
    np.testing.assert_array_equal(steps, generate_position_ids(pos, n))
    np.testing.assert_array_equal(steps, decode_position_ids(deltas, am.sum(-1), n))


def test_generate_differs_from_rope_deltas_after_long_video(hf_model, tps):
    """A video whose temporal positions run past the text after it: ``generate()`` continues from the
    last prompt position, ``rope_deltas`` from the maximum."""
    vg = np.array([(4, 2, 2)])
    ids, am = tiny.make_rows([[5] + vid(vg[0]) + [6, 7]])
    secs = np.array([2.0], np.float32)
    pvv = torch.randn(int(vg.prod(-1).sum()), 3 * 2 * 14 * 14)
    prefill, steps = _generate_positions(hf_model, ids, am, pixel_values_videos=pvv, vgrids=vg, secs=secs, n_new=3)
    pos, deltas = ours(ids, am, None, vg, secs, tps)
    np.testing.assert_array_equal(prefill, pos)
    np.testing.assert_array_equal(steps, generate_position_ids(pos, 2))
    assert (decode_position_ids(deltas, am.sum(-1), 2) > steps).all()


def test_decode_shapes_and_errors():
    d = np.array([[-3], [0]])
    np.testing.assert_array_equal(decode_position_ids(d, np.array([12, 8]), 2)[0], [[9, 10], [8, 9]])
    np.testing.assert_array_equal(decode_position_ids(d, 5)[:, :, 0], [[2, 5]] * 3)
    with pytest.raises(ValueError, match="cache_position_or_lengths"):
        decode_position_ids(d, np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="rope_deltas"):
        decode_position_ids(np.zeros((2, 2)), 1)
    with pytest.raises(ValueError, match="prompt_position_ids"):
        generate_position_ids(np.zeros((2, 3)))


# --------------------------------------------------------------------------- errors
def test_mm_token_type_ids():
    ids = np.array([[1, IMG, VID, IMG, 0]])
    out = mm_token_type_ids(ids, IMG, VID)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, [[0, 1, 2, 1, 0]])


def test_errors_name_the_problem(hf_model):
    ids, am = tiny.make_rows([[5] + img((1, 4, 4)) + [6], [7, 8]])
    kw = dict(image_token_id=IMG, video_token_id=VID, spatial_merge_size=M, tokens_per_second=4)
    with pytest.raises(
        ValueError,
        match=r"row 0: 4 consecutive image pad tokens at columns 2\.\.5, "
        r"but image_grid_thw\[0\]=\[1, 4, 6\] needs t\*h\*w/merge\^2 = 6",
    ):
        get_rope_index(ids, am, np.array([(1, 4, 6)]), **kw)
    with pytest.raises(ValueError, match=r"more image token groups than the 0 rows of image_grid_thw"):
        get_rope_index(ids, am, None, **kw)
    ids2, am2 = tiny.make_rows([[5] + img((1, 4, 4)) + [6], [7] + img((1, 2, 2))])
    with pytest.raises(ValueError, match=r"input_ids row 1: more image token groups than the 1 rows of image_grid_thw"):
        get_rope_index(ids2, am2, np.array([(1, 4, 4)]), **kw)
    with pytest.raises(ValueError, match="image_grid_thw: 2 rows but input_ids hold 1 image token groups"):
        get_rope_index(ids, am, np.array([(1, 4, 4), (1, 2, 2)]), **kw)
    with pytest.raises(ValueError, match=r"attention_mask: shape \(2, 3\)"):
        get_rope_index(ids, am[:, :3], np.array([(1, 4, 4)]), **kw)
    with pytest.raises(ValueError, match="input_ids: expected an integer array"):
        get_rope_index(ids.astype(np.float32), am, np.array([(1, 4, 4)]), **kw)
    with pytest.raises(ValueError, match=r"image_grid_thw: expected an integer array \[n, 3\]"):
        get_rope_index(ids, am, np.array([1, 4, 4]), **kw)
    with pytest.raises(ValueError, match="image_grid_thw: h and w must be multiples of spatial_merge_size=2"):
        get_rope_index(ids, am, np.array([(1, 3, 4)]), **kw)
    vids, vam = tiny.make_rows([[5] + vid((2, 2, 4)) + [6]])
    with pytest.raises(ValueError, match=r"video_grid_thw\[0\]=\[2, 2, 2\] needs"):
        get_rope_index(vids, vam, None, np.array([(2, 2, 2)]), **kw)
    with pytest.raises(ValueError, match="second_per_grid_ts: 2 entries for 1 videos"):
        get_rope_index(vids, vam, None, np.array([(2, 2, 4)]), np.array([1.0, 2.0]), **kw)
    with pytest.raises(ValueError, match="video_grid_thw is None"):
        get_rope_index(vids, vam, None, None, **kw)
    # Two images with no separator are one group, in HF as here; HF fails with a shape error.
    ids3, am3 = tiny.make_rows([[5] + [IMG] * 8 + [6]])
    with pytest.raises(ValueError, match="8 consecutive image pad tokens"):
        get_rope_index(ids3, am3, np.array([(1, 4, 4), (1, 4, 4)]), **kw)
    with pytest.raises(RuntimeError):
        hf_rope(hf_model, ids3, am3, np.array([(1, 4, 4), (1, 4, 4)]))


def test_all_padding_row_is_zero():
    ids, am = tiny.make_rows([[5] + img((1, 2, 2)) + [6], [7]])
    am[1] = 0
    pos, deltas = ours(ids, am, np.array([(1, 2, 2)]))
    assert (pos[:, 1] == 0).all() and deltas[1, 0] == 0
