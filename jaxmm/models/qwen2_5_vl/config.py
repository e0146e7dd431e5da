"""Qwen2.5-VL configuration read from ``config.json``.

Mirrors ``transformers/models/qwen2_5_vl/configuration_qwen2_5_vl.py``: the shared decoder's text
fields (:class:`~jaxmm.models.core.config.TextConfig`) and a vision tower with window attention
(``window_size``) and full attention at ``fullatt_block_indexes``. Both layouts of ``config.json``
are read (see :mod:`jaxmm.models.core.config`).
"""

from __future__ import annotations

import dataclasses

from jaxmm.models.core import config as core
from jaxmm.models.core.config import ConfigError, TextConfig, read_config_json  # noqa: F401  (re-exported)


@dataclasses.dataclass(frozen=True)
class VisionConfig(core.VisionConfig):
    """The shared vision fields plus the window layout: ``window_size`` (pixels per window side) and
    ``fullatt_block_indexes`` (blocks that attend over the whole frame)."""

    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)


@dataclasses.dataclass(frozen=True)
class Qwen2_5_VLConfig(core.VLConfig):
    """Qwen2.5-VL as read from ``config.json`` (``transformers/models/qwen2_5_vl/
    configuration_qwen2_5_vl.py``; module doc); build it with :meth:`VLConfig.from_dict`, which
    raises :class:`~jaxmm.models.core.config.ConfigError` on a missing, ill-typed or inconsistent
    field."""

    vision: VisionConfig
    model_type: str = "qwen2_5_vl"

    MODEL_TYPE = "qwen2_5_vl"
    VISION_CONFIG = VisionConfig
    VISION_ACTS = ("silu",)
    #: transformers' ``configuration_qwen2_5_vl.py`` defaults for the fields that do not shape weights.
    TEXT_DEFAULTS = {"rms_norm_eps": 1e-5, "hidden_act": "silu", "max_position_embeddings": 32768, "rope_theta": 1000000.0}
    VISION_DEFAULTS = {
        "hidden_act": "silu",
        "in_channels": 3,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "tokens_per_second": 4,
        "window_size": 112,
        "fullatt_block_indexes": (7, 15, 23, 31),
    }

    def consistency_checks(self) -> list[tuple[bool, str]]:
        """The shared checks (:meth:`VLConfig.consistency_checks`) plus ``fullatt_block_indexes`` within
        the tower's depth and a ``window_size`` (pixels) that is a multiple of ``patch_size ·
        spatial_merge_size``; a failing one makes ``__post_init__`` raise
        :class:`~jaxmm.models.core.config.ConfigError`."""
        v = self.vision
        return super().consistency_checks() + [
            (
                all(0 <= i < v.depth for i in v.fullatt_block_indexes),
                f"fullatt_block_indexes={list(v.fullatt_block_indexes)} out of range for depth={v.depth}",
            ),
            (
                v.window_size % (v.patch_size * v.spatial_merge_size) == 0,
                f"window_size={v.window_size} is not a multiple of patch_size*spatial_merge_size",
            ),
        ]
