"""Probes: the attention primitives the methods share (docs/methods.md), one implementation each.

Every primitive is a pure function of the attention weights ``a`` [B,H,T,K] (float32, rows sum to
1) and boolean/float key sets [B,K] taken from the :class:`~jaxmm.processing.layout.TokenLayout`;
each returns one number per (batch, head, query) ``[B,H,T]`` unless stated. The probe classes wrap
them for :func:`jaxmm.attention.attend`; methods and objectives call the functions directly.
All are differentiable (entropy guards log 0). Natural logarithms.

Primitive (methods.md)                     function               probe
1. visual mass  m_V = Σ_{j∈V} A_ij           visual_mass            VisualMass
2. visual entropy H_V (opt. / log|V|)        visual_entropy         VisualEntropy
3. modality ratio VAS = m_V / m_S            vas                    VAS
4. focus ratio R_img, EFR = H_img / R_img    focus_ratio, efr       FocusRatio, EFR
5. region ratio ā_R / ā_V                    region_ratio           RegionRatio
   raw attention rows (heatmaps)             —                      AttentionRows, AttentionWeights
   residual update on image tokens (RATION)  residual_update        ResidualUpdate
"""

from __future__ import annotations


import jax
import jax.numpy as jnp

from jaxmm.attention import AttentionWeights, Probe, Site, register, static_field

Array = jax.Array

__all__ = ["visual_mass", "visual_entropy", "vas", "focus_ratio", "efr", "region_ratio",
           "residual_update", "key_count", "VisualMass", "KeyMass", "VisualEntropy", "VAS", "FocusRatio", "EFR",
           "RegionRatio", "AttentionRows", "AttentionWeights", "ResidualUpdate"]


def _ksum(a: Array, keys: Array) -> Array:
    """Σ_j a_ij · keys_bj as a matmul: a [B,H,T,K], keys [B,K] (bool or float) -> [B,H,T] float32.

    (On CPU, XLA runs a broadcast-multiply-reduce over K several times slower than this matmul.)
    """
    return jnp.matmul(a, keys.astype(a.dtype)[:, None, :, None])[..., 0]


def _div(n: Array, d: Array, eps: float) -> Array:
    return n / (d + eps) if eps else n / d


def visual_mass(a: Array, image: Array) -> Array:
    """m_V(i) = Σ_{j∈V} A_ij. ``image`` [B,K] bool. -> [B,H,T]."""
    return _ksum(a, image)


def visual_entropy(a: Array, image: Array, normalize: bool = False, log_a: Array | None = None) -> Array:
    """H_V = −Σ_{j∈V} Â_j log Â_j with Â_j = A_j / m_V (primitive 2, RATION/VRGA: unnormalised).

    Computed as ``log m_V − (Σ_{j∈V} A_j log A_j) / m_V``. ``log_a`` [B,H,T,K]: log A if the caller
    has it (the explicit path passes ``z − logsumexp z``, saving a log per key); otherwise log A is
    taken here. Rows that see no image key, or exactly one, give 0 (a one-point distribution).
    ``normalize=True`` divides by log|V| (|V| ≥ 2, else the result is 0).
    """
    img = image.astype(jnp.float32)
    m = _ksum(a, img)
    la = jnp.log(jnp.where(a > 0, a, 1.0)) if log_a is None else log_a
    s = _ksum(a * la, img)
    n_seen = _ksum((a > 0).astype(a.dtype), img)
    mm = jnp.where(m > 0, m, 1.0)
    h = jnp.where(n_seen > 1, jnp.log(mm) - s / mm, 0.0)
    if normalize:
        n = jnp.sum(img, axis=-1)[:, None, None]
        h = jnp.where(n > 1, h / jnp.log(jnp.maximum(n, 2.0)), 0.0)
    return h


def vas(a: Array, image: Array, system: Array, eps: float = 0.0) -> Array:
    """AVAR's Visual Attention Score per query: m_V / (m_S + eps) (primitive 3; paper: eps = 0)."""
    return _div(_ksum(a, image), _ksum(a, system), eps)


