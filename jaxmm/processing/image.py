"""Qwen2-VL-family image preprocessing on the host (numpy + PIL).

Mirrors transformers 5.x ``Qwen2VLImageProcessorPil``
(``transformers/models/qwen2_vl/image_processing_pil_qwen2_vl.py``) together with the helpers it calls
(``image_processing_backends.PilBackend`` and ``image_transforms.convert_to_rgb / resize / rescale /
normalize``), step for step, so that ``pixel_values`` and ``image_grid_thw`` are bit-identical. Qwen2.5-VL
and Qwen3-VL checkpoints use the same processor (Qwen3-VL with ``patch_size=16`` and mean = std = 0.5).

Per image:

1. RGB conversion (``do_convert_rgb``), as HF's ``convert_to_rgb``:
   PIL images with an alpha band (RGBA, LA, PA, ...) or a ``transparency`` entry (P/L with a transparent
   colour) are composited onto opaque white with ``Image.alpha_composite``; all others use
   ``image.convert("RGB")`` (grayscale is replicated to three channels, palettes are looked up).
   uint8 arrays: one channel is repeated three times; four channels are blended onto white in float64,
   ``round(a/255 * rgb + (1 - a/255) * 255)`` (this equals PIL's ``alpha_composite`` for every
   (value, alpha) pair); three channels are kept.
2. Resize (``do_resize``) to :func:`smart_resize`'s size -- both sides multiples of
   ``patch_size * merge_size``, pixel count within [min_pixels, max_pixels] -- with PIL's
   ``Image.resize`` on the uint8 image (bicubic by default, as HF).
3. Rescale (``do_rescale``): ``float32(float64(pixels) * rescale_factor)``.
4. Normalise (``do_normalize``): ``(x - mean) / std`` per channel in float32 (mean and std rounded to
   float32 first).
5. Patchify: the image is repeated ``temporal_patch_size`` times along a time axis; patches of
   ``patch_size``x``patch_size`` pixels are ordered merge-block-major (the ``merge_size``x``merge_size``
   patches that the vision merger fuses into one LLM token are consecutive) and each is flattened in
   (C, T, P, P) order.

Deliberate differences from HF, both about numpy input only:

* arrays are always channels-last (H, W), (H, W, 1), (H, W, 3) or (H, W, 4). HF guesses the channel axis
  and takes an array whose first dimension is 1, 3 or 4 as channels-first; it also rejects (H, W) arrays
  in a list, which are accepted here as one-channel (= HF's result for (H, W, 1)).
* arrays must be uint8 (HF also takes float arrays in [0, 1]).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from jaxmm.config import read_json

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# PIL resampling filter ids (PIL.Image.Resampling), the values HF writes as "resample".
_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}

PREPROCESSOR_CONFIG = "preprocessor_config.json"
PROCESSOR_CONFIG = "processor_config.json"


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 14 * 14 * 4 * 1280
) -> tuple[int, int]:
    """Target ``(height, width)`` in pixels for an image of ``height`` x ``width`` pixels.

    Same arithmetic as HF's ``smart_resize`` (Python floats, ``round`` = round-half-to-even):

    * each side is rounded to the nearest multiple of ``factor``;
    * if that has more than ``max_pixels`` pixels, both sides are scaled by ``sqrt(max_pixels / (h*w))``
      and floored to multiples of ``factor`` (at least ``factor``);
    * if it has fewer than ``min_pixels``, both sides are scaled by ``sqrt(min_pixels / (h*w))`` and
      ceiled to multiples of ``factor``.

    Raises:
        ValueError: the aspect ratio (long side / short side) is above 200, or a side is not positive.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image of height {height} and width {width} is empty")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"absolute aspect ratio must be smaller than 200, got "
            f"{max(height, width) / min(height, width)} for an image of height {height} "
            f"and width {width}"
        )
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


def image_name(index: int, image: Any = None) -> str:
    """``"image 1"``, or ``"image 1 (photos/cat.png)"`` for a PIL image opened from a file: how
    errors name an image."""
    path = getattr(image, "filename", None) if isinstance(image, Image.Image) else image
    return f"image {index} ({path})" if isinstance(path, (str, Path)) and str(path) else f"image {index}"


