"""Qwen2-VL in Flax NNX: its vision tower (:mod:`.vision`) on the shared decoder and seam.

Mirrors ``Qwen2VLForConditionalGeneration`` in ``transformers/models/qwen2_vl/modeling_qwen2_vl.py``
(5.x): the text decoder is Qwen2 with M-RoPE (:mod:`jaxmm.models.core.decoder`).
"""

from __future__ import annotations

from jaxmm.models.core.model import VLForConditionalGeneration
from jaxmm.models.qwen2_vl.config import Qwen2VLConfig
from jaxmm.models.qwen2_vl.vision import VisionTransformer


class Qwen2VLForConditionalGeneration(VLForConditionalGeneration):
    """Qwen2-VL: the per-frame ``visual`` tower, ``language_model`` decoder and ``lm_head``."""

    VisionTower = VisionTransformer


Qwen2VLConfig.model_class = Qwen2VLForConditionalGeneration
