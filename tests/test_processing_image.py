"""jaxmm.processing.image against transformers' Qwen2VLImageProcessorPil, on real photos.

Every comparison is exact (``assert_array_equal``): the pipeline is PIL on uint8 followed by the same
float64 -> float32 rescale and float32 normalise as HF, so there is no rounding freedom.
"""

import json
import warnings

import numpy as np
import pytest
from PIL import Image

from jaxmm.processing.image import ImageProcessor, smart_resize

SHRINK = (56 * 56, 224 * 224)  # the photos (300..1000 px a side) shrink
TINY = (28 * 28 * 4, 112 * 112)  # a few merge blocks per image
ENLARGE = (448 * 448, 896 * 896)  # small inputs grow


def hf_processor(min_pixels, max_pixels, **kw):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels, **kw)


def hf_run(proc, images):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = proc(images, return_tensors="np")
    return out["pixel_values"], out["image_grid_thw"]


_PHOTOS = {}


def photo(name) -> Image.Image:
    """skimage.data photos: astronaut 512x512, chelsea 300x451, coffee 400x600, rocket 427x640,
    hubble_deep_field 872x1000 (RGB), camera 512x512 (L), logo 500x500 (RGBA, opaque)."""
    if name not in _PHOTOS:
        from skimage import data

        _PHOTOS[name] = Image.fromarray(getattr(data, name)())
    return _PHOTOS[name]


def translucent(name="chelsea") -> Image.Image:
    """An RGBA photo whose alpha runs 0..255 across and down (exercises the blend onto white)."""
    rgb = np.array(photo(name).convert("RGB"))
    h, w = rgb.shape[:2]
    alpha = ((np.arange(h)[:, None] * 7 + np.arange(w)[None, :] * 3) % 256).astype(np.uint8)
    return Image.fromarray(np.dstack([rgb, alpha]))


def assert_same(images, pixels, ours_images=None, **kw):
    ref_pv, ref_grid = hf_run(hf_processor(*pixels, **kw), images)
    proc_kw = {k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()}
    out = ImageProcessor(min_pixels=pixels[0], max_pixels=pixels[1], **proc_kw)(images if ours_images is None else ours_images)
    assert out["pixel_values"].dtype == np.float32 and out["image_grid_thw"].dtype == np.int64
    np.testing.assert_array_equal(out["image_grid_thw"], ref_grid)
    np.testing.assert_array_equal(out["pixel_values"], ref_pv)
    return out


PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "camera", "logo"]


@pytest.mark.parametrize("name", PHOTOS)
@pytest.mark.parametrize("pixels", [SHRINK, TINY], ids=["shrink", "tiny"])
def test_photo_matches_transformers(name, pixels):
    out = assert_same([photo(name)], pixels)
    t, h, w = out["image_grid_thw"][0]
    assert out["pixel_values"].shape == (t * h * w, 3 * 2 * 14 * 14)


def test_enlarging_matches_transformers():
    small = photo("rocket").resize((90, 60))
    assert_same([small], ENLARGE)
    assert_same([Image.new("RGB", (1, 1), (200, 10, 30))], TINY)  # 1x1 grows to 56x56


def test_modes_match_transformers():
    """Grayscale (L), RGBA with real transparency, LA, palette with and without a transparent colour."""
    gray = photo("camera")
    rgba = translucent()
    pal_t = photo("coffee").convert("P")
    pal_t.info["transparency"] = 0
    images = [gray, rgba, rgba.convert("LA"), photo("chelsea").convert("P"), pal_t]
    assert_same(images, SHRINK)


def test_numpy_inputs_match_transformers():
    """uint8 arrays HWC (RGB, RGBA blended numerically), HW1, and HW (jaxmm only: HF refuses 2-D arrays in
    a list; compared with HF's HW1 result). The array RGBA blend equals HF's PIL path too."""
    rgb = np.array(photo("rocket"))
    rgba = np.array(translucent("coffee"))
    gray = np.array(photo("camera"))
    hf_in = [rgb, rgba, gray[..., None]]
    ours_in = [rgb, rgba, gray]
    out = assert_same(hf_in, SHRINK, ours_in)
    pil = ImageProcessor(*SHRINK)([photo("rocket"), translucent("coffee"), photo("camera")])
    np.testing.assert_array_equal(out["pixel_values"], pil["pixel_values"])


