"""GRPO pieces (methods.md "GRPO" and SAYO/AVAR recipes): group-normalised advantages, the k3 KL
estimator, and the clipped per-token objective.

* ``A_i = (r_i − mean_g r) / (std_g r + 1e-4)`` over each group of G completions of one prompt
  (sample standard deviation, ddof = 1: ``torch.std`` in TRL and EasyR1, which SAYO and AVAR ran).
* k3: ``KL ≈ e^δ − δ − 1`` with ``δ = log π_ref − log π_θ`` clamped to [−20, 20].
* Loss ``= −mean over completion tokens of [min(ρ·A, clip(ρ, 1−ε, 1+ε)·A) − β·KL]``,
  ρ = exp(log π_θ − log π_old); per-sequence token means, then the batch mean.

``variant`` selects the loss the methods' released RL stages ran with (``LOSS_VARIANTS``):

* ``"easyr1"`` (AVAR's RL stage, EasyR1 as vendored in lrlbbzl/Qwen-AVAR): asymmetric clip
  ``[1 − ε, 1 + ε_high]`` (0.2 / 0.3) applied to the log-ratio, dual clip ``c`` (3) on negative
  advantages, the log-ratio clamped to ±20 before exp, KL = k3 clamped to [−10, 10], one token mean
  over the whole batch (``Σ m·x / (Σ m + 1e-8)``) for both the policy term and the KL term; the
  advantage ε is 1e-6 (``group_advantages(eps=1e-6)``).
* ``"trl"`` (SAYO's, TRL 0.25 ``GRPOTrainer`` defaults, ``loss_type="dapo"``): the symmetric clip,
  k3 not clamped, ``Σ m·(−min(…) + β·k3) / Σ m`` over the batch.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jaxtyping import Array, Float, Shaped

LOSS_VARIANTS = ("paper", "easyr1", "trl")


def group_advantages(rewards: Float[Array, " batch"], group_size: int, eps: float = 1e-4) -> Float[Array, " batch"]:
    """GRPO's group-normalised advantages ``(r − mean_g r) / (std_g r + eps)`` (DeepSeekMath's
    outcome supervision, arXiv 2402.03300; sample std, ddof = 1, as ``torch.std`` in TRL and EasyR1).

    ``rewards`` [B] with B = n_prompts·G (each prompt's G completions contiguous) -> advantages
    [B], dimensionless. A group of identical rewards gives 0. ``group_size`` must divide B (else
    the reshape raises ``TypeError``); G = 1 gives nan (ddof 1 of one sample).
    """
    r = rewards.reshape(-1, group_size)
    mean = r.mean(-1, keepdims=True)
    std = jnp.std(r, axis=-1, ddof=1, keepdims=True)
    return ((r - mean) / (std + eps)).reshape(-1)


def k3_kl(logp: Float[Array, "*shape"], logp_ref: Float[Array, "*shape"], clamp: float | None = 20.0) -> Float[Array, "*shape"]:
    """The k3 estimator of KL(π_θ ‖ π_ref) per token, ``e^δ − δ − 1`` with ``δ = log π_ref − log π_θ``
    (Schulman, "Approximating KL divergence", 2020; the estimator of arXiv 2402.03300), ≥ 0, in nats.

    ``logp``, ``logp_ref`` per-token log-probs of the sampled tokens (any matching shapes, e.g.
    [B,T]). ``clamp``: δ clipped to [−clamp, clamp] before exp (20: EasyR1's ``low_var_kl``;
    None = unclamped, TRL's).
    """
    delta = logp_ref - logp if clamp is None else jnp.clip(logp_ref - logp, -clamp, clamp)
    return jnp.exp(delta) - delta - 1.0


def grpo_loss(
    logp: Float[Array, "batch time"],
    logp_old: Float[Array, "batch time"],
    logp_ref: Float[Array, "batch time"],
    advantages: Float[Array, " batch"],
    mask: Shaped[Array, "batch time"],
    beta: float = 0.001,
    clip_eps: float = 0.2,
    variant: str = "paper",
    clip_eps_high: float | None = None,
    dual_clip: float = 3.0,
) -> Float[Array, ""]:
    """The clipped GRPO objective as a loss to minimise (module doc; arXiv 2402.03300 eq. 3 with
    the k3 KL of :func:`k3_kl`): per-token log-probs [B,T] of the sampled tokens under the policy,
    the rollout policy and the reference, advantages [B] (:func:`group_advantages`), completion
    mask [B,T] (bool or 0/1) -> a float32 scalar.

    ``beta``: the KL weight; ``clip_eps``: ε of the ratio clip. ``clip_eps_high`` (None =
    ``clip_eps``) and ``dual_clip`` are used by ``variant="easyr1"``; ``clip_eps_high`` also by
    ``"trl"``.

    Raises:
        ValueError: ``variant`` not in :data:`LOSS_VARIANTS`.
    """
    if variant not in LOSS_VARIANTS:
        raise ValueError(f"grpo_loss: variant={variant!r}; expected one of {LOSS_VARIANTS}")
    high = clip_eps if clip_eps_high is None else clip_eps_high
    if variant == "easyr1":
        return _easyr1_loss(logp, logp_old, logp_ref, advantages, mask, beta, clip_eps, high, dual_clip)
    if variant == "trl":
        return _trl_loss(logp, logp_old, logp_ref, advantages, mask, beta, clip_eps, high)
    ratio = jnp.exp(logp - logp_old)
    a = advantages[:, None]
    obj = jnp.minimum(ratio * a, jnp.clip(ratio, 1 - clip_eps, 1 + clip_eps) * a) - beta * k3_kl(logp, logp_ref)
    m = mask.astype(jnp.float32)
    per_seq = jnp.sum(obj * m, -1) / jnp.maximum(jnp.sum(m, -1), 1.0)
    return -jnp.mean(per_seq)


def _easyr1_loss(logp, logp_old, logp_ref, advantages, mask, beta, low, high, dual):
    m = mask.astype(jnp.float32)
    a = advantages[:, None]
    log_ratio = logp - logp_old
    # released: Qwen-AVAR EasyR1/verl/trainer/core_algos.py:478-481 (clamp ±20 before exp; the clip
    # applied to the log-ratio, bounds log(1 − low), log(1 + high))
    ratio = jnp.exp(jnp.clip(log_ratio, -20.0, 20.0))
    clipped = jnp.exp(jnp.clip(log_ratio, math.log(1.0 - low), math.log(1.0 + high)))
    # released: core_algos.py:497-504 (dual clip: −A·c bounds the loss of negative-advantage tokens)
    pg_high = jnp.maximum(-a * ratio, -a * clipped)
    pg = jnp.where(a < 0, jnp.minimum(pg_high, -a * dual), pg_high)
    # released: core_algos.py:591-594 (low_var_kl: δ clamped ±20, k3 clamped to [−10, 10])
    kl = jnp.clip(k3_kl(logp, logp_ref), -10.0, 10.0)
    # released: core_algos.py:402-403 + EasyR1/verl/utils/torch_functional.py:75 (loss_avg_mode "token":
    # Σ m·x / (Σ m + 1e-8) over the batch); EasyR1/verl/workers/actor/dp_actor.py:347-348 (pg + kl_coef·kl)
    token_mean = lambda x: jnp.sum(x * m) / (jnp.sum(m) + 1e-8)
    return token_mean(pg) + beta * token_mean(kl)


def _trl_loss(logp, logp_old, logp_ref, advantages, mask, beta, low, high):
    # TRL 0.25 GRPOTrainer._compute_loss (Sayo requirements.txt pins trl==0.25.1; Sayo's trainer keeps it):
    # per-token −min(ρA, clip(ρ, 1 − ε, 1 + ε_high)A) + β·k3 (k3 not clamped), loss_type "dapo" = the
    # sum over the batch's completion tokens / their number
    m = mask.astype(jnp.float32)
    a = advantages[:, None]
    ratio = jnp.exp(logp - logp_old)
    per_token = -jnp.minimum(ratio * a, jnp.clip(ratio, 1 - low, 1 + high) * a) + beta * k3_kl(logp, logp_ref, None)
    return jnp.sum(per_token * m) / jnp.maximum(jnp.sum(m), 1.0)
