"""LLaVA-NeXT's vision side (Flax NNX): the CLIP tower over every tile, the projector and the
packing of each image's tiles with ``image_newline``.

Mirrors ``LlavaNextModel.get_image_features`` and ``pack_image_features``
(``transformers/models/llava_next/modeling_llava_next.py``, 5.x) on the shared CLIP modules of
:mod:`jaxmm.models.core.clip`: all tiles of all images go through the tower as one batch (the
attention "batch" probes see), ``vision_feature_layer`` is selected (CLS dropped) and projected;
then each image's features are packed — base image first, then the unpadded grid of its tiles with
``image_newline`` after every row — as one gather by the host's
:class:`~jaxmm.models.llava_next.inputs.PackIndex`.

Letters: T tiles (all images), g² patches per tile, E text width, M image tokens.
"""

from __future__ import annotations

import flax.nnx as nnx
import jax
import jax.numpy as jnp

from jaxmm.models.core.clip import Projector, VisionModel, clip_features
from jaxmm.models.core.layers import param
from jaxmm.models.llava_next.config import VisionConfig
from jaxmm.models.llava_next.inputs import PackIndex, vision_inputs

Array = jax.Array


class VisionTower(nnx.Module):
    """CLIP ``vision_model``, ``multi_modal_projector`` and ``image_newline`` [E] as one tower (the
    contract of :mod:`jaxmm.models.core.vision`): tiles [T, C_in, S, S] -> image tokens [M, E]."""

    #: host side: image_grid_thw rows (tiles, height, width) -> the PackIndex this tower reads
    host_inputs = staticmethod(vision_inputs)

    def __init__(self, cfg: VisionConfig, dtype):
        self.cfg = cfg
        self.vision_model = VisionModel(cfg, dtype)
        self.multi_modal_projector = Projector(cfg, dtype)
        self.image_newline = param((cfg.out_hidden_size,), dtype, ("embed",))

    def __call__(self, pixel_values: Array, vis: PackIndex, interventions=(), probes=()):
        """pixel_values [T, C_in, S, S], ``vis.index`` int32 [M] -> (features [M, E], (), probe results)."""
        feats, results = clip_features(
            self.cfg, self.vision_model, self.multi_modal_projector, pixel_values, interventions, probes
        )  # [T, g², E]
        table = jnp.concatenate(
            [feats.reshape(-1, feats.shape[-1]), self.image_newline[...].astype(feats.dtype)[None]]
        )  # [T·g² + 1, E]
        return table[vis.index], (), results
