"""Qwen2-VL in Flax NNX: the Qwen2.5-VL model with Qwen2-VL's vision tower.

Mirrors ``transformers/models/qwen2_vl/modeling_qwen2_vl.py`` (5.x). The text decoder (Qwen2 with
M-RoPE), the splice, the lm head, generation and the attention seam are Qwen2.5-VL's
(:mod:`jaxmm.models.qwen2_5_vl.modeling`); the vision tower differs:

* LayerNorm (with bias, eps 1e-6) instead of RMSNorm in the blocks and the merger's ``ln_q``;
* MLP ``fc2(quick_gelu(fc1(x)))`` (``x·σ(1.702x)``) of width ``embed_dim·mlp_ratio``;
* no windows: every block attends within each image frame (HF ``cu_seqlens``), no reordering.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmm.models.qwen2_5_vl import modeling as base
from jaxmm.models.qwen2_5_vl.config import VisionConfig
from jaxmm.models.qwen2_vl.config import Qwen2VLConfig


class LayerNorm(base.nnx.Module):
    def __init__(self, dim: int, eps: float, *, dtype):
        self.weight = base._param((dim,), dtype, ("embed",))
        self.bias = base._param((dim,), dtype, ("embed",))
        self.eps = eps

    def __call__(self, x):
        h = x.astype(jnp.float32)
        mu = jnp.mean(h, -1, keepdims=True)
        var = jnp.mean(jnp.square(h - mu), -1, keepdims=True)
        h = (h - mu) * jax.lax.rsqrt(var + self.eps)
        return (h * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


class VisionMlp(base.nnx.Module):
    def __init__(self, dim: int, hidden: int, *, dtype):
        self.fc1 = base.Linear(dim, hidden, bias=True, dtype=dtype, names=("embed", "mlp"))
        self.fc2 = base.Linear(hidden, dim, bias=True, dtype=dtype, names=("mlp", "embed"))

    def __call__(self, x):
        return self.fc2(base.in_float32(lambda h: h * jax.nn.sigmoid(1.702 * h))(self.fc1(x)))


class VisionBlock(base.VisionBlock):
    """LayerNorm block; ``MLP`` is the family's vision MLP class (Qwen3-VL swaps it)."""

    MLP = VisionMlp

    def __init__(self, cfg: VisionConfig, dtype):
        self.norm1 = LayerNorm(cfg.hidden_size, 1e-6, dtype=dtype)
        self.norm2 = LayerNorm(cfg.hidden_size, 1e-6, dtype=dtype)
        self.attn = base.VisionAttention(cfg, dtype)
        self.mlp = self.MLP(cfg.hidden_size, cfg.intermediate_size, dtype=dtype)


class PatchMerger(base.PatchMerger):
    def __init__(self, cfg: VisionConfig, dtype):
        super().__init__(cfg, dtype)
        self.ln_q = LayerNorm(cfg.hidden_size, 1e-6, dtype=dtype)


class VisionTransformer(base.VisionTransformer):
    def __init__(self, cfg: VisionConfig, dtype):
        super().__init__(cfg, dtype)
        self.blocks = base.nnx.List([VisionBlock(cfg, dtype) for _ in range(cfg.depth)])
        self.merger = PatchMerger(cfg, dtype)


class Qwen2VLForConditionalGeneration(base.Qwen2_5_VLForConditionalGeneration):
    """Qwen2-VL: Qwen2.5-VL's decoder and seam with the Qwen2-VL vision tower."""

    def __init__(self, config, dtype=jnp.float32):
        super().__init__(config, dtype)
        self.visual = VisionTransformer(config.vision, dtype)

Qwen2VLConfig.model_class = Qwen2VLForConditionalGeneration
