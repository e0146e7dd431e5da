"""AVAR's attention-guided cold-start losses and VARS reward (arXiv 2603.03825; methods.md "AVAR").

Inputs are probe outputs of the chosen layers: per-query image mass ``m_v`` and system mass ``m_s``
[L,B,H,T] (:class:`~jaxmm.probes.VisualMass`, :class:`~jaxmm.probes.KeyMass` on the system span),
masks [B,T] of the queries that count, and the key-set sizes |V|, |S| [B].

* AGTO [code]: ``L_enh = −mean_l mean_h log( mean_{q∈Q, k∈V} A_qk + ε )``,
  ``L_sup = +mean_l mean_h log( mean_{q∈Q, k∈S} A_qk + ε )``; mean_{q∈Q,k∈V} A = Σ_{q∈Q} m_V(q) / (|Q|·|V|).
  Total ``L = L_LM + α·L_enh + β·L_sup``, α = β = 0.15, ε = 1e-6, Q = the user-turn span.
* VARS [paper]: ``r_visual = 0`` if wrong else ``mean_{t∈T} mean_l Σ_{k∈V} A_tk / (Σ_{k∈S} A_tk + ε)``
  (heads averaged as well [inferred]); ``r_total = r_acc + λ_v r_visual + λ_f r_format`` (0.3, 0.1).
  ``variant="released"``: one ratio of total masses over all queries, no correctness gate [code];
  the released system span (first 20 % of the prompt) and layers 0–7 are the caller's choice of
  masks and layers.
"""

from __future__ import annotations

import jax.numpy as jnp


def _block_mean(mass, queries, n_keys):
    """mean over q∈Q, k∈K of A: [L,B,H,T] masses -> [L,B,H]."""
    q = queries.astype(jnp.float32)[None, :, None, :]
    nq = jnp.maximum(jnp.sum(queries, -1), 1).astype(jnp.float32)[None, :, None]
    return jnp.sum(mass * q, -1) / (nq * jnp.maximum(n_keys, 1).astype(jnp.float32)[None, :, None])


def agto_losses(m_v, m_s, queries, n_image, n_system, eps: float = 1e-6):
    """(L_enh, L_sup), scalars averaged over layers, heads and the batch."""
    enh = -jnp.mean(jnp.log(_block_mean(m_v, queries, n_image) + eps))
    sup = jnp.mean(jnp.log(_block_mean(m_s, queries, n_system) + eps))
    return enh, sup


def agto_total(lm_loss, m_v, m_s, queries, n_image, n_system, alpha: float = 0.15, beta: float = 0.15,
               eps: float = 1e-6):
    enh, sup = agto_losses(m_v, m_s, queries, n_image, n_system, eps)
    return lm_loss + alpha * enh + beta * sup


def vars_reward(m_v, m_s, generated, correct, eps: float = 1e-6, variant: str = "paper"):
    """r_visual [B] from masses [L,B,H,T] over the generated tokens ``generated`` [B,T] (bool)."""
    g = generated.astype(jnp.float32)[None, :, None, :]
    if variant == "paper":
        ratio = m_v / (m_s + eps)                                                   # [L,B,H,T]
        per = jnp.sum(ratio * g, -1) / jnp.maximum(jnp.sum(g, -1), 1.0)            # [L,B,H]
        return jnp.where(correct, jnp.mean(per, axis=(0, 2)), 0.0)
    if variant == "released":
        return jnp.sum(m_v * g, axis=(0, 2, 3)) / (jnp.sum(m_s * g, axis=(0, 2, 3)) + eps)
    raise ValueError(f"variant={variant!r}; expected 'paper' or 'released'")


def total_reward(r_acc, r_visual, r_format, lambda_v: float = 0.3, lambda_f: float = 0.1):
    return r_acc + lambda_v * r_visual + lambda_f * r_format


def agto_probes(layers=None):
    """The probes AGTO needs on ``layers`` (None = all): image mass and system mass per query."""
    from jaxmm.probes import KeyMass, VisualMass

    return (VisualMass(layers=layers), KeyMass(layers=layers))


def agto_extra_loss(alpha: float = 0.15, beta: float = 0.15, eps: float = 1e-6):
    """``(model_output, batch) -> α·L_enh + β·L_sup`` for :func:`jaxmm.train.sft.train`'s
    ``extra_losses`` (with ``probes=agto_probes()``); Q = the layout's question span."""

    def loss(out, batch):
        lay = batch.layout
        enh, sup = agto_losses(out.probes["visual_mass"]["text"].values, out.probes["system_mass"]["text"].values,
                               lay.question_mask, jnp.sum(lay.image_mask, -1), jnp.sum(lay.system_mask, -1), eps)
        return alpha * enh + beta * sup

    return loss