def test_batch_of_different_sizes_is_concatenated_in_order():
    names = ["hubble_deep_field", "chelsea", "camera", "rocket", "logo"]
    images = [photo(n) for n in names] + [photo("coffee").resize((61, 300))]  # tall, aspect ratio ~4.9
    out = assert_same(images, SHRINK)
    grids = out["image_grid_thw"]
    assert len({tuple(g) for g in grids.tolist()}) >= 4
    proc = ImageProcessor(*SHRINK)
    offsets = np.concatenate([[0], np.cumsum(grids.prod(1))])
    for i, im in enumerate(images):
        one = proc([im])
        np.testing.assert_array_equal(out["pixel_values"][offsets[i] : offsets[i + 1]], one["pixel_values"])
        assert proc.num_image_tokens(grids[i]) == grids[i].prod() // 4
        assert proc.grid_thw(im.height, im.width) == tuple(grids[i])


def test_non_default_settings_match_transformers():
    """Qwen3-VL's patch 16 / mean 0.5, bilinear resampling, and rescale or normalise switched off."""
    img = [photo("astronaut"), photo("chelsea")]
    assert_same(img, (32 * 32 * 4, 128 * 128 * 2), patch_size=16, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    assert_same(img, TINY, resample=2)
    assert_same(img, TINY, do_normalize=False)
    assert_same(img, TINY, do_rescale=False)
    assert_same([photo("camera").resize((56, 84))], TINY, do_resize=False)


def test_smart_resize_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    sizes = [(300, 451), (28, 28), (10, 1000), (1080, 1920), (33, 57), (1, 1), (14, 42), (4000, 3000)]
    for h, w in sizes:
        for factor in (28, 32):
            for mn, mx in (SHRINK, TINY, ENLARGE, (56 * 56, 28 * 28 * 1280)):
                assert smart_resize(h, w, factor, mn, mx) == hf_smart_resize(h, w, factor, mn, mx)
    with pytest.raises(ValueError, match="aspect ratio must be smaller than 200.*height 10 and width 3000"):
        smart_resize(10, 3000)


def test_from_pretrained_reads_what_transformers_saves(tmp_path):
    """HF 5 writes size={shortest_edge, longest_edge}; the bicubic/mean/std fields round-trip."""
    hf_processor(*TINY, patch_size=16, image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=2).save_pretrained(tmp_path)
    assert "size" in json.loads((tmp_path / "preprocessor_config.json").read_text())
    p = ImageProcessor.from_pretrained(tmp_path)
    assert p == ImageProcessor(*TINY, patch_size=16, image_mean=(0.5,) * 3, image_std=(0.5,) * 3, resample=2)
    assert ImageProcessor.from_pretrained(tmp_path / "preprocessor_config.json") == p


@pytest.mark.parametrize(
    "config, expected",
    [
        ({"min_pixels": 3136, "max_pixels": 50176}, (3136, 50176)),  # Qwen2.5-VL hub files
        (
            {"min_pixels": 3136, "max_pixels": 50176, "size": {"min_pixels": 3136, "max_pixels": 50176}},
            (3136, 50176),
        ),  # Qwen2-VL hub files
        (
            {"min_pixels": 5000, "max_pixels": 60000, "size": {"shortest_edge": 1000, "longest_edge": 20000}},
            (5000, 60000),
        ),  # top-level keys win
        ({"max_pixels": 20000}, (56 * 56, 20000)),  # other one: default
        ({}, (56 * 56, 28 * 28 * 1280)),
    ],
    ids=["legacy", "qwen2vl", "both", "partial", "empty"],
)
def test_from_pretrained_pixel_bounds_as_transformers(tmp_path, config, expected):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    config = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
        "patch_size": 14,
        "merge_size": 2,
        "temporal_patch_size": 2,
        **config,
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    p = ImageProcessor.from_pretrained(tmp_path)
    ref = Qwen2VLImageProcessorPil.from_pretrained(tmp_path)
    assert (p.min_pixels, p.max_pixels) == expected == (ref.size["shortest_edge"], ref.size["longest_edge"])


def test_from_pretrained_prefers_nested_processor_config(tmp_path):
    """transformers 5 processors may save the image processor inside processor_config.json; HF reads that
    first."""
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"min_pixels": 3136, "max_pixels": 50176}))
    (tmp_path / "processor_config.json").write_text(
        json.dumps({"image_processor": {"size": {"shortest_edge": 1000, "longest_edge": 20000}}, "processor_class": "x"})
    )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    ref = Qwen2VLImageProcessorPil.from_pretrained(tmp_path)
    p = ImageProcessor.from_pretrained(tmp_path)
    assert (p.min_pixels, p.max_pixels) == (1000, 20000) == (ref.size["shortest_edge"], ref.size["longest_edge"])


