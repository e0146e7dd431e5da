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
from jaxmm.models.core.layers import Linear, RMSNorm, SwiGLU, in_float32
from jaxmm.models.core.vision import VisionBlock, VisionInputs, collect, vision_rotary
from jaxmm.models.qwen2_5_vl.config import VisionConfig
from jaxmm.models.qwen2_5_vl.inputs import vision_inputs

Array = jax.Array


class PatchMerger(nnx.Module):
    """RMSNorm, group each 2x2 block of patches, then Linear-GELU-Linear (``Qwen2_5_VLPatchMerger``).

    Parameter names ``mlp_0``/``mlp_2`` stand for torch's ``mlp.0``/``mlp.2``.
    """

    def __init__(self, cfg: VisionConfig, dtype):
        c4 = cfg.hidden_size * cfg.spatial_merge_size ** 2
        self.ln_q = RMSNorm(cfg.hidden_size, 1e-6, dtype=dtype)
        self.mlp_0 = Linear(c4, c4, bias=True, dtype=dtype, names=(None, "mlp"))
        self.mlp_2 = Linear(c4, cfg.out_hidden_size, bias=True, dtype=dtype, names=("mlp", "embed"))

    def __call__(self, x: Array) -> Array:
        """x [N,C] -> [M,E]."""
        x = self.ln_q(x)
        x = x.reshape(-1, self.mlp_0.kernel.shape[0])
        return self.mlp_2(in_float32(lambda h: jax.nn.gelu(h, approximate=False))(self.mlp_0(x)))


class VisionTransformer(nnx.Module):
    """Qwen2.5-VL ViT. Input patches arrive in the processor's order; they are permuted into window
    order before the blocks and the merged tokens are permuted back (HF's ``window_index`` and its
    argsort, from :func:`jaxmm.models.qwen2_5_vl.inputs.vision_inputs`)."""

    #: host side: image_grid_thw -> the VisionInputs this tower reads
    host_inputs = staticmethod(vision_inputs)

    def __init__(self, cfg: VisionConfig, dtype):
        self.cfg = cfg
        patch_dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
        self.patch_embed = Linear(patch_dim, cfg.hidden_size, bias=False, dtype=dtype, names=(None, "embed"))
        self.blocks = nnx.List([
            VisionBlock(cfg, dtype, norm=RMSNorm,
                        mlp=SwiGLU(cfg.hidden_size, cfg.intermediate_size, bias=True, dtype=dtype))
            for _ in range(cfg.depth)])
        self.merger = PatchMerger(cfg, dtype)

    def __call__(self, pixel_values: Array, vis: VisionInputs, interventions=(), probes=()):
        """pixel_values [N, C·T·P·P] -> (features [M,E], (), probe results per block)."""
        cfg = self.cfg
        unit = cfg.spatial_merge_size ** 2
        x = self.patch_embed(pixel_values.astype(self.patch_embed.kernel.dtype))     # [N,C]
        n = x.shape[0]
        x = x.reshape(n // unit, unit, -1)[vis.window_index].reshape(n, -1)
        cos, sin = vision_rotary(cfg, vis.rotary_pos)
        results = {}
        for i, blk in enumerate(self.blocks):
            seg = vis.frames if i in cfg.fullatt_block_indexes else vis.windows
            x, res = blk(x, cos, sin, seg, Site("vision", i), interventions, probes)
            collect(results, res, i)
        merged = self.merger(x)                                                     # [M,E]
        return merged[vis.reverse_index], (), results
