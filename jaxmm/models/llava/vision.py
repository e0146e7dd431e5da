"""LLaVA's vision side (Flax NNX): the CLIP vision tower and the multimodal projector.

Mirrors ``CLIPVisionTransformer`` (``transformers/models/clip/modeling_clip.py``, 5.x) and
``LlavaMultiModalProjector`` / ``LlavaModel.get_image_features``
(``transformers/models/llava/modeling_llava.py``): Conv2d patch embedding (as a Linear over
flattened patches), a CLS token, learned position embeddings, ``pre_layrnorm``, pre-norm encoder
layers (LayerNorm, attention with q/k/v/out biases and no rotary, LayerNorm, ``fc2(quick_gelu(fc1))``);
the features are the hidden states of ``vision_feature_layer`` (the penultimate layer by default)
without the CLS token, mapped by ``linear_2(gelu(linear_1(·)))`` to the text width.

Letters: n images, L = 1 + grid² positions per image, C tower width, E text width, H heads, D head dim.
"""

from __future__ import annotations

import dataclasses

import flax.nnx as nnx
import jax
import jax.numpy as jnp

from jaxmm.attention import Site, attend
from jaxmm.models.core.layers import Embedding, LayerNorm, Linear, in_float32, param
from jaxmm.models.core.vision import collect
from jaxmm.models.llava.config import VisionConfig
from jaxmm.models.llava.inputs import vision_inputs

Array = jax.Array


class ClipAttention(nnx.Module):
    """``CLIPAttention``: full attention over each image's L positions."""

    def __init__(self, cfg: VisionConfig, dtype):
        c = cfg.hidden_size
        self.num_heads = cfg.num_heads
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(self, name, Linear(c, c, bias=True, dtype=dtype, names=("embed", "heads")))
        self.out_proj = Linear(c, c, bias=True, dtype=dtype, names=("heads", "embed"))

    def __call__(self, x: Array, site: Site, interventions, probes):
        """x [n,L,C] -> (output [n,L,C], probe results)."""
        n, length, c = x.shape
        d = c // self.num_heads
        q = self.q_proj(x).reshape(n, length, self.num_heads, d)
        k = self.k_proj(x).reshape(n, length, self.num_heads, d)
        v = self.v_proj(x).reshape(n, length, self.num_heads, d)
        site = dataclasses.replace(site, q_pre=q, k_pre=k)
        out, res = attend(q, k, v, site=site, mask=None, scale=d ** -0.5, interventions=interventions, probes=probes)
        return self.out_proj(out.reshape(n, length, c)), res


class ClipMlp(nnx.Module):
    """``CLIPMLP``: ``fc2(quick_gelu(fc1(x)))``."""

    def __init__(self, cfg: VisionConfig, dtype):
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, bias=True, dtype=dtype, names=("embed", "mlp"))
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, bias=True, dtype=dtype, names=("mlp", "embed"))

    def __call__(self, x: Array) -> Array:
        return self.fc2(in_float32(lambda h: h * jax.nn.sigmoid(1.702 * h))(self.fc1(x)))


class ClipEncoderLayer(nnx.Module):
    """``CLIPEncoderLayer``: ``x + attn(layer_norm1(x))``, then ``+ mlp(layer_norm2(·))``."""

    def __init__(self, cfg: VisionConfig, dtype):
        self.layer_norm1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype=dtype)
        self.self_attn = ClipAttention(cfg, dtype)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype=dtype)
        self.mlp = ClipMlp(cfg, dtype)

    def __call__(self, x, site, interventions, probes):
        h, res = self.self_attn(self.layer_norm1(x), site, interventions, probes)
        x = x + h
        return x + self.mlp(self.layer_norm2(x)), res


class ClipEmbeddings(nnx.Module):
    """``CLIPVisionEmbeddings``: patches, CLS token and position embeddings (no interpolation: the
    image must be ``image_size`` pixels square, as the processor makes it)."""

    def __init__(self, cfg: VisionConfig, dtype):
        self.cfg = cfg
        self.class_embedding = param((cfg.hidden_size,), dtype, ("embed",))
        patch_dim = cfg.in_channels * cfg.patch_size ** 2
        self.patch_embedding = Linear(patch_dim, cfg.hidden_size, bias=False, dtype=dtype, names=(None, "embed"))
        self.position_embedding = Embedding(cfg.grid ** 2 + 1, cfg.hidden_size, dtype, names=(None, "embed"))

    def __call__(self, pixel_values: Array) -> Array:
        """pixel_values [n, C_in, S, S] -> [n, L, C]."""
        cfg = self.cfg
        n, ch = pixel_values.shape[:2]
        g, p = cfg.grid, cfg.patch_size
        x = pixel_values.reshape(n, ch, g, p, g, p).transpose(0, 2, 4, 1, 3, 5).reshape(n, g * g, ch * p * p)
        x = self.patch_embedding(x.astype(self.patch_embedding.kernel.dtype))
        cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (n, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1)
        return x + self.position_embedding.weight[...].astype(x.dtype)[None]


class VisionModel(nnx.Module):
    """``CLIPVisionTransformer`` (``vision_model``): embeddings, ``pre_layrnorm``, encoder layers,
    ``post_layernorm`` (loaded with the checkpoint; LLaVA's features do not use it)."""

    def __init__(self, cfg: VisionConfig, dtype):
        self.embeddings = ClipEmbeddings(cfg, dtype)
        self.pre_layrnorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype=dtype)
        self.layers = nnx.List([ClipEncoderLayer(cfg, dtype) for _ in range(cfg.depth)])
        self.post_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype=dtype)


class Projector(nnx.Module):
    """``LlavaMultiModalProjector``: ``linear_2(gelu(linear_1(x)))``."""

    def __init__(self, cfg: VisionConfig, dtype):
        din = cfg.hidden_size * len(cfg.feature_layers)
        bias = cfg.multimodal_projector_bias
        self.linear_1 = Linear(din, cfg.out_hidden_size, bias=bias, dtype=dtype, names=(None, "embed"))
        self.linear_2 = Linear(cfg.out_hidden_size, cfg.out_hidden_size, bias=bias, dtype=dtype, names=("mlp", "embed"))

    def __call__(self, x: Array) -> Array:
        return self.linear_2(in_float32(lambda h: jax.nn.gelu(h, approximate=False))(self.linear_1(x)))


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
        """Runs the layers up to the deepest feature layer. Returns (features [M,E], (), probe results)."""
        cfg, vm = self.cfg, self.vision_model
        x = vm.pre_layrnorm(vm.embeddings(pixel_values))
        hidden, results = [x], {}
        for i in range(max(cfg.feature_layers)):
            x, res = vm.layers[i](x, Site("vision", i), interventions, probes)
            collect(results, res, i)
            hidden.append(x)
        feats = [hidden[i] if cfg.vision_feature_select_strategy == "full" else hidden[i][:, 1:]
                 for i in cfg.feature_layers]
        feats = jnp.concatenate(feats, axis=-1)                                   # [n, tokens, C·layers]
        out = self.multi_modal_projector(feats)
        return out.reshape(-1, out.shape[-1]), (), results
