"""LLaVA-1.5 in Flax NNX: the CLIP tower and projector (:mod:`.vision`) on the shared decoder and seam.

Mirrors ``LlavaForConditionalGeneration`` in ``transformers/models/llava/modeling_llava.py`` (5.x)
with a Llama decoder (``modeling_llama.py``): the image features replace the ``<image>`` tokens
(``masked_scatter``), then the decoder — the shared one, run with Llama's switches (no biases, 1-D
RoPE) — and the lm head.
"""

from __future__ import annotations

from jaxmm.models.core.model import VLForConditionalGeneration
from jaxmm.models.llava.config import LlavaConfig
from jaxmm.models.llava.vision import VisionTower


class LlavaForConditionalGeneration(VLForConditionalGeneration):
    """LLaVA: ``visual`` (CLIP ``vision_model`` + ``multi_modal_projector``), ``language_model``
    decoder and ``lm_head``."""

    VisionTower = VisionTower


LlavaConfig.model_class = LlavaForConditionalGeneration