def key_count(mask: Array | None, like: Array) -> Array:
    """N: number of keys each query may attend to, from the attention mask, broadcast to [B,H,T]."""
    if mask is None:
        return jnp.full(like.shape[:-1], like.shape[-1], jnp.float32)
    return jnp.broadcast_to(jnp.sum(mask, axis=-1).astype(jnp.float32), like.shape[:-1])


def focus_ratio(a: Array, image: Array, n_keys: Array) -> Array:
    """VRGA's R_img = (m_V / |V|) / (Σ_j A_j / N) (primitive 4); ``n_keys`` [B,H,T] = N."""
    nv = jnp.sum(image.astype(jnp.float32), axis=-1)[:, None, None]
    total = jnp.sum(a, axis=-1)
    return (_ksum(a, image) / jnp.maximum(nv, 1.0)) / (total / n_keys)


def efr(a: Array, image: Array, n_keys: Array, log_a: Array | None = None) -> Array:
    """VRGA's entropy–focus ratio EFR = H_img / R_img with H_img the renormalised image entropy."""
    return visual_entropy(a, image, log_a=log_a) / focus_ratio(a, image, n_keys)


def region_ratio(a: Array, image: Array, region: Array, eps: float = 0.0) -> Array:
    """SAYO's ā_R / ā_V: mean weight per region key over mean weight per image key (primitive 5).

    ``region`` [B,K] float (0/1 or soft weights); ā_R = Σ_j w_j A_j / Σ_j w_j.
    """
    w = region.astype(jnp.float32)
    a_r = _ksum(a, w) / jnp.maximum(jnp.sum(w, -1), 1e-12)[:, None, None]
    nv = jnp.maximum(jnp.sum(image.astype(jnp.float32), -1), 1.0)[:, None, None]
    return _div(a_r, _ksum(a, image) / nv, eps)


def residual_update(h_in: Array, h_out: Array, image: Array) -> Array:
    """RATION's layer probe s_l = mean_{j∈V, d} |h_out[j,d] − h_in[j,d]|. [B,S,E] x2, [B,S] -> [B].

    Rows without image tokens give 0.
    """
    w = image.astype(jnp.float32)
    diff = jnp.mean(jnp.abs(h_out.astype(jnp.float32) - h_in.astype(jnp.float32)), axis=-1)
    return jnp.sum(diff * w, -1) / jnp.maximum(jnp.sum(w, -1), 1.0)


# ----------------------------------------------------------------------------- probe classes


@register
class VisualMass(Probe):
    """m_V per (b, h, query) -> [B,H,T]."""

    name: str = static_field("visual_mass")
    layers: tuple[int, ...] | None = static_field(None)
    towers: tuple[str, ...] = static_field(("text",))

    def __call__(self, a, site: Site):
        return visual_mass(a, site.layout.image_mask)


@register
class KeyMass(Probe):
    """Attention mass on a named key set of the layout (``system``, ``question``, ``region``, …)
    per (b, h, query) -> [B,H,T] (AVAR's m_S with ``keys="system"``)."""

    name: str = static_field("system_mass")
    layers: tuple[int, ...] | None = static_field(None)
    towers: tuple[str, ...] = static_field(("text",))
    keys: str = static_field("system")

    def __call__(self, a, site: Site):
        from jaxmm.interventions.keys import KEY_FIELDS

        return _ksum(a, getattr(site.layout, KEY_FIELDS[self.keys]))


@register
class VisualEntropy(Probe):
    """H_V per (b, h, query) -> [B,H,T]; ``normalize`` divides by log|V|."""

    name: str = static_field("visual_entropy")
    layers: tuple[int, ...] | None = static_field(None)
    towers: tuple[str, ...] = static_field(("text",))
    normalize: bool = static_field(False)

    def __call__(self, a, site: Site):
        return visual_entropy(a, site.layout.image_mask, self.normalize, site.log_weights)


