"""Qwen3-VL (dense) in Flax NNX, on the shared Qwen-VL decoder and attention seam.

Mirrors ``transformers/models/qwen3_vl/modeling_qwen3_vl.py`` (5.x). Differences from Qwen2.5-VL,
each switched on by its config (:mod:`.config`):

* vision tower: patch embedding with bias; a learned position table ``pos_embed``
  [num_position_embeddings, C] resampled bilinearly (align_corners) to each image's grid and added
  to the patch embeddings; LayerNorm blocks with a ``gelu_pytorch_tanh`` MLP (``linear_fc1/2``);
  attention per frame (no windows); merger ``norm → linear_fc1 → GELU → linear_fc2``;
* DeepStack: at ``deepstack_visual_indexes`` a merger with a post-shuffle LayerNorm (over the 2×2
  merged vector) turns the block's output into features added to the image tokens' hidden states
  after decoder layers 0, 1, 2, …;
* text decoder: explicit ``head_dim``, no q/k/v bias, per-head RMSNorm on q and k (``q_norm``,
  ``k_norm``) before RoPE, interleaved M-RoPE.

Note for RATION: k_norm re-normalises every key, so scaling k_proj's output (RATION's released
trick) changes nothing here; jaxmm applies RATION's temperature to the logits, which does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmm.attention import Site
from jaxmm.models.qwen2_5_vl import modeling as base
from jaxmm.models.qwen2_5_vl.config import VisionConfig
from jaxmm.models.qwen3_vl.config import Qwen3VLConfig
from jaxmm.models.qwen2_vl import modeling as qwen2_vl
from jaxmm.models.qwen2_vl.modeling import LayerNorm


class VisionMlp(base.nnx.Module):
    def __init__(self, dim: int, hidden: int, *, dtype):
        self.linear_fc1 = base.Linear(dim, hidden, bias=True, dtype=dtype, names=("embed", "mlp"))
        self.linear_fc2 = base.Linear(hidden, dim, bias=True, dtype=dtype, names=("mlp", "embed"))

    def __call__(self, x):
        return self.linear_fc2(base.in_float32(lambda h: jax.nn.gelu(h, approximate=True))(self.linear_fc1(x)))


class VisionBlock(qwen2_vl.VisionBlock):
    MLP = VisionMlp


class PatchMerger(base.nnx.Module):
    """``Qwen3VLVisionPatchMerger``; ``postshuffle`` normalises the merged 4C vector (DeepStack)."""

    def __init__(self, cfg: VisionConfig, dtype, postshuffle: bool = False):
        c4 = cfg.hidden_size * cfg.spatial_merge_size ** 2
        self.postshuffle = postshuffle
        self.norm = LayerNorm(c4 if postshuffle else cfg.hidden_size, 1e-6, dtype=dtype)
        self.linear_fc1 = base.Linear(c4, c4, bias=True, dtype=dtype, names=(None, "mlp"))
        self.linear_fc2 = base.Linear(c4, cfg.out_hidden_size, bias=True, dtype=dtype, names=("mlp", "embed"))

    def __call__(self, x):
        c4 = self.linear_fc1.kernel.shape[0]
        x = self.norm(x.reshape(-1, c4)) if self.postshuffle else self.norm(x).reshape(-1, c4)
        return self.linear_fc2(base.in_float32(lambda h: jax.nn.gelu(h, approximate=False))(self.linear_fc1(x)))


class Embedding(base.nnx.Module):
    def __init__(self, n: int, dim: int, dtype):
        self.weight = base._param((n, dim), dtype, (None, "embed"))


class VisionTransformer(base.nnx.Module):
    def __init__(self, cfg: VisionConfig, dtype):
        self.cfg = cfg
        patch_dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
        self.patch_embed = base.Linear(patch_dim, cfg.hidden_size, bias=True, dtype=dtype, names=(None, "embed"))
        self.pos_embed = Embedding(cfg.num_position_embeddings, cfg.hidden_size, dtype)
        self.blocks = base.nnx.List([VisionBlock(cfg, dtype) for _ in range(cfg.depth)])
        self.merger = PatchMerger(cfg, dtype)
        self.deepstack_merger_list = base.nnx.List(
            [PatchMerger(cfg, dtype, postshuffle=True) for _ in cfg.deepstack_visual_indexes])

    def __call__(self, pixel_values, vis, interventions=(), probes=()):
        cfg = self.cfg
        x = self.patch_embed(pixel_values.astype(self.patch_embed.kernel.dtype))          # [N,C]
        table = self.pos_embed.weight[...]
        x = x + jnp.sum(table[vis.interp_index] * vis.interp_weight[..., None], axis=1).astype(x.dtype)
        cos, sin = base.vision_rotary(cfg, vis.rotary_pos)
        results, deep = {}, []
        for i, blk in enumerate(self.blocks):
            x, res = blk(x, cos, sin, vis.frames, Site("vision", i), interventions, probes)
            base._collect(results, res, i)
            if i in cfg.deepstack_visual_indexes:
                deep.append(self.deepstack_merger_list[cfg.deepstack_visual_indexes.index(i)](x))
        return (self.merger(x), tuple(deep)), results


class Qwen3VLForConditionalGeneration(base.Qwen2_5_VLForConditionalGeneration):
    """Qwen3-VL (dense): the shared decoder (q/k-norm, interleaved M-RoPE, DeepStack) with the
    Qwen3-VL vision tower."""

    def __init__(self, config, dtype=jnp.float32):
        super().__init__(config, dtype)
        self.visual = VisionTransformer(config.vision, dtype)

Qwen3VLConfig.model_class = Qwen3VLForConditionalGeneration
