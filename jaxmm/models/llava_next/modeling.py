"""The LLaVA-NeXT model (Flax NNX).

Mirrors ``LlavaNextForConditionalGeneration`` in
``transformers/models/llava_next/modeling_llava_next.py`` (5.x) with a Llama decoder
(``modeling_llama.py``): the packed image features replace the ``<image>`` tokens
(``masked_scatter``), then the decoder — the shared one, run with Llama's switches (no biases, 1-D
RoPE) — and the lm head.
"""

from __future__ import annotations

from jaxmm.models.core.model import VLForConditionalGeneration
from jaxmm.models.llava_next.config import LlavaNextConfig
from jaxmm.models.llava_next.vision import VisionTower


class LlavaNextForConditionalGeneration(VLForConditionalGeneration):
    """LLaVA-NeXT: ``visual`` (CLIP ``vision_model``, ``multi_modal_projector``, ``image_newline``),
    ``language_model`` decoder and ``lm_head``."""

    VisionTower = VisionTower


LlavaNextConfig.model_class = LlavaNextForConditionalGeneration
