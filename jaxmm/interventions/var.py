"""VAR — visual attention redistribution from sink tokens (Kang et al., "See What You Are Told:
Visual Attention Sink in Large Multimodal Models", ICLR 2025; code seilk/VisAttnSink).

* Sink tokens [paper]: keys whose normalised hidden state has a massive activation,
  max_{d ∈ D_sink} |RMSNorm(x)_d| > τ (τ = 20). D_sink is model-specific and must be given
  (``dims``; empty = no sinks). Only image keys are considered (the release takes text tokens too).
* Image-centric heads [paper]: per (head, query row), image mass m_V ≥ 0.2 and sink share
  Σ_{V∩sink} a / m_V ≤ 0.5 (the release's share, with 1e-6 per image key in the denominator).
* Redistribution [paper]: in those rows, sink weights × p (p = 0.6); the freed mass goes to the
  non-sink image keys in proportion to their weights (row sums unchanged). Layers ≥ 2.

At prefill the sink set comes from the layer's own hidden states of every key the call writes
(``site.call_hidden`` at ``site.call_pos``, whole even when the explicit path runs in query
chunks); for decoding, :meth:`VAR.after_prefill` stores the prefill's sink sets ([L,B,K];
generated tokens are never sinks).

``variant="released"`` follows the authors' code (seilk/VisAttnSink, ``src/logic/logic.py``,
``src/model/llava.py``) where it differs: sinks are every token (text too) whose weightless RMS norm
of the layer's input (the residual stream, before the layer's own norm) exceeds τ on D_sink; the
image keys are one span per row (first to last image token); a head row is image-centric when
Σ_span a ≥ 0.2 and Σ_{span∩sink} a / Σ_span (a + 1e-6) ≤ 0.5, in a row whose span holds a sink,
and, at prefill, only rows after the span are edited; there every sink weight (text sinks too) ×
p and the freed mass goes to the span's non-sink keys in proportion. docs/methods.md lists every
difference.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxmm.attention import Intervention, Probe, Site, register, static_field
from jaxmm.interventions.keys import image_span
from jaxmm.probes import key_mass, visual_mass


VARIANTS = ("paper", "released")


def _check_variant(variant):
    if variant not in VARIANTS:
        raise ValueError(f"VAR: variant={variant!r}; expected one of {VARIANTS}")


def sink_tokens(hidden: jax.Array, image: jax.Array, dims: tuple[int, ...], tau: float = 20.0) -> jax.Array:
    """hidden [B,S,E] (RMS-normalised layer input), image [B,S] -> sinks [B,S] bool."""
    if not dims:
        return jnp.zeros(image.shape, bool)
    peak = jnp.max(jnp.abs(hidden[..., list(dims)].astype(jnp.float32)), -1)
    return (peak > tau) & image


def released_sink_tokens(residual: jax.Array, dims: tuple[int, ...], tau: float = 20.0) -> jax.Array:
    """residual [B,S,E] (the layer's input, before its norm) -> sinks [B,S] bool, every token.

    released: logic.py:99-109 (x·rsqrt(mean x² + 1e-6) in float32, no norm weight; text tokens too).
    """
    if not dims:
        return jnp.zeros(residual.shape[:-1], bool)
    x = residual.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)
    return jnp.max(jnp.abs(x[..., list(dims)]), -1) > tau


@register
class SinkTokens(Probe):
    """The sink set of each layer's keys at prefill -> [B,S] (float 0/1)."""

    name: str = static_field("var_sinks")
    layers: tuple[int, ...] | None = static_field(None)
    towers: tuple[str, ...] = static_field(("text",))
    query_axis: int = static_field(-1)
    dims: tuple[int, ...] = static_field(())
    tau: float = static_field(20.0)
    variant: str = static_field("paper")

    def __call__(self, a, site: Site):
        qp = site.query_pos
        if self.variant == "released":
            return (released_sink_tokens(site.residual, self.dims, self.tau) & (qp >= 0)[None]).astype(jnp.float32)
        image = site.layout.image_mask[:, jnp.clip(qp, 0)] & (qp >= 0)[None]  # [B,T]
        return sink_tokens(site.hidden, image, self.dims, self.tau).astype(jnp.float32)


def redistribute(a, image, sinks, p: float = 0.6, min_mass: float = 0.2, max_share: float = 0.5):
    """The VAR edit of weights a [B,H,T,K] with image/sinks [B,K] (see module doc)."""
    img = image.astype(jnp.float32)[:, None, None, :]
    snk = (sinks & image).astype(jnp.float32)[:, None, None, :]
    m_v = visual_mass(a, image)[..., None]  # [B,H,T,1]
    m_s = key_mass(a, sinks & image)[..., None]
    rest = key_mass(a, image & ~sinks)[..., None]
    centric = (m_v >= min_mass) & (m_s <= max_share * m_v) & (m_s > 0) & (rest > 0)
    freed = (1 - p) * m_s
    edited = a * (1 - snk * (1 - p)) + freed * a * img * (1 - snk) / jnp.where(rest > 0, rest, 1.0)
    return jnp.where(centric, edited, a)


def redistribute_released(a, span, sinks, query_pos, p: float = 0.6, min_mass: float = 0.2, max_share: float = 0.5):
    """The released VAR edit of weights a [B,H,T,K]; span/sinks [B,K] bool, query_pos [T]."""
    spn = span.astype(jnp.float32)[:, None, None, :]
    vis = (sinks & span).astype(jnp.float32)[:, None, None, :]  # logic.py:189
    snk = sinks.astype(jnp.float32)[:, None, None, :]  # text sinks too: logic.py:190,196
    # logic.py:123-125: no sink in the span -> no head is selected
    has_vis = jnp.any(sinks & span, -1)[:, None, None, None]
    # logic.py:129: the denominator adds 1e-6 per span key
    portion = jnp.sum(a * vis, -1, keepdims=True) / jnp.sum((a + 1e-6) * spn, -1, keepdims=True)
    m_v = jnp.sum(a * spn, -1, keepdims=True)  # logic.py:130
    end = jnp.max(jnp.where(span, jnp.arange(span.shape[-1]), -1), -1)  # the span's last key [B]
    # logic.py:179: at prefill only query rows after the span (a decoded row always is)
    after = (query_pos[None, :] > end[:, None])[:, None, :, None]
    rest = a * spn * (1 - vis)  # logic.py:204
    total = jnp.sum(rest, -1, keepdims=True)
    centric = has_vis & (portion <= max_share) & (m_v >= min_mass) & after  # logic.py:133-138
    centric = centric & (total > 0)  # ours: logic.py:207 divides 0/0 (a NaN row) there
    freed = (1 - p) * jnp.sum(a * snk, -1, keepdims=True)  # logic.py:200-201
    ratio = rest / jnp.where(total > 0, total, 1.0)  # logic.py:207
    edited = a * (1 - snk * (1 - p)) + freed * ratio  # logic.py:196-197, 210
    return jnp.where(centric, edited, a)


@register
class VAR(Intervention):
    """VAR's sink-attention redistribution (module doc; Kang et al., ICLR 2025, seilk/VisAttnSink
    ``src/logic/logic.py``) on the ``weights`` stage: sinks found from the hidden states on the
    sink dimensions ``dims`` (threshold ``tau``), then in image-centric head rows (image mass ≥
    ``min_mass``, sink share ≤ ``max_share``) sink weights × ``p`` and the freed mass given to the
    other image keys. ``sinks`` [L,B,K] bool is set by :meth:`after_prefill`.

    Raises:
        ValueError: an unknown ``variant``.
    """

    dims: tuple[int, ...] = static_field(())
    tau: float = static_field(20.0)
    p: float = static_field(0.6)
    min_mass: float = static_field(0.2)
    max_share: float = static_field(0.5)
    sinks: jax.Array | None = None  # [L,B,K] after prefill
    layers: tuple[int, ...] | None = static_field(None)
    towers: tuple[str, ...] = static_field(("text",))
    variant: str = static_field("paper")

    def __post_init__(self):
        _check_variant(self.variant)

    def prefill_probes(self):
        """The sink sets of the prompt's keys at every edited layer (:class:`SinkTokens`)."""
        return (SinkTokens(dims=self.dims, tau=self.tau, layers=self.layers, variant=self.variant),)

    def after_prefill(self, probe_results, layout):
        """Stores the prefill's sink sets as ``sinks`` [L,B,K] bool (generated keys never sinks)."""
        s = probe_results["var_sinks"]["text"]
        vals = s.values > 0.5  # [L',B,S]
        full = jnp.zeros((max(s.layers) + 1,) + layout.image_mask.shape, bool)
        full = full.at[jnp.asarray(s.layers), :, : vals.shape[-1]].set(vals)
        return dataclasses.replace(self, sinks=full)

    def weights(self, a, site):
        """a [B,H,T,K] float32 -> redistributed rows (row sums unchanged); at a prefill the sinks
        come from this call's own hidden states, afterwards from ``sinks``."""
        released = self.variant == "released"
        if self.sinks is not None:
            sinks = self.sinks[site.layer]
        else:  # phase 1 = a prefill: the call's tokens are the keys at call_pos (a cache holds more)
            pos = site.call_pos
            if released:  # released: llava.py:314-316, sinks from this layer's input at prefill
                own = released_sink_tokens(site.call_residual, self.dims, self.tau)
            else:
                image = jnp.take(site.layout.image_mask, pos, axis=1)  # [B,T]
                own = sink_tokens(site.call_hidden, image, self.dims, self.tau)
            sinks = jnp.zeros(site.layout.image_mask.shape, bool).at[:, pos].set(own)
        if released:
            span = image_span(site.layout.image_mask)  # released: logic.py:122 (im, pa: one slice)
            return redistribute_released(a, span, sinks, site.query_pos, self.p, self.min_mass, self.max_share)
        return redistribute(a, site.layout.image_mask, sinks, self.p, self.min_mass, self.max_share)


def var(num_layers: int, dims: tuple[int, ...], **kw) -> VAR:
    """VAR on layers 2 … num_layers−1."""
    return VAR(dims=tuple(dims), layers=tuple(range(2, num_layers)), **kw)
