"""The text decoder every family shares: M-RoPE, grouped-query attention on the seam, the KV cache.

Mirrors ``Qwen2_5_VLTextModel`` / ``Qwen3VLTextModel`` (transformers 5.x): pre-norm decoder layers
(RMSNorm, attention, RMSNorm, SwiGLU), each switch set by :class:`~.config.TextConfig` (q/k/v
biases, per-head q/k RMSNorm, contiguous or interleaved M-RoPE sections, explicit head_dim).

Einsum letters: B batch, S sequence, T queries, K keys, E text width, H heads, G kv heads, D head
dim, L layers, M merged vision tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np

from jaxmm.attention import Site, attend
from jaxmm.models.core.config import TextConfig
from jaxmm.models.core.layers import Embedding, Linear, RMSNorm, SwiGLU, apply_rope

Array = jax.Array


def mrope_cos_sin(position_ids: Array, cfg: TextConfig) -> tuple[Array, Array]:
    """M-RoPE angles: frequency ``i`` reads the temporal/height/width position by ``mrope_section``.

    position_ids [3,B,S] -> cos, sin [B,S,D] float32 (``Qwen2_5_VLRotaryEmbedding``).
    """
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))  # [D/2]
    axis = mrope_axes(cfg)  # [D/2]
    pos = position_ids.astype(jnp.float32)[axis, :, :]  # [D/2,B,S]
    ang = jnp.moveaxis(pos, 0, -1) * inv_freq  # [B,S,D/2]
    ang = jnp.concatenate([ang, ang], axis=-1)
    return jnp.cos(ang), jnp.sin(ang)


def mrope_axes(cfg: TextConfig) -> np.ndarray:
    """Which position axis (0 = t, 1 = h, 2 = w) each of the D/2 frequencies reads.

    Contiguous sections ``[t]*s0 + [h]*s1 + [w]*s2`` (``mrope_interleaved`` false), or interleaved
    (frequency i reads h if i % 3 == 1 and i < 3·s1, w if i % 3 == 2 and i < 3·s2, else t).
    """
    n = cfg.head_dim // 2
    if not cfg.mrope_interleaved:
        return np.repeat(np.arange(3), cfg.mrope_section)
    i = np.arange(n)
    axis = np.zeros(n, np.int64)
    axis[(i % 3 == 1) & (i < 3 * cfg.mrope_section[1])] = 1
    axis[(i % 3 == 2) & (i < 3 * cfg.mrope_section[2])] = 2
    return axis


class TextAttention(nnx.Module):
    """Grouped-query self-attention through :func:`jaxmm.attention.attend` (the seam)."""

    def __init__(self, cfg: TextConfig, dtype):
        e, d = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, d
        bias = cfg.attention_bias
        self.q_proj = Linear(e, self.num_heads * d, bias=bias, dtype=dtype, names=("embed", "heads"))
        self.k_proj = Linear(e, self.num_kv_heads * d, bias=bias, dtype=dtype, names=("embed", "kv_heads"))
        self.v_proj = Linear(e, self.num_kv_heads * d, bias=bias, dtype=dtype, names=("embed", "kv_heads"))
        self.o_proj = Linear(self.num_heads * d, e, bias=cfg.o_proj_bias, dtype=dtype, names=("heads", "embed"))
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps, dtype=dtype, name=None) if cfg.qk_norm else None
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps, dtype=dtype, name=None) if cfg.qk_norm else None

    def __call__(self, x, cos, sin, mask, site: Site, interventions, probes, cache=None):
        """x [B,T,E]; cache: None or every layer's (k [L,B,K,G,D], v [L,B,K,G,D], k_pre or None)
        already holding earlier positions; this layer's (``site.layer``) T new keys and values are
        written in place at ``site.query_pos`` (contiguous) before attending over all K keys.
        Returns (output [B,T,E], probe results, the updated cache triple)."""
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q_pre, k_pre = q, k
        q = apply_rope(q, cos[:, :, None], sin[:, :, None])
        k = apply_rope(k, cos[:, :, None], sin[:, :, None])
        if cache is not None:  # one buffer per k/v for all layers, updated in place (no re-stacking)
            k_all, v_all, kp_all = cache
            at = (jnp.int32(site.layer), jnp.int32(0), site.query_pos[0].astype(jnp.int32), jnp.int32(0), jnp.int32(0))
            k_all = jax.lax.dynamic_update_slice(k_all, k.astype(k_all.dtype)[None], at)
            v_all = jax.lax.dynamic_update_slice(v_all, v.astype(v_all.dtype)[None], at)
            k, v = k_all[site.layer], v_all[site.layer]
            if kp_all is not None:  # pre-RoPE key cache (KVCache.empty(pre_rope=True)): all K keys
                kp_all = jax.lax.dynamic_update_slice(kp_all, k_pre.astype(kp_all.dtype)[None], at)
                k_pre = kp_all[site.layer]
            # without it, interventions that read k_pre see the current queries' keys only.
            cache = (k_all, v_all, kp_all)
        site = dataclasses.replace(site, q_pre=q_pre, k_pre=k_pre, hidden=x)
        out, res = attend(q, k, v, site=site, mask=mask, scale=self.head_dim**-0.5, interventions=interventions, probes=probes)
        return self.o_proj(out.reshape(b, t, -1)), res, cache


class DecoderLayer(nnx.Module):
    """``x + attn(input_layernorm(x))``, then ``+ mlp(post_attention_layernorm(·))``; residual
    probes read the layer's input and output."""

    def __init__(self, cfg: TextConfig, dtype):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.self_attn = TextAttention(cfg, dtype)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, bias=False, dtype=dtype)

    def __call__(self, x, cos, sin, mask, site, interventions, probes, cache=None):
        h, res, kv = self.self_attn(
            self.input_layernorm(x), cos, sin, mask, dataclasses.replace(site, residual=x), interventions, probes, cache
        )
        y = x + h
        y = y + self.mlp(self.post_attention_layernorm(y))
        for p in probes:
            if p.kind == "residual" and p.selects(site):
                res[p.name] = p.residual(x, y, site)
        return y, res, kv


