"""LLaVA-1.5 configuration read from ``config.json``.

Mirrors ``transformers/models/llava/configuration_llava.py`` (5.x): a CLIP vision tower and a Llama
decoder, read as :class:`jaxmm.models.core.clip.ClipLlamaConfig` reads every LLaVA-style config
(absent fields take transformers' defaults: LLaVA's CLIP ViT-L/14-336 when ``vision_config`` is
absent, ``CLIPVisionConfig``'s and ``LlamaConfig``'s for missing fields).
"""

from __future__ import annotations

import dataclasses

from jaxmm.models.core.clip import CLIP_DEFAULTS, LLAMA_DEFAULTS, LLAVA_VISION, ClipLlamaConfig, ClipVisionConfig

__all__ = ["VisionConfig", "LlavaConfig", "LLAMA_DEFAULTS", "LLAVA_VISION", "CLIP_DEFAULTS"]


@dataclasses.dataclass(frozen=True)
class VisionConfig(ClipVisionConfig):
    """LLaVA-1.5's CLIP tower and projector (the fields of :class:`ClipVisionConfig`)."""


@dataclasses.dataclass(frozen=True)
class LlavaConfig(ClipLlamaConfig):
    """LLaVA-1.5 as read from ``config.json`` (``transformers/models/llava/configuration_llava.py``;
    module doc): :class:`~jaxmm.models.core.clip.ClipLlamaConfig` with ``model_type`` "llava".
    :meth:`from_dict` raises :class:`~jaxmm.models.core.config.ConfigError` on a missing,
    ill-typed or inconsistent field."""

    vision: VisionConfig
    model_type: str = "llava"

    MODEL_TYPE = "llava"
    VISION_CONFIG = VisionConfig
