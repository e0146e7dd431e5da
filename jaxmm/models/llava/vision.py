"""LLaVA's vision side (Flax NNX): the CLIP vision tower and the multimodal projector.

Mirrors ``LlavaModel.get_image_features`` (``transformers/models/llava/modeling_llava.py``, 5.x) on
the shared CLIP modules of :mod:`jaxmm.models.core.clip` (``CLIPVisionTransformer``,
``LlavaMultiModalProjector``): the hidden states of ``vision_feature_layer`` (the penultimate layer
by default) without the CLS token, mapped by ``linear_2(gelu(linear_1(·)))`` to the text width.
"""

from __future__ import annotations

import flax.nnx as nnx
import jax

from jaxmm.models.core.clip import Projector, VisionModel, clip_features
from jaxmm.models.llava.config import VisionConfig
from jaxmm.models.llava.inputs import vision_inputs

Array = jax.Array


class VisionTower(nnx.Module):
    """CLIP ``vision_model`` and the ``multi_modal_projector`` as one tower (the contract of
    :mod:`jaxmm.models.core.vision`): pixel_values [n, C_in, S, S] -> features [n·tokens_per_image, E]."""

    #: host side: image_grid_thw -> the VisionInputs this tower reads (none)
    host_inputs = staticmethod(vision_inputs)

    def __init__(self, cfg: VisionConfig, dtype):
        self.cfg = cfg
        self.vision_model = VisionModel(cfg, dtype)
        self.multi_modal_projector = Projector(cfg, dtype)

    def __call__(self, pixel_values: Array, vis=None, interventions=(), probes=()):
        """Returns (features [M,E], (), probe results)."""
        out, results = clip_features(self.cfg, self.vision_model, self.multi_modal_projector, pixel_values, interventions, probes)
        return out.reshape(-1, out.shape[-1]), (), results
