"""Generic key-set interventions: shift logits, scale weights, or add a bias on a set of keys.

They are the building blocks the methods are written with (PAI, AVAR's intervention and VRGA's
boost are key-set edits) and the two sides of methods.md primitive 7: scaling the weights of a key
set by c and renormalising equals adding log c to their logits (``KeyWeightScale(c)`` ≡
``KeyLogitShift(log c)`` ≡ ``KeyBias(log c)``, the last one keeping the fused path).

Key sets are named fields of the TokenLayout: ``"image"`` (image_mask), ``"video"``, ``"system"``,
``"question"``, ``"generated"``, ``"region"`` (region_weight, used as weights).
Numeric leaves broadcast as: scalar; [B] per sample; [B,H] per sample and head.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp

from jaxmm.attention import Intervention, Site, register, static_field

KEY_FIELDS = {
    "image": "image_mask",
    "video": "video_mask",
    "system": "system_mask",
    "question": "question_mask",
    "generated": "generated_mask",
    "region": "region_weight",
}
"""Key-set name (an intervention's or probe's ``keys`` field) -> the boolean [B,T] mask field of
:class:`jaxmm.processing.layout.Layout` that selects those keys."""


def key_set(site: Site, keys: str) -> jax.Array:
    """The key set ``keys`` of ``site.layout`` as float32 [B,1,1,K] (broadcast over heads, queries)."""
    if keys not in KEY_FIELDS:
        raise ValueError(f"unknown key set {keys!r}; expected one of {sorted(KEY_FIELDS)}")
    if site.layout is None:
        raise ValueError(f"key set {keys!r} needs a TokenLayout; the {site.tower} tower has none")
    return getattr(site.layout, KEY_FIELDS[keys]).astype(jnp.float32)[:, None, None, :]


def image_span(image_mask: jax.Array) -> jax.Array:
    """image_mask [B,K] bool -> bool [B,K]: every key from a row's first image key to its last (the
    text between two images included), the one image slice of the PAI and VAR releases."""
    k = jnp.arange(image_mask.shape[-1])
    first = jnp.min(jnp.where(image_mask, k, image_mask.shape[-1]), -1, keepdims=True)
    last = jnp.max(jnp.where(image_mask, k, -1), -1, keepdims=True)
    return (k >= first) & (k <= last)


def row0_image_span(image_mask: jax.Array) -> jax.Array:
    """[B,K] bool -> [B,K]: every key from row 0's first to its last image token, for every row.
    released: entropy_qwen_vl/mixin.py:77,100,149 (idxs of input_ids[0]) and controller.py:28-31."""
    return jnp.broadcast_to(image_span(image_mask[:1]), image_mask.shape)


def per_sample(x) -> jax.Array:
    """Scalar, [B] or [B,H] leaf -> broadcastable to [B,H,T,K]."""
    x = jnp.asarray(x, jnp.float32)
    return x.reshape(x.shape + (1,) * (4 - x.ndim)) if x.ndim else x


@register
class KeyLogitShift(Intervention):
    """``logits`` stage: z_ij += delta for j in the key set (explicit path)."""

    delta: jax.Array = 0.0
    keys: str = static_field("image")
    layers: tuple[int, ...] | None = static_field(None)
    towers: tuple[str, ...] = static_field(("text",))

    def logits(self, z, site):
        """z [B,H,T,K] float32 -> z + delta on the key set (``delta`` scalar, [B] or [B,H])."""
        return z + per_sample(self.delta) * key_set(site, self.keys)


@register
class KeyWeightScale(Intervention):
    """``weights`` stage: a_ij *= scale for j in the key set, then renormalise each row."""

    scale: jax.Array = 1.0
    keys: str = static_field("image")
    layers: tuple[int, ...] | None = static_field(None)
    towers: tuple[str, ...] = static_field(("text",))

    def weights(self, a, site):
        """a [B,H,T,K] float32 -> rows with the key set's weights × ``scale``, renormalised to sum 1."""
        s = key_set(site, self.keys)
        a = a * (1.0 + (per_sample(self.scale) - 1.0) * s)
        return a / jnp.sum(a, axis=-1, keepdims=True)


@register
class KeyBias(Intervention):
    """``bias`` stage: additive pre-softmax bias ``delta`` on the key set (keeps the fused path)."""

    delta: jax.Array = 0.0
    keys: str = static_field("image")
    layers: tuple[int, ...] | None = static_field(None)
    towers: tuple[str, ...] = static_field(("text",))

    def bias(self, site):
        """The additive bias, ``delta`` on the key set and 0 elsewhere, broadcastable to [B,H,T,K]."""
        return per_sample(self.delta) * key_set(site, self.keys)
