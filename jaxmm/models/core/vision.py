"""What every Qwen-style vision tower shares (device side): the packed-segment attention and block.

A tower sees all images of a batch as one sequence of N patches [N, C]. Attention runs inside
segments (an image frame, or a window of one), packed as a padded batch [nS, L] — the attention
"batch" that probes see. The host builds the index arrays (:mod:`.vision_inputs`); the families'
``vision.py`` modules build their towers from :class:`VisionAttention` and :class:`VisionBlock`.

Every tower's ``__call__(pixel_values, vision, interventions, probes)`` returns
``(features [M, E], deepstack, results)``: the merged tokens in the processor's order, a tuple of
per-decoder-layer features ([M, E] each, added to the image tokens after decoder layers 0, 1, …;
``()`` for towers without DeepStack) and the probe results per block.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.nnx as nnx
import jax
import jax.numpy as jnp

from jaxmm.attention import Site, attend
from jaxmm.models.core.layers import Linear, apply_rope, in_float32

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Segments:
    """Contiguous segments of a length-N sequence packed into a padded batch (built on the host by
    :func:`~jaxmm.models.core.vision_inputs.segments`).

    index [nS,L] int32: sequence position of each slot (padding slots point at 0).
    valid [nS,L] bool: real slots. inverse [N] int32: flat slot (in nS·L) of each position.
    """

    index: Any
    valid: Any
    inverse: Any


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VisionInputs:
    """Index arrays a vision tower needs, computed on the host from ``image_grid_thw``.

    rotary_pos [N,2] int32: (row, col) of each patch, in the order the blocks see the patches.
    frames: :class:`Segments` of image frames (HF ``cu_seqlens``).
    window_index [M] int32 or None: merged-token order inside windows, for windowed towers (HF
    ``get_vision_window_index``); reverse_index [M] int32 or None: its argsort.
    windows: :class:`Segments` of attention windows (HF ``cu_window_seqlens``) or None.
    interp_index, interp_weight [N,4] int32 / float32 or None: bilinear taps into a learned position
    table, for towers that have one (HF ``get_vision_interpolation_indices_and_weights``).
    """

    rotary_pos: Any
    frames: Any
    window_index: Any = None
    reverse_index: Any = None
    windows: Any = None
    interp_index: Any = None
    interp_weight: Any = None


def vision_rotary(cfg, rotary_pos: Array) -> tuple[Array, Array]:
    """2-D rotary angles: (row, col) positions [N,2] -> cos, sin [N,D] float32 (frequencies over
    D/4, row and column concatenated, then duplicated over the head dim; HF ``VisionRotaryEmbedding``)."""
    d = cfg.head_dim // 2
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    ang = (rotary_pos.astype(jnp.float32)[..., None] * inv_freq).reshape(rotary_pos.shape[0], -1)
    ang = jnp.concatenate([ang, ang], axis=-1)
    return jnp.cos(ang), jnp.sin(ang)


class VisionAttention(nnx.Module):
    """Fused-qkv attention with 2-D rotary inside segments (HF ``VisionAttention``)."""

    def __init__(self, cfg, dtype):
        c = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.qkv = Linear(c, 3 * c, bias=True, dtype=dtype, names=("embed", "heads"))
        self.proj = Linear(c, c, bias=True, dtype=dtype, names=("heads", "embed"))

    def __call__(self, x: Array, cos: Array, sin: Array, seg: Segments, site: Site, interventions, probes):
        """x [N,C]; attention runs inside each segment of ``seg``, packed as [nS, L].
        Returns (output [N,C], probe results)."""
        n, c = x.shape
        qkv = self.qkv(x).reshape(n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # [N,H,D]
        q_pre, k_pre = q[seg.index], k[seg.index]
        q = apply_rope(q, cos[:, None], sin[:, None])[seg.index]  # [nS,L,H,D]
        k = apply_rope(k, cos[:, None], sin[:, None])[seg.index]
        site = dataclasses.replace(site, q_pre=q_pre, k_pre=k_pre)
        out, res = attend(
            q,
            k,
            v[seg.index],
            site=site,
            mask=seg.valid[:, None, None, :],
            scale=(c // self.num_heads) ** -0.5,
            interventions=interventions,
            probes=probes,
        )
        out = out.reshape(-1, c)[seg.inverse]  # back to [N,C]
        return self.proj(out), res


class VisionBlock(nnx.Module):
    """Pre-norm block ``x + attn(norm1(x))``, then ``+ mlp(norm2(x))``; ``norm`` is the family's
    norm class (called ``norm(dim, 1e-6, dtype=...)``) and ``mlp`` its MLP module."""

    def __init__(self, cfg, dtype, *, norm: type, mlp: nnx.Module):
        self.norm1 = norm(cfg.hidden_size, 1e-6, dtype=dtype)
        self.norm2 = norm(cfg.hidden_size, 1e-6, dtype=dtype)
        self.attn = VisionAttention(cfg, dtype)
        self.mlp = mlp

    def __call__(self, x, cos, sin, seg, site, interventions, probes):
        h, res = self.attn(self.norm1(x), cos, sin, seg, site, interventions, probes)
        x = x + h
        return x + self.mlp(self.norm2(x)), res


class PatchMerger(nnx.Module):
    """``norm`` (the family's class: RMSNorm or LayerNorm, eps 1e-6), each ``merge × merge`` block of
    patches grouped into one vector, then Linear-GELU-Linear (``Qwen2_5_VLPatchMerger`` /
    Qwen2-VL's ``PatchMerger``). ``mlp_0``/``mlp_2`` stand for torch's ``mlp.0``/``mlp.2``."""

    def __init__(self, cfg, dtype, *, norm: type):
        c4 = cfg.hidden_size * cfg.spatial_merge_size**2
        self.ln_q = norm(cfg.hidden_size, 1e-6, dtype=dtype)
        self.mlp_0 = Linear(c4, c4, bias=True, dtype=dtype, names=(None, "mlp"))
        self.mlp_2 = Linear(c4, cfg.out_hidden_size, bias=True, dtype=dtype, names=("mlp", "embed"))

    def __call__(self, x: Array) -> Array:
        """x [N,C] -> [M,E]."""
        x = self.ln_q(x)
        x = x.reshape(-1, self.mlp_0.kernel.shape[0])
        return self.mlp_2(in_float32(lambda h: jax.nn.gelu(h, approximate=False))(self.mlp_0(x)))


def collect(results: dict, res: dict, layer: int) -> None:
    """Adds one layer's probe results ``{name: value}`` into ``results[name][layer]``."""
    for name, value in res.items():
        results.setdefault(name, {})[layer] = value
