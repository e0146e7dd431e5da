"""The attention seam: one function, :func:`attend`, serves every attention layer of every tower.

Shapes (einsum letters): B batch, T queries, K keys, H query heads, G kv heads, R = H/G heads per
kv group, D head dim.

``attend(q, k, v, *, site, mask, scale, interventions, probes) -> (out, probe_results)``

* ``q`` [B,T,H,D], ``k``/``v`` [B,K,G,D] (after RoPE). GQA: query head ``h`` reads kv head
  ``h // R`` (transformers' ``repeat_kv``).
* ``site`` (:class:`Site`) says where the call happens: tower, static layer index, the
  :class:`~jaxmm.processing.layout.TokenLayout` of keys/queries and the pre-RoPE ``q̃, k̃``.
* ``mask`` bool, broadcastable to [B,H,T,K]; True = may attend.
* An **intervention** (:class:`Intervention`) may have the stages ``bias``, ``logits`` and
  ``weights``; a **probe** (:class:`Probe`) reduces the attention weights of a layer to statistics.
  Both are pytrees whose layer sets are static, so ``jax.jit`` specialises on them.

Two paths, chosen statically per layer: a layer touched by no probe and by no intervention stage
other than ``bias`` runs the fused kernel ``jax.nn.dot_product_attention`` (cuDNN on GPU); any other
layer runs the explicit path (einsum -> logits stage -> softmax in float32 -> weights stage ->
einsum), whose weights equal transformers' eager ``attn_weights``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array

FUSED = "fused"
EXPLICIT = "explicit"


@dataclasses.dataclass(frozen=True)
class Site:
    """Where an attention call happens. Built inside the traced forward; never crosses ``jit``.

    Attributes:
        tower: ``"vision"`` or ``"text"``.
        layer: static layer index within the tower.
        layout: TokenLayout of the text sequence (keys; queries are its last ``T`` positions), or
            None in the vision tower.
        q_pre, k_pre: pre-RoPE queries [B,T,H,D] and keys [B,K,G,D], for interventions that ask.
    """

    tower: str
    layer: int
    layout: Any = None
    q_pre: Array | None = None
    k_pre: Array | None = None


def _selects(layers, tower, towers, site: Site) -> bool:
    return site.tower in towers and (layers is None or site.layer in layers)


class Intervention:
    """Base class of interventions. Subclasses are pytrees (e.g. ``flax.struct.dataclass``) whose
    static fields ``layers`` (tuple of layer indices or None for all) and ``towers`` choose the sites,
    and override any of the stages below. A stage that is not overridden does not run.
    """

    layers: tuple[int, ...] | None = None
    towers: tuple[str, ...] = ("text",)

    def applies(self, site: Site) -> bool:
        return _selects(self.layers, site.tower, self.towers, site)

    def has_stage(self, name: str) -> bool:
        return getattr(type(self), name) is not getattr(Intervention, name)

    def bias(self, site: Site) -> Array:
        """Additive pre-softmax bias, broadcastable to [B,H,T,K] (float32)."""
        raise NotImplementedError

    def logits(self, z: Array, site: Site) -> Array:
        """Maps logits ``z`` [B,H,T,K] (float32, scaled, masked) to new logits."""
        raise NotImplementedError

    def weights(self, a: Array, site: Site) -> Array:
        """Maps attention weights ``a`` [B,H,T,K] (float32, rows sum to 1) to new weights."""
        raise NotImplementedError

    def after_prefill(self, probe_results) -> "Intervention":
        """Two-phase methods re-plan from the prefill's probe results; default: unchanged."""
        return self


class Probe:
    """Base class of probes: reduce a layer's attention weights to statistics.

    Subclasses are pytrees with static ``name``, ``layers`` and ``towers`` and implement
    ``__call__(weights [B,H,T,K] float32, site) -> array``.
    """

    name: str = "probe"
    layers: tuple[int, ...] | None = None
    towers: tuple[str, ...] = ("text",)

    def applies(self, site: Site) -> bool:
        return _selects(self.layers, site.tower, self.towers, site)

    def __call__(self, weights: Array, site: Site) -> Array:
        raise NotImplementedError


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionWeights(Probe):
    """The full attention weights [B,H,T,K] of the chosen layers (for parity checks and heatmaps).

    Memory grows as L·B·H·T·K: ask only for the layers you need.
    """

    name: str = dataclasses.field(default="attentions", metadata=dict(static=True))
    layers: tuple[int, ...] | None = dataclasses.field(default=None, metadata=dict(static=True))
    towers: tuple[str, ...] = dataclasses.field(default=("text",), metadata=dict(static=True))

    def __call__(self, weights, site):
        return weights


def choose_path(site: Site, interventions=(), probes=()) -> str:
    """The path :func:`attend` takes at ``site`` (static): ``"fused"`` or ``"explicit"``."""
    if any(p.applies(site) for p in probes):
        return EXPLICIT
    for iv in interventions:
        if iv.applies(site) and (iv.has_stage("logits") or iv.has_stage("weights")):
            return EXPLICIT
    return FUSED


def attend(q: Array, k: Array, v: Array, *, site: Site, mask: Array | None, scale: float,
           interventions=(), probes=()) -> tuple[Array, dict[str, Array]]:
    """Attention with interventions and probes. See the module docstring for shapes.

    Returns:
        ``out`` [B,T,H,D] in ``q.dtype`` and ``{probe.name: result}`` for the probes that apply here.
    """
    ivs = [iv for iv in interventions if iv.applies(site)]
    prs = [p for p in probes if p.applies(site)]
    bias = None
    for iv in ivs:
        if iv.has_stage("bias"):
            b = iv.bias(site).astype(jnp.float32)
            bias = b if bias is None else bias + b
    if choose_path(site, ivs, prs) == FUSED:
        out = jax.nn.dot_product_attention(
            q, k, v, bias=None if bias is None else bias.astype(q.dtype), mask=mask, scale=scale)
        return out, {}

    B, T, H, D = q.shape
    G = k.shape[2]
    qg = q.reshape(B, T, G, H // G, D)
    z = jnp.einsum("btgrd,bkgd->bgrtk", qg, k, preferred_element_type=jnp.float32)
    z = z.reshape(B, H, T, k.shape[1]) * scale
    if bias is not None:
        z = z + bias
    if mask is not None:
        z = jnp.where(mask, z, jnp.finfo(jnp.float32).min)
    for iv in ivs:
        if iv.has_stage("logits"):
            z = iv.logits(z, site)
    a = jax.nn.softmax(z, axis=-1)
    for iv in ivs:
        if iv.has_stage("weights"):
            a = iv.weights(a, site)
    results = {p.name: p(a, site) for p in prs}
    ag = a.astype(v.dtype).reshape(B, G, H // G, T, k.shape[1])
    out = jnp.einsum("bgrtk,bkgd->btgrd", ag, v).reshape(B, T, H, D)
    return out, results
