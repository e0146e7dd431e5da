"""LLaVA-NeXT (LLaVA-v1.6) configuration read from ``config.json``.

Mirrors ``transformers/models/llava_next/configuration_llava_next.py`` (5.x): LLaVA-1.5's CLIP tower
and Llama decoder (read as :class:`jaxmm.models.core.clip.ClipLlamaConfig` reads every LLaVA-style
config, with transformers' defaults for absent fields) plus ``image_grid_pinpoints``, the
resolutions ``(height, width)`` an image may be tiled at (default
``[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]``, ``LlavaNextConfig.__post_init__``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxmm.models.core import config as core
from jaxmm.models.core.clip import ClipLlamaConfig, ClipVisionConfig
from jaxmm.models.core.config import ConfigError

#: LlavaNextConfig's image_grid_pinpoints when config.json has none
DEFAULT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


@dataclasses.dataclass(frozen=True)
class VisionConfig(ClipVisionConfig):
    """LLaVA-NeXT's CLIP tower and projector (the fields of :class:`ClipVisionConfig`) and
    ``image_grid_pinpoints``: the ``(height, width)`` resolutions, in pixels, an image may be resized
    and padded to before it is cut into ``image_size``² tiles."""

    image_grid_pinpoints: tuple[tuple[int, int], ...] = DEFAULT_PINPOINTS


@dataclasses.dataclass(frozen=True)
class LlavaNextConfig(ClipLlamaConfig):
    """LLaVA-NeXT as read from ``config.json`` (``transformers/models/llava_next/
    configuration_llava_next.py``; module doc): LLaVA-1.5's fields plus ``image_grid_pinpoints``.
    :meth:`from_dict` raises :class:`~jaxmm.models.core.config.ConfigError` on a missing,
    ill-typed or inconsistent field."""

    vision: VisionConfig
    model_type: str = "llava_next"

    MODEL_TYPE = "llava_next"
    VISION_CONFIG = VisionConfig

    def consistency_checks(self) -> list[tuple[bool, str]]:
        """The shared checks (:meth:`VLConfig.consistency_checks`) plus ``vision_feature_select_strategy
        == "default"`` (the tiles are packed as patch grids) and pinpoints that are positive multiples
        of the tile ``image_size``; a failing one makes ``__post_init__`` raise
        :class:`~jaxmm.models.core.config.ConfigError`."""
        v = self.vision
        pins = v.image_grid_pinpoints
        return super().consistency_checks() + [
            (
                v.vision_feature_select_strategy == "default",
                f"vision_feature_select_strategy={v.vision_feature_select_strategy!r}: LLaVA-NeXT packs the tiles' "
                f"features as grids of image_size/patch_size patches, which needs 'default' (transformers' "
                f"pack_image_features cannot reshape 'full' features either)",
            ),
            (
                len(pins) > 0 and all(h > 0 and w > 0 and h % v.image_size == 0 and w % v.image_size == 0 for h, w in pins),
                f"image_grid_pinpoints={[list(p) for p in pins]}: expected a non-empty list of [height, width] "
                f"pixel sizes, each a positive multiple of the vision image_size={v.image_size}",
            ),
        ]

    @classmethod
    def vision_extras(cls, d: dict[str, Any], source: str) -> dict[str, Any]:
        """``image_grid_pinpoints`` from config.json (a list of ``[height, width]``), as tuples.

        Raises:
            ConfigError: naming ``source`` and the field, when it is not a list of integer pairs.
        """
        pins = d.get("image_grid_pinpoints")
        if pins is None:
            return {"image_grid_pinpoints": DEFAULT_PINPOINTS}
        if not (
            isinstance(pins, (list, tuple))
            and all(isinstance(p, (list, tuple)) and len(p) == 2 and all(core.is_int(x) for x in p) for p in pins)
        ):
            raise ConfigError(
                f"{source}: field 'image_grid_pinpoints' must be a list of [height, width] integer pairs, got {pins!r}"
            )
        return {"image_grid_pinpoints": tuple((int(h), int(w)) for h, w in pins)}
