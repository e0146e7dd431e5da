"""CLIP image processing (LLaVA-1.5), step for step as transformers' ``CLIPImageProcessorPil``
(``transformers/models/clip/image_processing_pil_clip.py`` on ``image_processing_backends.PilBackend``,
5.x), so that ``pixel_values`` are bit-identical:

1. convert to RGB (alpha composited on white), as :func:`jaxmm.processing.image.to_channels_first`;
2. resize (PIL, bicubic) so the shorter side is ``shortest_edge`` and the longer
   ``int(shortest_edge · long / short)`` (``image_transforms.get_resize_output_image_size``);
3. center crop to ``crop_size`` (zero-padded first when the image is smaller,
   ``image_transforms.center_crop``);
4. rescale by 1/255 (in float64, then float32) and normalise with the CLIP mean and std.

Output: ``pixel_values`` float32 [n_images, 3, H, W] and, for the layout, each image's patch grid
``(1, H/patch, W/patch)`` as ``image_grid_thw``.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from jaxmm.processing.image import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    image_name,
    pil_resize,
    pixel_inputs,
    read_processor_config,
    to_channels_first,
)


@dataclasses.dataclass(frozen=True)
class ClipImageProcessor:
    """CLIP image processor: PIL images / uint8 arrays -> ``pixel_values`` [n, 3, H, W].

    Fields carry HF's names (``size={"shortest_edge"}`` is ``shortest_edge``, ``crop_size`` is
    ``(height, width)``) with LLaVA-1.5's values as defaults; ``patch_size`` is the vision tower's,
    for the patch grid the layout sees (``tokens_per_image`` tokens per image).
    """

    shortest_edge: int = 336
    crop_size: tuple[int, int] = (336, 336)
    patch_size: int = 14
    image_mean: tuple[float, ...] | float = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] | float = OPENAI_CLIP_STD
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    do_convert_rgb: bool = True
    resample: int = 3

    @classmethod
    def from_pretrained(cls, path: str | Path, patch_size: int = 14) -> "ClipImageProcessor":
        """The processor of a checkpoint directory (``processor_config.json``'s ``image_processor``
        entry, else ``preprocessor_config.json``), with the tower's ``patch_size``.

        Raises:
            FileNotFoundError: neither file exists.
            ValueError: unreadable JSON, or a ``size`` / ``crop_size`` jaxmm does not read (names the file).
        """
        f, d = read_processor_config(path)
        kw = {
            k: d[k]
            for k in (
                "image_mean",
                "image_std",
                "do_resize",
                "do_center_crop",
                "do_rescale",
                "rescale_factor",
                "do_normalize",
                "do_convert_rgb",
                "resample",
            )
            if d.get(k) is not None
        }
        size, crop = d.get("size", {"shortest_edge": cls.shortest_edge}), d.get("crop_size", cls.crop_size)
        if not isinstance(size, dict) or set(size) != {"shortest_edge"}:
            raise ValueError(f"{f}: field 'size' must be {{'shortest_edge': N}} for a CLIP processor, got {size!r}")
        if isinstance(crop, dict):
            crop = (crop.get("height"), crop.get("width"))
        if isinstance(crop, int):
            crop = (crop, crop)
        if not (isinstance(crop, (list, tuple)) and len(crop) == 2 and all(isinstance(v, int) and v > 0 for v in crop)):
            raise ValueError(f"{f}: field 'crop_size' must be {{'height': H, 'width': W}}, got {d.get('crop_size')!r}")
        for k in ("image_mean", "image_std"):
            if isinstance(kw.get(k), list):
                kw[k] = tuple(kw[k])
        return cls(shortest_edge=int(size["shortest_edge"]), crop_size=tuple(crop), patch_size=patch_size, **kw)

    def grid_thw(self, height: int = 0, width: int = 0) -> tuple[int, int, int]:
        """``(1, H/patch, W/patch)`` of the cropped image (any input size gives the same grid)."""
        return 1, self.crop_size[0] // self.patch_size, self.crop_size[1] // self.patch_size

    def num_image_tokens(self, grid_thw) -> int:
        """LLM tokens for one image: ``h · w`` of its patch grid (LLaVA's "default" feature strategy)."""
        _, h, w = (int(v) for v in grid_thw)
        return h * w

    def preprocess_one(self, image: Any, index: int = 0) -> tuple[np.ndarray, tuple[int, int, int]]:
        """One image -> (float32 ``[1, 3, H, W]``, ``(1, H/patch, W/patch)``).

        Raises:
            TypeError, ValueError: as :func:`~jaxmm.processing.image.to_channels_first`, naming the image.
        """
        x = to_channels_first(image, index, self.do_convert_rgb)  # uint8 [C, H, W]
        return self.transform(x, index, image)[None], self.grid_thw()

    def transform(self, x: np.ndarray, index: int = 0, image: Any = None) -> np.ndarray:
        """uint8 ``[C, H, W]`` -> float32 ``[C, crop_h, crop_w]``: resize, center crop, rescale,
        normalise (HF ``PilBackend._preprocess``'s steps); ``index`` and ``image`` name the image in errors.

        Raises:
            ValueError: an empty image, or a result not ``crop_size`` (do_center_crop off).
        """
        c, h, w = x.shape
        if self.do_resize:
            short, long = (w, h) if w <= h else (h, w)
            if short == 0:
                raise ValueError(f"{image_name(index, image)}: empty image ({h}x{w} pixels)")
            new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
            nh, nw = (new_long, new_short) if w <= h else (new_short, new_long)
            x = pil_resize(x, nh, nw, int(self.resample))
        if self.do_center_crop:
            x = center_crop(x, *self.crop_size)
        if self.do_rescale:
            x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            x = x if np.issubdtype(x.dtype, np.floating) else x.astype(np.float32)
            mean = np.broadcast_to(np.asarray(self.image_mean, x.dtype), (c,))[:, None, None]
            std = np.broadcast_to(np.asarray(self.image_std, x.dtype), (c,))[:, None, None]
            x = (x - mean) / std
        x = x.astype(np.float32, copy=False)
        if x.shape[1:] != tuple(self.crop_size):
            raise ValueError(
                f"{image_name(index, image)}: processed to {x.shape[1]}x{x.shape[2]} pixels, the "
                f"vision tower takes {self.crop_size[0]}x{self.crop_size[1]} (enable do_center_crop)"
            )
        return x

    def __call__(self, images: Any) -> dict[str, np.ndarray]:
        """Images -> ``{"pixel_values": float32 [n, 3, H, W], "image_grid_thw": int64 [n, 3]}``."""
        if isinstance(images, Image.Image) or (isinstance(images, np.ndarray) and images.ndim in (2, 3)):
            images = [images]
        elif not isinstance(images, Sequence) or isinstance(images, (str, bytes)):
            raise TypeError(f"expected an image or a list of images, got {type(images).__name__}")
        if len(images) == 0:
            raise ValueError("no images given")
        pixels, grids = zip(*(self.preprocess_one(im, i) for i, im in enumerate(images)))
        return pixel_inputs(pixels, grids)


def center_crop(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """``[C, H, W]`` -> ``[C, height, width]`` around the centre, zero-padded (centred) first where the
    image is smaller (``image_transforms.center_crop``)."""
    _, h, w = x.shape
    top, left = (h - height) // 2, (w - width) // 2
    if top >= 0 and left >= 0 and top + height <= h and left + width <= w:
        return x[:, top : top + height, left : left + width]
    nh, nw = max(height, h), max(width, w)
    out = np.zeros(x.shape[:-2] + (nh, nw), x.dtype)
    tp, lp = math.ceil((nh - h) / 2), math.ceil((nw - w) / 2)
    out[:, tp : tp + h, lp : lp + w] = x
    top, left = top + tp, left + lp
    return out[:, max(0, top) : min(nh, top + height), max(0, left) : min(nw, left + width)]
