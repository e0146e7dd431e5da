"""GRPO pieces (methods.md "GRPO" and SAYO/AVAR recipes): group-normalised advantages, the k3 KL
estimator, and the clipped per-token objective.

* ``A_i = (r_i − mean_g r) / (std_g r + 1e-4)`` over each group of G completions of one prompt
  (sample standard deviation, ddof = 1, as ``torch.std`` [inferred]).
* k3: ``KL ≈ e^δ − δ − 1`` with ``δ = log π_ref − log π_θ`` clamped to [−20, 20].
* Loss ``= −mean over completion tokens of [min(ρ·A, clip(ρ, 1−ε, 1+ε)·A) − β·KL]``,
  ρ = exp(log π_θ − log π_old); per-sequence token means, then the batch mean.
"""

from __future__ import annotations

import jax.numpy as jnp


def group_advantages(rewards, group_size: int, eps: float = 1e-4):
    """rewards [B] with B = n_prompts·G (groups contiguous) -> advantages [B]."""
    r = rewards.reshape(-1, group_size)
    mean = r.mean(-1, keepdims=True)
    std = jnp.std(r, axis=-1, ddof=1, keepdims=True)
    return ((r - mean) / (std + eps)).reshape(-1)


def k3_kl(logp, logp_ref):
    delta = jnp.clip(logp_ref - logp, -20.0, 20.0)
    return jnp.exp(delta) - delta - 1.0


def grpo_loss(logp, logp_old, logp_ref, advantages, mask, beta: float = 0.001, clip_eps: float = 0.2):
    """Per-token log-probs [B,T] of the sampled tokens, advantages [B], completion mask [B,T]."""
    ratio = jnp.exp(logp - logp_old)
    a = advantages[:, None]
    obj = jnp.minimum(ratio * a, jnp.clip(ratio, 1 - clip_eps, 1 + clip_eps) * a) - beta * k3_kl(logp, logp_ref)
    m = mask.astype(jnp.float32)
    per_seq = jnp.sum(obj * m, -1) / jnp.maximum(jnp.sum(m, -1), 1.0)
    return -jnp.mean(per_seq)
