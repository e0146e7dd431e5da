"""jaxmm's image processor against transformers' Qwen2VLImageProcessorPil, on real photos."""

import json

import numpy as np
import pytest
from PIL import Image

import tiny
from jaxmm.processing.image import ImageProcessor, smart_resize


def hf(min_pixels, max_pixels):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)


SETTINGS = [(56 * 56, 224 * 224), (28 * 28 * 4, 112 * 112), (448 * 448, 896 * 896)]  # shrink, tiny, enlarge


@pytest.mark.parametrize("name", ["astronaut", "chelsea", "coffee", "rocket", "camera", "logo"])
@pytest.mark.parametrize("pixels", SETTINGS[:2])
def test_each_photo_matches_transformers(name, pixels):
    img = tiny.photos()[name]
    ref = hf(*pixels)([img], return_tensors="np")
    out = ImageProcessor(min_pixels=pixels[0], max_pixels=pixels[1])([img])
    np.testing.assert_array_equal(out["image_grid_thw"], ref["image_grid_thw"])
    assert out["pixel_values"].dtype == np.float32
    np.testing.assert_array_equal(out["pixel_values"], ref["pixel_values"])


def test_modes_and_batches_match_transformers():
    photos = tiny.photos()
    assert photos["camera"].mode == "L" and photos["logo"].mode == "RGBA"
    batch = [photos["rocket"], photos["camera"], photos["logo"], photos["chelsea"].convert("P"),
             photos["coffee"].resize((61, 300))]                  # palette image, extreme-ish aspect ratio
    ref = hf(*SETTINGS[0])(batch, return_tensors="np")
    out = ImageProcessor(min_pixels=SETTINGS[0][0], max_pixels=SETTINGS[0][1])(batch)
    np.testing.assert_array_equal(out["image_grid_thw"], ref["image_grid_thw"])
    np.testing.assert_array_equal(out["pixel_values"], ref["pixel_values"])
    assert len({tuple(g) for g in out["image_grid_thw"].tolist()}) >= 3   # several sizes in one batch


def test_enlarging_small_image_and_numpy_input():
    img = tiny.photos()["astronaut"].resize((64, 48))
    ref = hf(*SETTINGS[2])([img], return_tensors="np")
    out = ImageProcessor(min_pixels=SETTINGS[2][0], max_pixels=SETTINGS[2][1])([np.array(img)])
    np.testing.assert_array_equal(out["image_grid_thw"], ref["image_grid_thw"])
    np.testing.assert_array_equal(out["pixel_values"], ref["pixel_values"])


def test_smart_resize_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    for h, w in [(300, 451), (28, 28), (10, 1000), (1080, 1920), (33, 57)]:
        for mn, mx in SETTINGS:
            assert smart_resize(h, w, 28, mn, mx) == hf_smart_resize(h, w, 28, mn, mx)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 3000)


def test_from_pretrained_reads_both_layouts(tmp_path):
    hf(28 * 28 * 4, 112 * 112).save_pretrained(tmp_path / "v5")
    p = ImageProcessor.from_pretrained(tmp_path / "v5")
    assert (p.min_pixels, p.max_pixels) == (28 * 28 * 4, 112 * 112)
    (tmp_path / "legacy").mkdir()
    (tmp_path / "legacy" / "preprocessor_config.json").write_text(json.dumps(
        {"min_pixels": 3136, "max_pixels": 50176, "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2}))
    p = ImageProcessor.from_pretrained(tmp_path / "legacy")
    assert (p.min_pixels, p.max_pixels) == (3136, 50176)
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        ImageProcessor.from_pretrained(tmp_path)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "preprocessor_config.json").write_text(json.dumps({"patch_size": "14"}))
    with pytest.raises(ValueError, match="patch_size"):
        ImageProcessor.from_pretrained(tmp_path / "bad")


def test_bad_images_are_named_by_index():
    proc = ImageProcessor()
    ok = np.zeros((56, 56, 3), np.uint8)
    with pytest.raises(ValueError, match="image 1"):
        proc([ok, np.zeros((56, 56, 2), np.uint8)])
    with pytest.raises(ValueError, match="image 0.*uint8"):
        proc([np.zeros((56, 56, 3), np.float32)])
    with pytest.raises(TypeError, match="image 1"):
        proc([ok, "photo.png"])
    with pytest.raises(ValueError, match="image 0.*aspect ratio"):
        proc([Image.new("RGB", (5000, 10))])