def open_image(source: Any, index: int = 0) -> Any:
    """A path -> the decoded PIL image (other inputs are returned as they are).

    Decodes at once (``Image.load``), so a corrupt or truncated file fails here, named.

    Warns:
        PIL.Image.DecompressionBombWarning: more pixels than ``PIL.Image.MAX_IMAGE_PIXELS`` (but
            not twice as many), naming the image.

    Raises:
        FileNotFoundError: no such file (names the image's index and path).
        ValueError: not an image PIL can read, corrupt or truncated data, or more pixels than PIL's
            decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``, twice over), each naming the
            image's index and path.
    """
    if not isinstance(source, (str, Path)):
        return source
    name = image_name(index, source)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", Image.DecompressionBombWarning)
            image = Image.open(source)
        for w in caught:  # PIL's warning above MAX_IMAGE_PIXELS (it refuses at twice that), named
            if issubclass(w.category, Image.DecompressionBombWarning):
                warnings.warn(f"{name}: possible decompression bomb ({w.message})", Image.DecompressionBombWarning, stacklevel=2)
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    except FileNotFoundError:
        raise FileNotFoundError(f"{name}: no such file") from None
    except Image.DecompressionBombError as e:
        raise ValueError(f"{name}: refused as a possible decompression bomb ({e})") from None
    except (Image.UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{name}: not an image file PIL can read ({e})") from None
    _decode(image, name)
    return image


def _decode(image: Image.Image, name: str) -> None:
    try:
        image.load()
    except Image.DecompressionBombError as e:
        raise ValueError(f"{name}: refused as a possible decompression bomb ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for corrupt / truncated data
        raise ValueError(
            f"{name}: cannot decode the image data ({type(e).__name__}: {e}); is the file truncated or corrupt?"
        ) from None


def to_channels_first(image: Any, index: int = 0, convert_rgb: bool = True) -> np.ndarray:
    """One input image -> uint8 ``[C, H, W]`` (C = 3 when ``convert_rgb``), as HF's
    ``PilBackend.process_image``.

    Args:
        image: a PIL image (any mode), or a uint8 numpy array (H, W), (H, W, 1), (H, W, 3) RGB or
            (H, W, 4) RGBA.
        index: the image's position in the batch, named in error messages.
        convert_rgb: HF's ``do_convert_rgb`` (see the module docstring for the rules).

    Warns:
        UserWarning: a 16-bit or 32-bit greyscale PIL image (modes ``I;16*``, ``I``, ``F``): RGB
            conversion clips every value above 255 to 255, as transformers does.

    Raises:
        TypeError: ``image`` is neither a PIL image nor a numpy array.
        ValueError: an array of the wrong shape or dtype, an image that is not 8-bit, or PIL image
            data that cannot be decoded (all naming the image's index, and its file when it has one).
    """
    if isinstance(image, Image.Image):
        name = image_name(index, image)
        _decode(image, name)
        if convert_rgb and (image.mode.startswith("I") or image.mode == "F"):
            warnings.warn(
                f"{name}: PIL mode {image.mode!r} (16/32-bit greyscale) is converted to 8-bit RGB "
                f"by clipping values above 255 to 255, as transformers does; scale it to 0..255 "
                f"first to keep its range",
                stacklevel=3,
            )
        if convert_rgb:
            if "A" in image.getbands() or image.info.get("transparency") is not None:
                white = Image.new("RGBA", image.size, (255, 255, 255, 255))
                image = Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
            else:
                image = image.convert("RGB")
        x = np.array(image)
        if x.dtype != np.uint8:
            raise ValueError(
                f"{name}: PIL mode {image.mode!r} gives {x.dtype} pixels, expected 8-bit "
                f"(enable do_convert_rgb or convert the image to RGB)"
            )
        return x[None] if x.ndim == 2 else np.moveaxis(x, -1, 0)

    if not isinstance(image, np.ndarray):
        raise TypeError(f"image {index}: expected a PIL image or a numpy array, got {type(image).__name__}")
    x = image
    if x.ndim == 2:
        x = x[..., None]
    if x.ndim != 3 or x.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"image {index}: expected an array of shape (H, W), (H, W, 1), (H, W, 3) or "
            f"(H, W, 4) (channels last), got shape {image.shape}"
        )
    if x.dtype != np.uint8:
        raise ValueError(f"image {index}: expected uint8 pixels (0..255), got dtype {x.dtype}")
    if convert_rgb:
        if x.shape[-1] == 1:
            x = np.repeat(x, 3, axis=-1)
        elif x.shape[-1] == 4:
            alpha = x[..., 3:4] / 255  # float64
            x = np.round(alpha * x[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return np.moveaxis(x, -1, 0)


def pil_resize(x: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    """uint8 ``[C, H, W]`` -> uint8 ``[C, height, width]`` through ``PIL.Image.resize``, as HF's
    ``image_transforms.resize`` (one channel goes through mode "L", four through "RGBA")."""
    hwc = np.moveaxis(x, 0, -1)
    pil = Image.fromarray(hwc[..., 0] if hwc.shape[-1] == 1 else hwc)
    out = np.array(pil.resize((width, height), resample=resample))
    return out[None] if out.ndim == 2 else np.moveaxis(out, -1, 0)


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class ImageProcessor:
    """Qwen2-VL image processor: PIL images / uint8 arrays -> ``pixel_values`` and ``image_grid_thw``.

    Fields carry HF's names and defaults (``Qwen2VLImageProcessorPil``). ``min_pixels`` and
    ``max_pixels`` are HF 5's ``size["shortest_edge"]`` and ``size["longest_edge"]``: bounds on the
    *pixel count* (height * width) after resizing, not on edge lengths.

    Attributes:
        min_pixels, max_pixels: pixel-count bounds for :func:`smart_resize`.
        patch_size: side of a vision patch, in pixels.
        temporal_patch_size: frames per patch; a still image is repeated this many times.
        merge_size: patches per side fused into one LLM token by the vision merger.
        image_mean, image_std: per-channel normalisation (on the 0..1 scale), or one number for all.
        do_resize, do_rescale, do_normalize, do_convert_rgb: HF's switches.
        rescale_factor: multiplier taking uint8 pixels to 0..1 (1/255).
        resample: PIL filter id (``PIL.Image.Resampling``): 3 = bicubic.
    """

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] | float = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] | float = OPENAI_CLIP_STD
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    do_convert_rgb: bool = True
    resample: int = 3

    def __post_init__(self):
        # min_pixels = 0 is refused too, as HF does (at its first call); it also keeps smart_resize's
        # sides >= factor, so every image has at least one merge block of patches.
        for name in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels"):
            v = getattr(self, name)
            if not _is_int(v) or v <= 0:
                raise ValueError(f"field {name!r} must be a positive integer, got {v!r}")
        for name in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"field {name!r} must be true or false, got {getattr(self, name)!r}")
        if not _is_number(self.rescale_factor) or not self.rescale_factor > 0:
            raise ValueError(f"field 'rescale_factor' must be a positive number, got {self.rescale_factor!r}")
        if not _is_int(self.resample) or int(self.resample) not in _RESAMPLE_NAMES:
            raise ValueError(f"field 'resample' must be a PIL filter id, one of {_RESAMPLE_NAMES}, got {self.resample!r}")
        for name in ("image_mean", "image_std"):
            v = getattr(self, name)
            if isinstance(v, (list, tuple, np.ndarray)):
                if len(v) == 0 or not all(_is_number(e) for e in v):
                    raise ValueError(f"field {name!r} must be a number or a list of numbers, got {v!r}")
                object.__setattr__(self, name, tuple(float(e) for e in v))
            elif _is_number(v):
                object.__setattr__(self, name, float(v))
            else:
                raise ValueError(f"field {name!r} must be a number or a list of numbers, got {v!r}")
        if np.any(np.asarray(self.image_std) == 0):
            raise ValueError(f"field 'image_std' must not contain 0, got {self.image_std!r}")

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ImageProcessor":
        """The processor of a checkpoint directory (or a path to its JSON file).

        Reads, as HF's ``ImageProcessingMixin.get_image_processor_dict``, the ``"image_processor"``
        entry of ``processor_config.json`` when there is one (transformers 5 processors save it nested
        there), else ``preprocessor_config.json``. Pixel bounds come from HF 5's
        ``size={"shortest_edge", "longest_edge"}``, the older ``size={"min_pixels", "max_pixels"}``, or
        top-level ``min_pixels`` / ``max_pixels`` keys; the top-level keys win, as in HF's ``__init__``.
        Unknown keys (``image_processor_type``, ``processor_class``, ...) are ignored; fields absent from
        the file take HF's defaults.

        Raises:
            FileNotFoundError: neither file exists (names the paths looked at).
            ValueError: unreadable JSON, or a field with a bad value (names the file and the field).
        """
        f, d = read_processor_config(path)
        try:
            return cls(**cls._fields_from_dict(d))
        except ValueError as e:
            raise ValueError(f"{f}: {e}") from None

    @classmethod
    def _fields_from_dict(cls, d: dict) -> dict:
        names = {fld.name for fld in dataclasses.fields(cls)} - {"min_pixels", "max_pixels"}
        kw = {k: v for k, v in d.items() if k in names and v is not None}
        size = d.get("size")
        if size is not None and not isinstance(size, dict):
            raise ValueError(f"field 'size' must be an object with 'shortest_edge' and 'longest_edge', got {size!r}")
        size = size or {}
        for field, keys in (("min_pixels", ("shortest_edge", "min_pixels")), ("max_pixels", ("longest_edge", "max_pixels"))):
            if d.get(field) is not None:  # top-level legacy key: wins, as in HF
                kw[field] = d[field]
            else:
                for k in keys:
                    if size.get(k) is not None:
                        kw[field] = size[k]
                        break
                else:
                    if size:  # HF would fail at the first call
                        raise ValueError(f"field 'size' must give both 'shortest_edge' and 'longest_edge', got {size!r}")
        return kw

    @property
    def factor(self) -> int:
        """Side multiple of resized images, in pixels (``patch_size * merge_size``)."""
        return self.patch_size * self.merge_size

    def grid_thw(self, height: int, width: int) -> tuple[int, int, int]:
        """``(1, h, w)``: the patch grid of an image of ``height`` x ``width`` pixels (before resizing),
        without processing it (HF's ``get_number_of_image_patches`` is ``h * w``)."""
        if self.do_resize:
            height, width = smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)
        return 1, height // self.patch_size, width // self.patch_size

    def num_image_tokens(self, grid_thw) -> int:
        """LLM tokens for one image of patch grid ``grid_thw = (t, h, w)``: ``t*h*w // merge_size**2``."""
        t, h, w = (int(v) for v in grid_thw)
        return t * h * w // self.merge_size**2

    def preprocess_one(self, image: Any, index: int = 0) -> tuple[np.ndarray, tuple[int, int, int]]:
        """One image -> (patches float32 ``[h*w, C*T*P*P]``, ``(1, h, w)`` in patches).

        ``index`` is the image's position in the batch, named in error messages (with the image's
        file, when it was opened from one).

        Raises:
            TypeError, ValueError: as :func:`to_channels_first`; an aspect ratio over 200 (HF's
                ``smart_resize`` limit) naming the image.
        """
        x = to_channels_first(image, index, self.do_convert_rgb)  # uint8 [C, H, W]
        c, height, width = x.shape
        if self.do_resize:
            try:
                new_h, new_w = smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)
            except ValueError as e:
                raise ValueError(f"{image_name(index, image)}: {e}") from None
            x = pil_resize(x, new_h, new_w, int(self.resample))
        c, height, width = x.shape
        if height % self.factor or width % self.factor or height == 0 or width == 0:
            raise ValueError(
                f"image {index}: height {height} and width {width} must be positive multiples of "
                f"{self.factor} (patch_size * merge_size) when do_resize is off"
            )
        if self.do_rescale:
            x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            x = x if np.issubdtype(x.dtype, np.floating) else x.astype(np.float32)
            if any(np.ndim(v) and len(v) != c for v in (self.image_mean, self.image_std)):
                raise ValueError(
                    f"image {index}: has {c} channels but image_mean has "
                    f"{np.size(self.image_mean)} and image_std {np.size(self.image_std)} entries"
                )
            # HF: ((x.T - mean) / std).T with mean, std cast to x's dtype; the same float32 operations.
            mean = np.broadcast_to(np.asarray(self.image_mean, x.dtype), (c,))[:, None, None]
            std = np.broadcast_to(np.asarray(self.image_std, x.dtype), (c,))[:, None, None]
            x = (x - mean) / std
        x = x.astype(np.float32, copy=False)

        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        gh, gw = height // p, width // p
        x = x.reshape(c, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)  # (gh,gw,mh,mw,C,ph,pw)
        x = np.broadcast_to(x[:, :, :, :, :, None], x.shape[:5] + (t,) + x.shape[5:])  # (..., C, T, ph, pw)
        return x.reshape(gh * gw, c * t * p * p), (1, gh, gw)

    def __call__(self, images: Any) -> dict[str, np.ndarray]:
        """Images -> ``{"pixel_values": float32 [N, C*T*P*P], "image_grid_thw": int64 [n_images, 3]}``.

        ``images``: one image or a list of them (PIL images or uint8 arrays, see
        :func:`to_channels_first`); a 4-D array is a batch of same-size images. ``pixel_values`` is
        every image's patches concatenated in input order; image ``i`` has ``prod(image_grid_thw[i])``
        rows (with the defaults, N*C*T*P*P = N*3*2*14*14 = N*1176 values).
        """
        if isinstance(images, Image.Image) or (isinstance(images, np.ndarray) and images.ndim in (2, 3)):
            images = [images]
        elif isinstance(images, np.ndarray) and images.ndim == 4:
            images = list(images)
        elif not isinstance(images, Sequence) or isinstance(images, (str, bytes)):
            raise TypeError(f"expected an image or a list of images, got {type(images).__name__}")
        if len(images) == 0:
            raise ValueError("no images given")
        patches, grids = zip(*(self.preprocess_one(im, i) for i, im in enumerate(images)))
        return pixel_inputs(patches, grids)