def test_from_pretrained_errors_name_file_and_field(tmp_path):
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        ImageProcessor.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        ImageProcessor.from_pretrained(tmp_path / "nothing.json")
    f = tmp_path / "preprocessor_config.json"
    for config, field in [
        ({"patch_size": "14"}, "patch_size"),
        ({"min_pixels": -1}, "min_pixels"),
        ({"do_resize": "yes"}, "do_resize"),
        ({"resample": "bicubic"}, "resample"),
        ({"image_mean": [0.5, "a", 0.5]}, "image_mean"),
        ({"image_std": [0, 1, 1]}, "image_std"),
        ({"size": {"longest_edge": 20000}}, "size"),
        ({"size": 224}, "size"),
        ({"rescale_factor": 0}, "rescale_factor"),
    ]:
        f.write_text(json.dumps(config))
        with pytest.raises(ValueError, match=f"preprocessor_config.json: field '{field}'"):
            ImageProcessor.from_pretrained(tmp_path)
    f.write_text("{not json")
    with pytest.raises(ValueError, match="preprocessor_config.json: not valid JSON"):
        ImageProcessor.from_pretrained(tmp_path)


def test_bad_images_are_named_by_index():
    proc = ImageProcessor(*TINY)
    ok = np.zeros((56, 56, 3), np.uint8)
    with pytest.raises(ValueError, match=r"image 1: expected an array of shape .* got shape \(56, 56, 2\)"):
        proc([ok, np.zeros((56, 56, 2), np.uint8)])
    with pytest.raises(ValueError, match=r"image 0: expected an array of shape .* got shape \(3, 56, 56, 2\)"):
        proc([np.zeros((3, 56, 56, 2), np.uint8)])
    with pytest.raises(ValueError, match="image 0: expected uint8 pixels.*float32"):
        proc([np.zeros((56, 56, 3), np.float32)])
    with pytest.raises(TypeError, match="image 2: expected a PIL image or a numpy array, got str"):
        proc([ok, ok, "photo.png"])
    with pytest.raises(ValueError, match="image 1: absolute aspect ratio.*height 10 and width 5000"):
        proc([ok, Image.new("RGB", (5000, 10))])
    with pytest.raises(ValueError, match="image 0: .*empty"):
        proc([np.zeros((0, 5, 3), np.uint8)])
    with pytest.raises(ValueError, match="image 1: height 20 and width 56 must be positive multiples of 28"):
        ImageProcessor(do_resize=False)([ok, np.zeros((20, 56, 3), np.uint8)])
    with pytest.raises(ValueError, match="image 0: has 1 channels but image_mean has 3"):
        ImageProcessor(do_convert_rgb=False)([photo("camera")])
    with pytest.raises(ValueError, match="no images"):
        proc([])
