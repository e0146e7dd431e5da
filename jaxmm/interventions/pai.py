"""PAI — "Paying More Attention to Image" (Liu et al., ECCV 2024; code LALBJ/PAI; methods.md "PAI").

Attention amplification, pre-softmax, on the last query row, at layers ``start … end−1``::

    z_ij ← z_ij + α·|z_ij|    for j ∈ V (image keys), i = the last query        [code]

"Last query" is each row's last non-padding query of a call (``site.last_query``): the final
prompt token at prefill — also in a right-padded batch, where it is not the last column — and the
new token at every decode step. Defaults α = 0.2, layers 2–32 (LLaVA-1.5); :func:`pai` maps the range
onto any depth (``end`` defaults to the number of layers).

The optional contrast with a text-only pass (:func:`pai_contrast`) is a logits processor:
``log p ← γ (log p_mm − log p_text) + log p_text``, tokens with ``log p_mm < log 0.1 + max log p_mm``
set to −∞; γ = 1.1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmm.attention import Intervention, static_field
from jaxmm.interventions.keys import _iv, key_set, per_sample


@_iv
class PAI(Intervention):
    alpha: jax.Array = 0.2
    layers: tuple[int, ...] | None = static_field(None)
    towers: tuple[str, ...] = static_field(("text",))

    def logits(self, z, site):
        last = (site.query_pos[None, :] == site.last_query[:, None])[:, None, :, None]   # [B,1,T,1]
        edit = z + per_sample(self.alpha) * jnp.abs(z) * key_set(site, "image")
        return jnp.where(last & site.mask, edit, z)


def pai(num_layers: int, alpha: float = 0.2, start: int = 2, end: int | None = None) -> PAI:
    """PAI on layers ``start … end−1`` (default: 2 … num_layers−1)."""
    end = num_layers if end is None else min(end, num_layers)
    return PAI(alpha=alpha, layers=tuple(range(start, end)))


def pai_contrast(logits_mm: jax.Array, logits_text: jax.Array, gamma: float = 1.1, cutoff: float = 0.1) -> jax.Array:
    """PAI's image-vs-text contrast on next-token logits [..., V] -> contrasted log-probabilities."""
    lp_mm = jax.nn.log_softmax(logits_mm.astype(jnp.float32), -1)
    lp_tx = jax.nn.log_softmax(logits_text.astype(jnp.float32), -1)
    out = gamma * (lp_mm - lp_tx) + lp_tx
    keep = lp_mm >= jnp.log(cutoff) + jnp.max(lp_mm, -1, keepdims=True)
    return jnp.where(keep, out, -jnp.inf)
