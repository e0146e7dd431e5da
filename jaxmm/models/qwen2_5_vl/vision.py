"""The Qwen2.5-VL vision tower (Flax NNX), mirroring ``Qwen2_5_VisionTransformerPretrainedModel``
in ``transformers/models/qwen2_5_vl/modeling_qwen2_5_vl.py`` (5.x).

Conv3d patch embedding (as a Linear over flattened patches), 2-D rotary, RMSNorm blocks with a
SwiGLU MLP, attention inside windows (``window_size``) except at ``fullatt_block_indexes`` (whole
frames), and a patch merger. Letters: N patches, M merged tokens, C tower width, E text width.
"""

from __future__ import annotations

import flax.nnx as nnx
import jax

from jaxmm.attention import Site
from jaxmm.models.core.layers import Linear, RMSNorm, SwiGLU
from jaxmm.models.core.vision import PatchMerger, VisionBlock, VisionInputs, collect, vision_rotary
from jaxmm.models.qwen2_5_vl.config import VisionConfig
from jaxmm.models.qwen2_5_vl.inputs import vision_inputs

Array = jax.Array


class VisionTransformer(nnx.Module):
    """Qwen2.5-VL ViT. Input patches arrive in the processor's order; they are permuted into window
    order before the blocks and the merged tokens are permuted back (HF's ``window_index`` and its
    argsort, from :func:`jaxmm.models.qwen2_5_vl.inputs.vision_inputs`)."""

    #: host side: image_grid_thw -> the VisionInputs this tower reads
    host_inputs = staticmethod(vision_inputs)

    def __init__(self, cfg: VisionConfig, dtype):
        self.cfg = cfg
        patch_dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2
        self.patch_embed = Linear(patch_dim, cfg.hidden_size, bias=False, dtype=dtype, names=(None, "embed"))
        self.blocks = nnx.List(
            [
                VisionBlock(cfg, dtype, norm=RMSNorm, mlp=SwiGLU(cfg.hidden_size, cfg.intermediate_size, bias=True, dtype=dtype))
                for _ in range(cfg.depth)
            ]
        )
        self.merger = PatchMerger(cfg, dtype, norm=RMSNorm)

    def __call__(self, pixel_values: Array, vis: VisionInputs, interventions=(), probes=()):
        """pixel_values [N, C·T·P·P] -> (features [M,E], (), probe results per block)."""
        cfg = self.cfg
        unit = cfg.spatial_merge_size**2
        x = self.patch_embed(pixel_values.astype(self.patch_embed.kernel.dtype))  # [N,C]
        n = x.shape[0]
        x = x.reshape(n // unit, unit, -1)[vis.window_index].reshape(n, -1)
        cos, sin = vision_rotary(cfg, vis.rotary_pos)
        results = {}
        for i, blk in enumerate(self.blocks):
            seg = vis.frames if i in cfg.fullatt_block_indexes else vis.windows
            x, res = blk(x, cos, sin, seg, Site("vision", i), interventions, probes)
            collect(results, res, i)
        merged = self.merger(x)  # [M,E]
        return merged[vis.reverse_index], (), results
