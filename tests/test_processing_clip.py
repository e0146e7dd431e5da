"""jaxmm's CLIP image processor (LLaVA-1.5) against transformers' CLIPImageProcessorPil: bit-identical
pixel_values on real photos (RGB, greyscale, RGBA; landscape and portrait), the zero-padded crop of
small images, and the settings read from a saved preprocessor_config.json."""

import numpy as np
import pytest

import tiny
from jaxmm.processing.clip_image import ClipImageProcessor


def hf(**kw):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(**kw)


@pytest.mark.parametrize("edge,crop", [(336, (336, 336)), (56, (56, 56)), (40, (48, 64))])
def test_pixel_values_bit_identical(edge, crop):
    ref = hf(size={"shortest_edge": edge}, crop_size={"height": crop[0], "width": crop[1]})
    mine = ClipImageProcessor(shortest_edge=edge, crop_size=crop)
    photos = tiny.photos()
    for name in ("astronaut", "camera", "logo", "rocket", "coffee"):
        want = ref(photos[name], return_tensors="np")["pixel_values"]
        got = mine([photos[name]])["pixel_values"]
        assert got.dtype == np.float32 and got.shape == want.shape, name
        np.testing.assert_array_equal(got, want, err_msg=name)
    arr = np.asarray(photos["chelsea"])[:50, :90]  # a uint8 array, smaller than some crops
    np.testing.assert_array_equal(mine([arr])["pixel_values"], ref(arr, return_tensors="np")["pixel_values"])


def test_from_pretrained_reads_the_saved_config(tmp_path):
    ref = hf(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}, image_mean=[0.5, 0.5, 0.5])
    ref.save_pretrained(tmp_path)
    mine = ClipImageProcessor.from_pretrained(tmp_path, patch_size=14)
    assert (mine.shortest_edge, mine.crop_size, mine.image_mean, mine.grid_thw()) == (56, (56, 56), (0.5,) * 3, (1, 4, 4))
    photo = tiny.photos()["chelsea"]
    np.testing.assert_array_equal(mine([photo])["pixel_values"], ref(photo, return_tensors="np")["pixel_values"])
    (tmp_path / "preprocessor_config.json").write_text('{"size": {"height": 5, "width": 5}}')
    with pytest.raises(ValueError, match=r"preprocessor_config.json: field 'size' must be \{'shortest_edge'"):
        ClipImageProcessor.from_pretrained(tmp_path)