@register
class VAS(Probe):
    """AVAR VAS = m_V / (m_S + eps) per (b, h, query) -> [B,H,T]; S = ``layout.system_mask``."""

    name: str = static_field("vas")
    layers: tuple[int, ...] | None = static_field(None)
    towers: tuple[str, ...] = static_field(("text",))
    eps: float = static_field(0.0)

    def __call__(self, a, site: Site):
        return vas(a, site.layout.image_mask, site.layout.system_mask, self.eps)


@register
class FocusRatio(Probe):
    """VRGA R_img per (b, h, query) -> [B,H,T]; N counts the keys the query may attend to."""

    name: str = static_field("r_img")
    layers: tuple[int, ...] | None = static_field(None)
    towers: tuple[str, ...] = static_field(("text",))

    def __call__(self, a, site: Site):
        return focus_ratio(a, site.layout.image_mask, key_count(site.mask, a))


@register
class EFR(Probe):
    """VRGA EFR = H_img / R_img per (b, h, query) -> [B,H,T]."""

    name: str = static_field("efr")
    layers: tuple[int, ...] | None = static_field(None)
    towers: tuple[str, ...] = static_field(("text",))

    def __call__(self, a, site: Site):
        return efr(a, site.layout.image_mask, key_count(site.mask, a), site.log_weights)


@register
class RegionRatio(Probe):
    """SAYO ā_R / ā_V per (b, h, query) -> [B,H,T]; R = ``layout.region_weight``."""

    name: str = static_field("region_ratio")
    layers: tuple[int, ...] | None = static_field(None)
    towers: tuple[str, ...] = static_field(("text",))
    eps: float = static_field(0.0)

    def __call__(self, a, site: Site):
        return region_ratio(a, site.layout.image_mask, site.layout.region_weight, self.eps)


@register
class AttentionRows(Probe):
    """Raw attention rows of chosen queries -> [B,H,P,K] (heatmaps without full maps).

    ``positions``: key indices of the queries; a negative ``p`` counts back from the last
    non-padding token of each row (``-1`` = last token), using ``layout.attention_mask``.
    Rows whose position is not among this call's queries are zero (e.g. a decode step).
    """

    name: str = static_field("attention_rows")
    layers: tuple[int, ...] | None = static_field(None)
    towers: tuple[str, ...] = static_field(("text",))
    positions: tuple[int, ...] = static_field((-1,))
    query_axis: int | None = static_field(None)   # chunks are summed: each holds its own rows

    def __call__(self, a, site: Site):
        k = a.shape[-1]
        if site.layout is not None:
            am = site.layout.attention_mask[:, :k]
            last = k - 1 - jnp.argmax(am[:, ::-1] > 0, axis=-1)          # [B]
        else:
            last = jnp.full((a.shape[0],), k - 1)
        pos = jnp.stack([jnp.full_like(last, p) if p >= 0 else last + 1 + p for p in self.positions], -1)
        sel = (site.query_pos[None, :, None] == pos[:, None, :]).astype(a.dtype)   # [B,T,P]
        return jnp.einsum("bhtk,btp->bhpk", a, sel)


@register
class ResidualUpdate(Probe):
    """RATION's layer probe: mean |h_out − h_in| over image tokens and features, per decoder layer
    -> [B]. Reads hidden states, not attention (``kind = "residual"``); meaningful at prefill."""

    name: str = static_field("residual_update")
    layers: tuple[int, ...] | None = static_field(None)
    towers: tuple[str, ...] = static_field(("text",))
    kind: str = static_field("residual")
    row0_span: bool = static_field(False)   # RATION's release: keys from row 0's first to last image token

    def selects(self, site: Site) -> bool:
        return site.tower in self.towers and (self.layers is None or site.layer in self.layers)

    def residual(self, h_in, h_out, site: Site):
        k = h_in.shape[1]
        q0 = site.query_pos[0]
        image = site.layout.image_mask
        if self.row0_span:
            from jaxmm.interventions.keys import row0_image_span

            image = row0_image_span(image)
        image = jax.lax.dynamic_slice_in_dim(image, q0, k, axis=1)
        return residual_update(h_in, h_out, image)