def read_processor_config(path: str | Path) -> tuple[Path, dict]:
    """``(file, dict)`` of a checkpoint's image processor settings, as HF's
    ``ImageProcessingMixin.get_image_processor_dict``: the ``"image_processor"`` entry of
    ``processor_config.json`` when there is one, else ``preprocessor_config.json``; or the JSON
    file ``path`` itself.

    Raises:
        FileNotFoundError: neither file exists (names the paths looked at).
        ValueError: unreadable JSON (names the file).
    """
    p = Path(path)
    if not p.is_dir():
        if not p.is_file():
            raise FileNotFoundError(f"no image processor config: {p} does not exist")
        return p, read_json(p)
    nested = p / PROCESSOR_CONFIG
    if nested.is_file():
        nd = read_json(nested)
        if isinstance(nd.get("image_processor"), dict):
            return nested, nd["image_processor"]
    f = p / PREPROCESSOR_CONFIG
    if not f.is_file():
        raise FileNotFoundError(f"no image processor config: {f} does not exist (nor an 'image_processor' entry in {nested})")
    return f, read_json(f)


def pixel_inputs(patches, grids) -> dict:
    """Per-image :meth:`ImageProcessor.preprocess_one` outputs -> the processor's batch:
    ``pixel_values`` [Σ patches, C·T·P·P] (concatenated in order) and ``image_grid_thw`` int64 [N,3]."""
    return {"pixel_values": np.concatenate(patches, 0), "image_grid_thw": np.array(grids, np.int64)}
