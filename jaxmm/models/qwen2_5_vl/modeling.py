"""Qwen2.5-VL in Flax NNX: its vision tower (:mod:`.vision`) on the shared decoder and seam.

Mirrors ``Qwen2_5_VLForConditionalGeneration`` in
``transformers/models/qwen2_5_vl/modeling_qwen2_5_vl.py`` (5.x). The decoder, splice, lm head and
the pure ``forward`` are :mod:`jaxmm.models.core`'s, re-exported here::

    model = jaxmm.load(path)
    batch = model.prepare(input_ids=..., attention_mask=..., pixel_values=..., image_grid_thw=...)
    out = forward_jit(model.params, model.config, batch)
"""

from __future__ import annotations

from jaxmm.models.core.decoder import KVCache
from jaxmm.models.core.model import (
    Batch,
    ModelOutput,
    VLForConditionalGeneration,
    abstract_params,
    forward,
    forward_jit,
    graphdef,
)
from jaxmm.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from jaxmm.models.qwen2_5_vl.vision import VisionTransformer

__all__ = [
    "Qwen2_5_VLForConditionalGeneration",
    "Batch",
    "KVCache",
    "ModelOutput",
    "abstract_params",
    "forward",
    "forward_jit",
    "graphdef",
]


class Qwen2_5_VLForConditionalGeneration(VLForConditionalGeneration):
    """Qwen2.5-VL: the windowed ``visual`` tower, ``language_model`` decoder and ``lm_head``."""

    VisionTower = VisionTransformer


Qwen2_5_VLConfig.model_class = Qwen2_5_VLForConditionalGeneration
