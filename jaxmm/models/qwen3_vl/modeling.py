"""Qwen3-VL (dense) in Flax NNX: its vision tower (:mod:`.vision`) on the shared decoder and seam.

Mirrors ``Qwen3VLForConditionalGeneration`` in ``transformers/models/qwen3_vl/modeling_qwen3_vl.py``
(5.x). The decoder runs with explicit ``head_dim``, no q/k/v bias, per-head RMSNorm on q and k
before RoPE and interleaved M-RoPE (all :class:`~jaxmm.models.core.config.TextConfig` switches), and
adds the tower's DeepStack features to the image tokens after layers 0, 1, 2, …

Note for RATION: k_norm re-normalises every key, so scaling k_proj's output (RATION's released
trick) changes nothing here; jaxmm applies RATION's temperature to the logits, which does.
"""

from __future__ import annotations

from jaxmm.models.core.model import VLForConditionalGeneration
from jaxmm.models.qwen3_vl.config import Qwen3VLConfig
from jaxmm.models.qwen3_vl.vision import VisionTransformer


class Qwen3VLForConditionalGeneration(VLForConditionalGeneration):
    """Qwen3-VL (dense): the ``visual`` tower with DeepStack mergers, ``language_model`` decoder
    (q/k-norm, interleaved M-RoPE) and ``lm_head``."""

    VisionTower = VisionTransformer


Qwen3VLConfig.model_class = Qwen3VLForConditionalGeneration
