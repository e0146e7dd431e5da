"""Probes: the attention primitives the methods share (docs/methods.md), one implementation each.

Every primitive is a pure function of the attention weights ``a`` [B,H,T,K] (float32, rows sum to
1) and boolean/float key sets [B,K] taken from the :class:`~jaxmm.processing.layout.TokenLayout`;
each returns one number per (batch, head, query) ``[B,H,T]`` unless stated. The probe classes wrap
them for :func:`jaxmm.attention.attend`; methods and objectives call the functions directly.
All are differentiable (entropy guards log 0). Natural logarithms (entropies in nats).

Primitive (methods.md)                     function               probe
1. visual mass  m_V = Σ_{j∈V} A_ij           visual_mass            VisualMass
   mass on any key set (m_S, sinks)          key_mass               KeyMass
2. visual entropy H_V (opt. / log|V|)        visual_entropy         VisualEntropy
3. modality ratio VAS = m_V / m_S            vas, mass_ratio        VAS
4. focus ratio R_img, EFR = H_img / R_img    focus_ratio, efr       FocusRatio, EFR
5. region ratio ā_R / ā_V                    region_ratio, key_mean RegionRatio
   raw attention rows (heatmaps)             —                      AttentionRows, AttentionWeights
   residual update on image tokens (RATION)  residual_update        ResidualUpdate

Shapes are annotated with jaxtyping (documentation only: nothing checks them at run time, so jit
tracing pays nothing); ``batch heads query key`` = [B,H,T,K]. Arguments may be numpy arrays.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
from jaxtyping import Float, Shaped

from jaxmm.attention import AttentionWeights, Probe, Site, register, static_field

Array = jax.Array

__all__ = [
    "key_mass",
    "visual_mass",
    "visual_entropy",
    "mass_ratio",
    "vas",
    "focus_ratio",
    "efr",
    "key_mean",
    "region_ratio",
    "residual_update",
    "key_count",
    "VisualMass",
    "KeyMass",
    "VisualEntropy",
    "VAS",
    "FocusRatio",
    "EFR",
    "RegionRatio",
    "AttentionRows",
    "AttentionWeights",
    "ResidualUpdate",
]


def _ksum(a: Array, keys: Array) -> Array:
    """Σ_j a_ij · keys_bj as a matmul: a [B,H,T,K], keys [B,K] (bool or float) -> [B,H,T] float32.

    (On CPU, XLA runs a broadcast-multiply-reduce over K several times slower than this matmul.)
    """
    return jnp.matmul(a, keys.astype(a.dtype)[:, None, :, None])[..., 0]


def _div(n: Array, d: Array, eps: float) -> Array:
    return n / (d + eps) if eps else n / d


def key_mass(a: Float[Array, "batch heads query key"], keys: Shaped[Array, "batch key"]) -> Float[Array, "batch heads query"]:
    """Attention mass on a key set, m(i) = Σ_j A_ij · w_j (primitive 1 on any set; methods.md "Shared
    primitives"): AVAR's system mass m_S, a named span of the layout (:class:`KeyMass`).

    ``keys`` [B,K]: bool (a set) or float weights. Returns [B,H,T] in ``a``'s dtype (float32 on
    every path jaxmm runs), a fraction of the row's mass when the rows sum to 1.
    """
    return _ksum(a, keys)


def visual_mass(a: Float[Array, "batch heads query key"], image: Shaped[Array, "batch key"]) -> Float[Array, "batch heads query"]:
    """m_V(i) = Σ_{j∈V} A_ij, the attention mass on the image keys (primitive 1; methods.md).

    ``image`` [B,K] bool (``layout.image_mask``). Returns [B,H,T] in ``a``'s dtype, in [0, 1] for
    rows that sum to 1. Same as :func:`key_mass` on the image set.
    """
    return _ksum(a, image)


def visual_entropy(
    a: Float[Array, "batch heads query key"],
    image: Shaped[Array, "batch key"],
    normalize: bool = False,
    log_a: Float[Array, "batch heads query key"] | None = None,
    renormalize: bool = True,
) -> Float[Array, "batch heads query"]:
    """H_V = −Σ_{j∈V} Â_j log Â_j with Â_j = A_j / m_V, in nats (primitive 2; RATION's
    visual entropy, Xu et al. ACL Findings 2026, and VRGA's H_img, arXiv 2603.14184: not divided by log|V|).

    Computed as ``log m_V − (Σ_{j∈V} A_j log A_j) / m_V``. ``log_a`` [B,H,T,K]: log A if the caller
    has it (the explicit path passes ``z − logsumexp z``, saving a log per key); otherwise log A is
    taken here. Rows that see no image key, or exactly one, give 0 (a one-point distribution).
    ``normalize=True`` divides by log|V| (|V| ≥ 2, else the result is 0).
    ``renormalize=False``: the raw slice's −Σ_{j∈V} A_j log A_j instead (VRGA's phase-2 gate), no
    guards needed (0 where no image key has weight); ``normalize`` is then ignored.
    Returns [B,H,T] float32.
    """
    img = image.astype(jnp.float32)
    la = jnp.log(jnp.where(a > 0, a, 1.0)) if log_a is None else log_a
    s = _ksum(a * la, img)
    if not renormalize:
        return -s
    m = _ksum(a, img)
    n_seen = _ksum((a > 0).astype(a.dtype), img)
    mm = jnp.where(m > 0, m, 1.0)
    h = jnp.where(n_seen > 1, jnp.log(mm) - s / mm, 0.0)
    if normalize:
        n = jnp.sum(img, axis=-1)[:, None, None]
        h = jnp.where(n > 1, h / jnp.log(jnp.maximum(n, 2.0)), 0.0)
    return h


def mass_ratio(m_v: Float[Array, "*shape"], m_s: Float[Array, "*shape"], eps: float = 0.0) -> Float[Array, "*shape"]:
    """m_V / (m_S + eps) of masses already taken (any matching shapes): :func:`vas` without ``a``
    (AVAR's VARS reward, arXiv 2603.03825, takes it on probe outputs [L,B,H,T]).

    ``eps = 0`` divides as is (a zero m_S gives inf or nan, as the paper's formula does)."""
    return _div(m_v, m_s, eps)


def vas(
    a: Float[Array, "batch heads query key"],
    image: Shaped[Array, "batch key"],
    system: Shaped[Array, "batch key"],
    eps: float = 0.0,
) -> Float[Array, "batch heads query"]:
    """AVAR's Visual Attention Score per query: m_V / (m_S + eps) (primitive 3; arXiv 2603.03825;
    paper: eps = 0). ``image``, ``system`` [B,K] key sets (``layout.image_mask``, ``system_mask``).
    Returns [B,H,T], dimensionless (mass over mass)."""
    return mass_ratio(_ksum(a, image), _ksum(a, system), eps)


def key_count(
    mask: Shaped[Array, "#batch #heads query key"] | None, like: Float[Array, "batch heads query key"]
) -> Float[Array, "batch heads query"]:
    """N: number of keys each query may attend to, from the attention mask (True = visible),
    broadcast to [B,H,T] float32. ``mask=None``: every key of ``like`` (its last axis) counts."""
    if mask is None:
        return jnp.full(like.shape[:-1], like.shape[-1], jnp.float32)
    return jnp.broadcast_to(jnp.sum(mask, axis=-1).astype(jnp.float32), like.shape[:-1])


def focus_ratio(
    a: Float[Array, "batch heads query key"], image: Shaped[Array, "batch key"], n_keys: Float[Array, "batch heads query"]
) -> Float[Array, "batch heads query"]:
    """VRGA's R_img = (m_V / |V|) / (Σ_j A_j / N) (primitive 4; arXiv 2603.14184, methods.md
    "VRGA"): mean weight per image key over mean weight per visible key; 1 = no preference.

    ``n_keys`` [B,H,T] = N (:func:`key_count`). |V| is floored at 1 (a row of a sample without
    image keys gives 0). Returns [B,H,T] float32.
    """
    nv = jnp.sum(image.astype(jnp.float32), axis=-1)[:, None, None]
    total = jnp.sum(a, axis=-1)
    return (_ksum(a, image) / jnp.maximum(nv, 1.0)) / (total / n_keys)


def efr(
    a: Float[Array, "batch heads query key"],
    image: Shaped[Array, "batch key"],
    n_keys: Float[Array, "batch heads query"],
    log_a: Float[Array, "batch heads query key"] | None = None,
) -> Float[Array, "batch heads query"]:
    """VRGA's entropy–focus ratio EFR = H_img / R_img (arXiv 2603.14184) with H_img the
    renormalised image entropy (:func:`visual_entropy`) and R_img :func:`focus_ratio`; low EFR =
    a focused visual head. Returns [B,H,T] float32 (nats)."""
    return visual_entropy(a, image, log_a=log_a) / focus_ratio(a, image, n_keys)


def key_mean(a: Float[Array, "batch heads query key"], keys: Shaped[Array, "batch key"]) -> Float[Array, "batch heads query"]:
    """Mean weight per key of a key set, ā = Σ_j w_j A_j / Σ_j w_j (SAYO's ā_R and ā_V, arXiv
    2602.08241; methods.md "SAYO").

    ``keys`` [B,K] bool or float weights (0/1 or soft); an empty set gives 0. Returns [B,H,T]
    float32.
    """
    w = keys.astype(jnp.float32)
    return _ksum(a, w) / jnp.maximum(jnp.sum(w, -1), 1e-12)[:, None, None]


def region_ratio(
    a: Float[Array, "batch heads query key"],
    image: Shaped[Array, "batch key"],
    region: Shaped[Array, "batch key"],
    eps: float = 0.0,
) -> Float[Array, "batch heads query"]:
    """SAYO's ā_R / ā_V: mean weight per region key over mean weight per image key (primitive 5;
    arXiv 2602.08241).

    ``region`` [B,K] float (0/1 or soft weights, ``layout.region_weight``); ā_R = Σ_j w_j A_j / Σ_j w_j
    (:func:`key_mean`). ``eps = 0``: a sample without image keys gives nan. Returns [B,H,T] float32.
    """
    return _div(key_mean(a, region), key_mean(a, image), eps)


def residual_update(
    h_in: Float[Array, "batch seq embed"], h_out: Float[Array, "batch seq embed"], image: Shaped[Array, "batch seq"]
) -> Float[Array, " batch"]:
    """RATION's layer probe s_l = mean_{j∈V, d} |h_out[j,d] − h_in[j,d]| (methods.md "RATION"):
    the mean absolute change a decoder layer makes to the image tokens' hidden states.

    ``h_in``, ``h_out`` [B,S,E] (any float dtype; computed in float32), ``image`` [B,S] bool or
    weights. Returns [B] float32, in the hidden states' units. Rows without image tokens give 0.
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

        return key_mass(a, getattr(site.layout, KEY_FIELDS[self.keys]))


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
    query_axis: int | None = static_field(None)  # chunks are summed: each holds its own rows

    def __call__(self, a, site: Site):
        k = a.shape[-1]
        if site.layout is not None:
            am = site.layout.attention_mask[:, :k]
            last = k - 1 - jnp.argmax(am[:, ::-1] > 0, axis=-1)  # [B]
        else:
            last = jnp.full((a.shape[0],), k - 1)
        pos = jnp.stack([jnp.full_like(last, p) if p >= 0 else last + 1 + p for p in self.positions], -1)
        sel = (site.query_pos[None, :, None] == pos[:, None, :]).astype(a.dtype)  # [B,T,P]
        return jnp.einsum("bhtk,btp->bhpk", a, sel)


@register
class ResidualUpdate(Probe):
    """RATION's layer probe: mean |h_out − h_in| over image tokens and features, per decoder layer
    -> [B]. Reads hidden states, not attention (``kind = "residual"``); meaningful at prefill."""

    name: str = static_field("residual_update")
    layers: tuple[int, ...] | None = static_field(None)
    towers: tuple[str, ...] = static_field(("text",))
    kind: str = static_field("residual")
    row0_span: bool = static_field(False)  # RATION's release: keys from row 0's first to last image token

    def selects(self, site: Site) -> bool:
        """True at the decoder layers (``layers``, None = all) of the chosen towers."""
        return site.tower in self.towers and (self.layers is None or site.layer in self.layers)

    def residual(
        self, h_in: Float[Array, "batch seq embed"], h_out: Float[Array, "batch seq embed"], site: Site
    ) -> Float[Array, " batch"]:
        """s_l of this call's tokens (:func:`residual_update`): the hidden states before and after
        the layer [B,S,E] of the call's S positions (from ``site.query_pos[0]``) -> [B] float32."""
        k = h_in.shape[1]
        q0 = site.query_pos[0]
        image = site.layout.image_mask
        if self.row0_span:
            from jaxmm.interventions.keys import row0_image_span

            image = row0_image_span(image)
        image = jax.lax.dynamic_slice_in_dim(image, q0, k, axis=1)
        return residual_update(h_in, h_out, image)
