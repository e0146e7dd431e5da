"""Qwen2-VL-family image preprocessing on the host (numpy + PIL).

Mirrors ``transformers/models/qwen2_vl/image_processing_pil_qwen2_vl.py`` (``Qwen2VLImageProcessorPil``,
transformers 5.x) and the helpers it calls in ``image_transforms.py``, step for step, so that
``pixel_values`` and ``image_grid_thw`` are bit-identical:

1. RGB conversion: images with an alpha channel are composited onto white, others ``convert("RGB")``
   (grayscale is replicated to three channels);
2. ``smart_resize`` to multiples of ``patch_size·merge_size`` (28) with the pixel count clamped to
   [min_pixels, max_pixels], resampled by PIL (bicubic by default) on uint8;
3. rescale by 1/255 (in float64, then float32) and normalise per channel with the CLIP mean/std;
4. patchify: the temporal axis is the image repeated ``temporal_patch_size`` times, patches ordered
   merge-block-major (each 2x2 block of patches consecutive), each flattened as (C, T, P, P).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_RESAMPLE = {0: Image.NEAREST, 1: Image.LANCZOS, 2: Image.BILINEAR, 3: Image.BICUBIC, 4: Image.BOX, 5: Image.HAMMING}


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 14 * 14 * 4 * 1280) -> tuple[int, int]:
    """Target (height, width): multiples of ``factor``, pixel count within [min_pixels, max_pixels],
    aspect ratio kept as closely as possible (HF ``smart_resize``).

    Raises:
        ValueError: if the aspect ratio exceeds 200.
    """
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image of {width}x{height} pixels: absolute aspect ratio must be smaller than 200, "
                         f"got {max(height, width) / min(height, width)}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def to_rgb(image, index: int = 0) -> Image.Image:
    """A PIL image or a uint8 numpy array (HW, HW1, HW3, HW4) -> RGB PIL image (alpha over white)."""
    if isinstance(image, np.ndarray):
        a = image
        if a.ndim == 3 and a.shape[-1] == 1:
            a = a[..., 0]
        if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
            raise ValueError(f"image {index}: expected an array of shape (H, W), (H, W, 3) or (H, W, 4), got {a.shape}")
        if a.dtype != np.uint8:
            raise ValueError(f"image {index}: expected uint8 pixels, got {a.dtype} (convert to 0..255 uint8 first)")
        image = Image.fromarray(a)
    if not isinstance(image, Image.Image):
        raise TypeError(f"image {index}: expected a PIL image or a numpy array, got {type(image).__name__}")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


@dataclasses.dataclass(frozen=True)
class ImageProcessor:
    """Qwen2-VL image processor (fields as HF names them; ``min_pixels``/``max_pixels`` are HF 5's
    ``size["shortest_edge"]``/``size["longest_edge"]``)."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    do_convert_rgb: bool = True
    resample: int = 3  # PIL bicubic

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ImageProcessor":
        """Reads ``preprocessor_config.json`` (HF 5 ``size`` dict or legacy ``min_pixels``/``max_pixels``).

        Raises:
            FileNotFoundError: no preprocessor_config.json at ``path``.
            ValueError: a field of the wrong type or value, naming the file and field.
        """
        p = Path(path)
        f = p / "preprocessor_config.json" if p.is_dir() else p
        if not f.exists():
            raise FileNotFoundError(f"no preprocessor_config.json in {p}")
        d = json.loads(f.read_text())
        kw = {}
        size = d.get("size") or {}
        for key, field in (("shortest_edge", "min_pixels"), ("longest_edge", "max_pixels")):
            if key in size:
                kw[field] = size[key]
        for fld in dataclasses.fields(cls):
            if fld.name in d and fld.name not in kw:
                kw[fld.name] = d[fld.name]
        for name in ("image_mean", "image_std"):
            if name in kw:
                kw[name] = tuple(float(x) for x in kw[name])
        for name in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size", "resample"):
            if name in kw and (not isinstance(kw[name], int) or kw[name] < 0):
                raise ValueError(f"{f}: field {name!r} must be a non-negative integer, got {kw[name]!r}")
        if "resample" in kw and kw["resample"] not in _RESAMPLE:
            raise ValueError(f"{f}: field 'resample' must be a PIL filter id 0-5, got {kw['resample']}")
        return cls(**kw)

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def num_image_tokens(self, grid_thw) -> int:
        """Merged tokens the LLM sees for an image of ``grid_thw`` (t·h·w / merge²)."""
        t, h, w = (int(x) for x in grid_thw)
        return t * h * w // self.merge_size ** 2

    def preprocess_one(self, image, index: int = 0) -> tuple[np.ndarray, tuple[int, int, int]]:
        """One image -> (patches float32 [h·w, C·T·P·P], (1, h, w) in patches)."""
        img = to_rgb(image, index) if self.do_convert_rgb else image
        if self.do_resize:
            w0, h0 = img.size
            try:
                h, w = smart_resize(h0, w0, self.factor, self.min_pixels, self.max_pixels)
            except ValueError as e:
                raise ValueError(f"image {index}: {e}") from None
            img = img.resize((w, h), resample=_RESAMPLE[self.resample])
        x = np.moveaxis(np.array(img), -1, 0)                                  # [C,H,W] uint8
        c, hh, ww = x.shape
        if hh % self.factor or ww % self.factor:
            raise ValueError(f"image {index}: {ww}x{hh} pixels is not a multiple of {self.factor} "
                             f"(enable do_resize)")
        if self.do_rescale:
            x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            x = x.astype(np.float32) if not np.issubdtype(x.dtype, np.floating) else x
            mean = np.array(self.image_mean, dtype=x.dtype)
            std = np.array(self.image_std, dtype=x.dtype)
            x = ((x.T - mean) / std).T
        x = np.asarray(x, np.float32)
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        gh, gw = hh // p, ww // p
        x = x.reshape(c, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)   # (gh,gw,mh,mw,C,ph,pw)
        x = np.broadcast_to(x[:, :, :, :, :, None], x.shape[:5] + (t,) + x.shape[5:])
        return x.reshape(gh * gw, c * t * p * p), (1, gh, gw)

    def __call__(self, images: Sequence) -> dict[str, np.ndarray]:
        """Images (PIL or uint8 numpy) -> ``pixel_values`` float32 [N, C·T·P·P] (all images'
        patches concatenated) and ``image_grid_thw`` int64 [n_images, 3]."""
        if isinstance(images, (Image.Image, np.ndarray)):
            images = [images]
        if not len(images):
            raise ValueError("no images given")
        patches, grids = zip(*(self.preprocess_one(im, i) for i, im in enumerate(images)))
        return {"pixel_values": np.concatenate(patches, 0), "image_grid_thw": np.array(grids, np.int64)}
