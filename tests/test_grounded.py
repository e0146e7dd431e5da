"""The grounded generator's style knobs: shape size, background contrast, validation."""

import numpy as np
import pytest

from jaxmm.data.grounded import make_sample
from jaxmm.eval import benchmarks as B


def test_default_style_is_the_original_benchmark_and_knobs_change_it():
    a = make_sample(3, 1, (112, 112), "recognition")
    b = make_sample(3, 1, (112, 112), "recognition", shape_scale=0.2, contrast=1.0)
    assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"])) and a["box"] == b["box"]
    big = make_sample(3, 1, (112, 112), "recognition", shape_scale=0.35)
    x0, y0, x1, y1 = big["box"]
    assert (x1 - x0, y1 - y0) == (39, 39) and a["box"][2] - a["box"][0] == 22
    flat = np.asarray(make_sample(3, 1, (112, 112), "counting", contrast=0.0)["image"], np.int64)
    # at contrast 0 the photo is mid-grey: outside the drawn shapes every pixel is (128, 128, 128)
    grey = np.all(flat == 128, -1)
    assert grey.mean() > 0.5
    half = np.asarray(make_sample(3, 1, (112, 112), "counting", contrast=0.5)["image"], np.float64)
    full = np.asarray(make_sample(3, 1, (112, 112), "counting")["image"], np.float64)
    np.testing.assert_allclose(half[grey], 0.5 * full[grey] + 64, atol=1.0)


def test_bad_style_is_refused_with_the_field_named():
    with pytest.raises(ValueError, match="shape_scale"):
        make_sample(0, 0, (112, 112), shape_scale=0.9)
    with pytest.raises(ValueError, match="contrast"):
        make_sample(0, 0, (112, 112), contrast=2.0)
    with pytest.raises(ValueError, match="unknown field"):
        B.load("grounded", limit=2, image_size=112, shape_sclae=0.3)
    ds = B.load("grounded", limit=2, seed=1, image_size=112, shape_scale=0.35, contrast=0.5)
    s = ds[0]
    ref = make_sample(0, 1, (112, 112), shape_scale=0.35, contrast=0.5)
    assert s["answer"] == ref["answer"] and np.array_equal(np.asarray(s["image"]), np.asarray(ref["image"]))
