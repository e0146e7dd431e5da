"""VAR — visual attention redistribution from sink tokens (Kang et al., "See What You Are Told:
Visual Attention Sink in Large Multimodal Models", ICLR 2025; methods.md "Related baselines").

* Sink tokens [paper]: keys whose normalised hidden state has a massive activation,
  max_{d ∈ D_sink} |RMSNorm(x)_d| > τ (τ = 20). D_sink is model-specific and must be given
  (``dims``; empty = no sinks). Only image keys are considered [inferred].
* Image-centric heads [paper]: per (head, query row), image mass m_V ≥ 0.2 and sink share
  Σ_{V∩sink} a / m_V ≤ 0.5 [share definition inferred].
* Redistribution [paper]: in those rows, sink weights × p (p = 0.6); the freed mass goes to the
  non-sink image keys in proportion to their weights (row sums unchanged). Layers ≥ 2.

At prefill the sink set comes from the layer's own hidden states of every key the call writes
(``site.call_hidden`` at ``site.call_pos``, whole even when the explicit path runs in query
chunks); for decoding, :meth:`VAR.after_prefill` stores the prefill's sink sets ([L,B,K];
generated tokens are never sinks).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxmm.attention import Intervention, Probe, Site, static_field
from jaxmm.interventions.keys import _iv
from jaxmm.probes import _probe


def sink_tokens(hidden: jax.Array, image: jax.Array, dims: tuple[int, ...], tau: float = 20.0) -> jax.Array:
    """hidden [B,S,E] (RMS-normalised layer input), image [B,S] -> sinks [B,S] bool."""
    if not dims:
        return jnp.zeros(image.shape, bool)
    peak = jnp.max(jnp.abs(hidden[..., list(dims)].astype(jnp.float32)), -1)
    return (peak > tau) & image


@_probe
class SinkTokens(Probe):
    """The sink set of each layer's keys at prefill -> [B,S] (float 0/1)."""

    name: str = static_field("var_sinks")
    layers: tuple[int, ...] | None = static_field(None)
    towers: tuple[str, ...] = static_field(("text",))
    query_axis: int = static_field(-1)
    dims: tuple[int, ...] = static_field(())
    tau: float = static_field(20.0)

    def __call__(self, a, site: Site):
        qp = site.query_pos
        image = site.layout.image_mask[:, jnp.clip(qp, 0)] & (qp >= 0)[None]            # [B,T]
        return sink_tokens(site.hidden, image, self.dims, self.tau).astype(jnp.float32)


def redistribute(a, image, sinks, p: float = 0.6, min_mass: float = 0.2, max_share: float = 0.5):
    """The VAR edit of weights a [B,H,T,K] with image/sinks [B,K] (see module doc)."""
    img = image.astype(jnp.float32)[:, None, None, :]
    snk = (sinks & image).astype(jnp.float32)[:, None, None, :]
    m_v = jnp.sum(a * img, -1, keepdims=True)
    m_s = jnp.sum(a * snk, -1, keepdims=True)
    rest = jnp.sum(a * img * (1 - snk), -1, keepdims=True)
    centric = (m_v >= min_mass) & (m_s <= max_share * m_v) & (m_s > 0) & (rest > 0)
    freed = (1 - p) * m_s
    edited = a * (1 - snk * (1 - p)) + freed * a * img * (1 - snk) / jnp.where(rest > 0, rest, 1.0)
    return jnp.where(centric, edited, a)


@_iv
class VAR(Intervention):
    dims: tuple[int, ...] = static_field(())
    tau: float = static_field(20.0)
    p: float = static_field(0.6)
    min_mass: float = static_field(0.2)
    max_share: float = static_field(0.5)
    sinks: jax.Array | None = None             # [L,B,K] after prefill
    layers: tuple[int, ...] | None = static_field(None)
    towers: tuple[str, ...] = static_field(("text",))

    def prefill_probes(self):
        return (SinkTokens(dims=self.dims, tau=self.tau, layers=self.layers),)

    def after_prefill(self, probe_results, layout):
        s = probe_results["var_sinks"]["text"]
        vals = s.values > 0.5                                                        # [L',B,S]
        full = jnp.zeros((max(s.layers) + 1,) + layout.image_mask.shape, bool)
        full = full.at[jnp.asarray(s.layers), :, :vals.shape[-1]].set(vals)
        return dataclasses.replace(self, sinks=full)

    def weights(self, a, site):
        if self.sinks is not None:
            sinks = self.sinks[site.layer]
        else:   # phase 1 = a prefill: the call's tokens are the keys at call_pos (a cache holds more)
            pos = site.call_pos
            image = jnp.take(site.layout.image_mask, pos, axis=1)                        # [B,T]
            own = sink_tokens(site.call_hidden, image, self.dims, self.tau)
            sinks = jnp.zeros(site.layout.image_mask.shape, bool).at[:, pos].set(own)
        return redistribute(a, site.layout.image_mask, sinks, self.p, self.min_mass, self.max_share)


def var(num_layers: int, dims: tuple[int, ...], **kw) -> VAR:
    """VAR on layers 2 … num_layers−1."""
    return VAR(dims=tuple(dims), layers=tuple(range(2, num_layers)), **kw)
