"""The Qwen2-VL vision tower (Flax NNX), mirroring ``Qwen2VisionTransformerPretrainedModel`` in
``transformers/models/qwen2_vl/modeling_qwen2_vl.py`` (5.x).

Conv3d patch embedding (as a Linear over flattened patches), 2-D rotary, LayerNorm blocks (with
bias, eps 1e-6) with an MLP ``fc2(quick_gelu(fc1(x)))`` (``x·σ(1.702x)``, width
``embed_dim·mlp_ratio``); every block attends within each image frame (HF ``cu_seqlens``); the
merger's ``ln_q`` is a LayerNorm.
"""

from __future__ import annotations

import flax.nnx as nnx
import jax

from jaxmm.attention import Site
from jaxmm.models.core.layers import LayerNorm, Linear, in_float32
from jaxmm.models.core.vision_inputs import frame_inputs
from jaxmm.models.core.vision import PatchMerger, VisionBlock, VisionInputs, collect, vision_rotary
from jaxmm.models.qwen2_vl.config import VisionConfig

Array = jax.Array


class VisionMlp(nnx.Module):
    """``fc2(quick_gelu(fc1(x)))`` (HF ``VisionMlp``)."""

    def __init__(self, dim: int, hidden: int, *, dtype):
        self.fc1 = Linear(dim, hidden, bias=True, dtype=dtype, names=("embed", "mlp"))
        self.fc2 = Linear(hidden, dim, bias=True, dtype=dtype, names=("mlp", "embed"))

    def __call__(self, x):
        return self.fc2(in_float32(lambda h: h * jax.nn.sigmoid(1.702 * h))(self.fc1(x)))


class VisionTransformer(nnx.Module):
    """Qwen2-VL ViT: patches stay in the processor's order; every block attends per frame."""

    #: host side: image_grid_thw -> the VisionInputs this tower reads
    host_inputs = staticmethod(frame_inputs)

    def __init__(self, cfg: VisionConfig, dtype):
        self.cfg = cfg
        patch_dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2
        self.patch_embed = Linear(patch_dim, cfg.hidden_size, bias=False, dtype=dtype, names=(None, "embed"))
        self.blocks = nnx.List(
            [
                VisionBlock(cfg, dtype, norm=LayerNorm, mlp=VisionMlp(cfg.hidden_size, cfg.intermediate_size, dtype=dtype))
                for _ in range(cfg.depth)
            ]
        )
        self.merger = PatchMerger(cfg, dtype, norm=LayerNorm)

    def __call__(self, pixel_values: Array, vis: VisionInputs, interventions=(), probes=()):
        """pixel_values [N, C·T·P·P] -> (features [M,E], (), probe results per block)."""
        x = self.patch_embed(pixel_values.astype(self.patch_embed.kernel.dtype))  # [N,C]
        cos, sin = vision_rotary(self.cfg, vis.rotary_pos)
        results = {}
        for i, blk in enumerate(self.blocks):
            x, res = blk(x, cos, sin, vis.frames, Site("vision", i), interventions, probes)
            collect(results, res, i)
        return self.merger(x), (), results
