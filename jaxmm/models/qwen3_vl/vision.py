"""The Qwen3-VL vision tower (Flax NNX), mirroring ``Qwen3VLVisionModel`` in
``transformers/models/qwen3_vl/modeling_qwen3_vl.py`` (5.x).

Patch embedding with bias; a learned position table ``pos_embed`` [num_position_embeddings, C]
resampled bilinearly (align_corners) to each image's grid and added to the patch embeddings;
LayerNorm blocks with a ``gelu_pytorch_tanh`` MLP (``linear_fc1/2``); attention per frame (no
windows); merger ``norm → linear_fc1 → GELU → linear_fc2``. DeepStack: at
``deepstack_visual_indexes`` a merger with a post-shuffle LayerNorm (over the 2×2 merged vector)
turns the block's output into features that the decoder adds to the image tokens' hidden states
after layers 0, 1, 2, …
"""

from __future__ import annotations

import flax.nnx as nnx
import jax
import jax.numpy as jnp

from jaxmm.attention import Site
from jaxmm.models.core.layers import Embedding, LayerNorm, Linear, in_float32
from jaxmm.models.core.vision import VisionBlock, VisionInputs, collect, vision_rotary
from jaxmm.models.qwen3_vl.config import VisionConfig
from jaxmm.models.qwen3_vl.inputs import vision_inputs

Array = jax.Array


class VisionMlp(nnx.Module):
    """``linear_fc2(gelu_tanh(linear_fc1(x)))`` (``Qwen3VLVisionMLP``)."""

    def __init__(self, dim: int, hidden: int, *, dtype):
        self.linear_fc1 = Linear(dim, hidden, bias=True, dtype=dtype, names=("embed", "mlp"))
        self.linear_fc2 = Linear(hidden, dim, bias=True, dtype=dtype, names=("mlp", "embed"))

    def __call__(self, x):
        return self.linear_fc2(in_float32(lambda h: jax.nn.gelu(h, approximate=True))(self.linear_fc1(x)))


class PatchMerger(nnx.Module):
    """``Qwen3VLVisionPatchMerger``; ``postshuffle`` normalises the merged 4C vector (DeepStack)."""

    def __init__(self, cfg: VisionConfig, dtype, postshuffle: bool = False):
        c4 = cfg.hidden_size * cfg.spatial_merge_size**2
        self.postshuffle = postshuffle
        self.norm = LayerNorm(c4 if postshuffle else cfg.hidden_size, 1e-6, dtype=dtype)
        self.linear_fc1 = Linear(c4, c4, bias=True, dtype=dtype, names=(None, "mlp"))
        self.linear_fc2 = Linear(c4, cfg.out_hidden_size, bias=True, dtype=dtype, names=("mlp", "embed"))

    def __call__(self, x):
        """x [N,C] -> [M,E]."""
        c4 = self.linear_fc1.kernel.shape[0]
        x = self.norm(x.reshape(-1, c4)) if self.postshuffle else self.norm(x).reshape(-1, c4)
        return self.linear_fc2(in_float32(lambda h: jax.nn.gelu(h, approximate=False))(self.linear_fc1(x)))


class VisionTransformer(nnx.Module):
    """Qwen3-VL ViT with its DeepStack mergers (``deepstack_merger_list``)."""

    #: host side: image_grid_thw -> the VisionInputs this tower reads
    host_inputs = staticmethod(vision_inputs)

    def __init__(self, cfg: VisionConfig, dtype):
        self.cfg = cfg
        patch_dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2
        self.patch_embed = Linear(patch_dim, cfg.hidden_size, bias=True, dtype=dtype, names=(None, "embed"))
        self.pos_embed = Embedding(cfg.num_position_embeddings, cfg.hidden_size, dtype, names=(None, "embed"))
        self.blocks = nnx.List(
            [
                VisionBlock(cfg, dtype, norm=LayerNorm, mlp=VisionMlp(cfg.hidden_size, cfg.intermediate_size, dtype=dtype))
                for _ in range(cfg.depth)
            ]
        )
        self.merger = PatchMerger(cfg, dtype)
        self.deepstack_merger_list = nnx.List([PatchMerger(cfg, dtype, postshuffle=True) for _ in cfg.deepstack_visual_indexes])

    def __call__(self, pixel_values: Array, vis: VisionInputs, interventions=(), probes=()):
        """pixel_values [N, C·T·P·P] -> (features [M,E], deepstack features ([M,E], ...), probe results)."""
        cfg = self.cfg
        x = self.patch_embed(pixel_values.astype(self.patch_embed.kernel.dtype))  # [N,C]
        table = self.pos_embed.weight[...]
        x = x + jnp.sum(table[vis.interp_index] * vis.interp_weight[..., None], axis=1).astype(x.dtype)
        cos, sin = vision_rotary(cfg, vis.rotary_pos)
        results, deep = {}, []
        for i, blk in enumerate(self.blocks):
            x, res = blk(x, cos, sin, vis.frames, Site("vision", i), interventions, probes)
            collect(results, res, i)
            if i in cfg.deepstack_visual_indexes:
                deep.append(self.deepstack_merger_list[cfg.deepstack_visual_indexes.index(i)](x))
        return self.merger(x), tuple(deep), results
