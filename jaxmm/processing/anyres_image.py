"""LLaVA-NeXT's any-resolution image processing, step for step as transformers'
``LlavaNextImageProcessorPil`` (``transformers/models/llava_next/image_processing_pil_llava_next.py``
on ``image_processing_backends.PilBackend``, 5.x), so that ``pixel_values`` are bit-identical, and
the image-token count of ``LlavaNextProcessor`` (``processing_llava_next.py``):

1. convert to RGB, as :func:`jaxmm.processing.image.to_channels_first`;
2. pick the best resolution ``(bh, bw)`` of ``image_grid_pinpoints``
   (:func:`select_best_resolution`, ``image_processing_utils.select_best_resolution``); resize (PIL,
   bicubic) to fit inside it keeping the aspect ratio (``get_patch_output_size``), zero-pad it
   centred to ``(bh, bw)`` and cut it into ``crop_size`` tiles, row-major (``divide_to_patches``);
3. in front of the tiles, the whole image resized (not keeping the aspect ratio) to
   ``shortest_edge``²: the base image;
4. every tile and the base image then go through the CLIP steps (:meth:`ClipImageProcessor.transform`:
   resize, center crop, rescale, normalise).

Output of one image: ``pixel_values`` float32 [1 + tiles, 3, S, S] and, as its ``image_grid_thw``
row, ``(1 + tiles, height, width)``: the number of tiles with the base image, and the original
image's size in pixels, which the model needs to unpad the tiles' features (HF's ``image_sizes``).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np

from jaxmm.processing.clip_image import ClipImageProcessor
from jaxmm.processing.image import image_name, pil_resize, read_processor_config, to_channels_first

#: LlavaNextImageProcessorPil's image_grid_pinpoints
DEFAULT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


def select_best_resolution(original_size: tuple[int, int], possible_resolutions) -> tuple[int, int]:
    """The ``(height, width)`` of ``possible_resolutions`` that keeps most of the image's pixels
    when it is scaled to fit, and among those wastes the fewest (``image_processing_utils``)."""
    original_height, original_width = original_size
    best_fit, max_effective, min_wasted = None, 0, float("inf")
    for height, width in possible_resolutions:
        scale = min(width / original_width, height / original_height)
        downscaled_width, downscaled_height = int(original_width * scale), int(original_height * scale)
        effective = min(downscaled_width * downscaled_height, original_width * original_height)
        wasted = width * height - effective
        if effective > max_effective or (effective == max_effective and wasted < min_wasted):
            max_effective, min_wasted, best_fit = effective, wasted, (height, width)
    return best_fit


def patch_output_size(height: int, width: int, target: tuple[int, int]) -> tuple[int, int]:
    """Size ``(h, w)`` of an image resized to fit inside ``target`` keeping its aspect ratio
    (``image_processing_utils.get_patch_output_size``)."""
    target_height, target_width = target
    scale_w, scale_h = target_width / width, target_height / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_height), target_width
    return target_height, min(math.ceil(width * scale_h), target_width)


def unpadded_extent(height: int, width: int, rows: int, cols: int) -> tuple[int, int, int, int]:
    """The part of a ``rows × cols`` feature grid (the tiles' patches side by side) that holds the
    image and not the padding: half-open ``(row0, row1, col0, col1)``, as ``unpad_image`` of
    ``modeling_llava_next.py`` (and ``LlavaNextProcessor._get_unpadded_features``) computes it for an
    original image of ``height × width`` pixels."""
    if width / height > cols / rows:
        new_height = int(round(height * (cols / width), 7))
        pad = (rows - new_height) // 2
        return pad, rows - pad, 0, cols
    new_width = int(round(width * (rows / height), 7))
    pad = (cols - new_width) // 2
    return 0, rows, pad, cols - pad


def anyres_tokens(height: int, width: int, pinpoints, tile: int, grid: int) -> tuple[int, int, int]:
    """``(tiles, rows, cols)`` for an image of ``height × width`` pixels: the number of tiles
    (without the base image) of ``tile`` pixels at the best of ``pinpoints``, and the unpadded
    feature grid of ``grid`` patches per tile side. The image's LLM tokens are
    ``grid² + rows · (cols + 1)`` (base image, then each row of the grid and an ``image_newline``)."""
    bh, bw = select_best_resolution((height, width), pinpoints)
    th, tw = -(-bh // tile), -(-bw // tile)
    r0, r1, c0, c1 = unpadded_extent(height, width, th * grid, tw * grid)
    return th * tw, r1 - r0, c1 - c0


@dataclasses.dataclass(frozen=True)
class AnyResImageProcessor(ClipImageProcessor):
    """LLaVA-NeXT image processor: PIL images / uint8 arrays -> tiles ``[1 + tiles, 3, S, S]`` per
    image. Fields as :class:`ClipImageProcessor` (HF's names, LLaVA-NeXT's values as defaults) and
    ``image_grid_pinpoints`` (``(height, width)`` pixel sizes)."""

    image_grid_pinpoints: tuple[tuple[int, int], ...] = DEFAULT_PINPOINTS

    @classmethod
    def from_pretrained(cls, path: str | Path, patch_size: int = 14) -> "AnyResImageProcessor":
        """The processor of a checkpoint directory (as :meth:`ClipImageProcessor.from_pretrained`),
        with its ``image_grid_pinpoints``.

        Raises:
            FileNotFoundError: no processor config.
            ValueError: unreadable JSON, a ``size`` / ``crop_size`` jaxmm does not read, or
                ``image_grid_pinpoints`` that are not ``[height, width]`` pairs of multiples of the
                crop size (names the file).
        """
        base = super().from_pretrained(path, patch_size)
        f, d = read_processor_config(path)
        pins = d.get("image_grid_pinpoints", DEFAULT_PINPOINTS)
        ok = (
            isinstance(pins, (list, tuple))
            and len(pins) > 0
            and all(isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(v, int) and v > 0 for v in p) for p in pins)
        )
        if not ok or any(h % base.crop_size[0] or w % base.crop_size[1] for h, w in pins):
            raise ValueError(
                f"{f}: field 'image_grid_pinpoints' must be a list of [height, width] pixel sizes, "
                f"multiples of crop_size {list(base.crop_size)}, got {pins!r}"
            )
        return dataclasses.replace(base, image_grid_pinpoints=tuple((int(h), int(w)) for h, w in pins))

    @property
    def grid(self) -> int:
        """Patches per tile side."""
        return self.crop_size[0] // self.patch_size

    def num_image_tokens(self, grid_thw) -> int:
        """LLM tokens for one image, from its ``(1 + tiles, height, width)`` row:
        ``grid² + rows · (cols + 1)`` (``LlavaNextProcessor._get_number_of_features`` with the
        "default" feature strategy)."""
        _, h, w = (int(v) for v in grid_thw)
        _, rows, cols = anyres_tokens(h, w, self.image_grid_pinpoints, self.crop_size[0], self.grid)
        return self.grid**2 + rows * (cols + 1)

    def preprocess_one(self, image: Any, index: int = 0) -> tuple[np.ndarray, tuple[int, int, int]]:
        """One image -> (float32 ``[1 + tiles, 3, S, S]``, ``(1 + tiles, height, width)``).

        Raises:
            TypeError, ValueError: as :func:`~jaxmm.processing.image.to_channels_first`, and for an
                empty image, naming the image.
        """
        x = to_channels_first(image, index, self.do_convert_rgb)  # uint8 [C, H, W]
        c, h, w = x.shape
        if h == 0 or w == 0:
            raise ValueError(f"{image_name(index, image)}: empty image ({h}x{w} pixels)")
        best = select_best_resolution((h, w), self.image_grid_pinpoints)
        nh, nw = patch_output_size(h, w, best)
        resized = pil_resize(x, nh, nw, int(self.resample))
        (top, left) = ((best[0] - nh) // 2, (best[1] - nw) // 2)
        padded = np.zeros((c,) + tuple(best), x.dtype)
        padded[:, top : top + nh, left : left + nw] = resized
        th = tw = self.crop_size[0]  # HF: divide_to_patches(crop_size.height), square tiles
        tiles = [padded[:, i : i + th, j : j + tw] for i in range(0, best[0], th) for j in range(0, best[1], tw)]
        base = pil_resize(x, self.shortest_edge, self.shortest_edge, int(self.resample))
        out = np.stack([self.transform(t, index, image) for t in [base] + tiles])
        return out, (len(out), h, w)

    def __call__(self, images: Any) -> dict[str, np.ndarray]:
        """Images -> ``{"pixel_values": float32 [Σ (1 + tiles), 3, S, S], "image_grid_thw": int64 [n, 3]}``
        (each image's tiles in turn; rows ``(1 + tiles, height, width)``)."""
        return super().__call__(images)


__all__ = ["AnyResImageProcessor", "select_best_resolution", "patch_output_size", "unpadded_extent", "anyres_tokens"]