class TextModel(nnx.Module):
    """``embed_tokens``, the decoder ``layers`` and the final ``norm`` (HF ``language_model``)."""

    def __init__(self, cfg: TextConfig, dtype):
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype)
        self.layers = nnx.List([DecoderLayer(cfg, dtype) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of every text layer: k, v [L,B,K,G,D] (after RoPE); ``index`` int32 scalar,
    the number of positions written (the next query's key position); ``k_pre`` [L,B,K,G,D] the
    pre-RoPE keys, kept only when asked for (``pre_rope=True``: interventions such as RAVE that read
    ``site.k_pre`` of every key while decoding), else None."""

    k: Any
    v: Any
    index: Any
    k_pre: Any = None

    @classmethod
    def empty(cls, config, batch_size: int, max_len: int, dtype=jnp.float32, pre_rope: bool = False):
        """A zero cache for ``config.text``: k, v [L, batch_size, max_len, G, D] of ``dtype``."""
        t = config.text
        shape = (t.num_hidden_layers, batch_size, max_len, t.num_key_value_heads, t.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.int32(0), jnp.zeros(shape, dtype) if pre_rope else None)


def splice(embeds: Array, features: Array, image_mask: Array) -> Array:
    """Writes ``features`` [M,E] into ``embeds`` [B,S,E] at the image pad tokens, in row-major
    order (HF ``masked_scatter``)."""
    flat = image_mask.reshape(-1)
    src = jnp.clip(jnp.cumsum(flat) - 1, 0, features.shape[0] - 1)
    out = jnp.where(flat[:, None], features[src], embeds.reshape(flat.shape[0], -1))
    return out.reshape(embeds.shape)


def text_mask(attention_mask: Array, query_pos: Array) -> Array:
    """Causal ∧ key-not-padding mask [B,1,T,K] for queries at key positions ``query_pos`` [T].

    A padded query keeps its own key so no row is empty (its outputs are ignored downstream;
    transformers leaves such rows uniform).
    """
    keys = jnp.arange(attention_mask.shape[-1], dtype=jnp.int32)
    causal = keys[None, :] <= query_pos[:, None]  # [T,K]
    m = causal[None] & (attention_mask[:, None, :] > 0)
    m = m | (keys[None, :] == query_pos[:, None])[None]
    return m[:, None]
