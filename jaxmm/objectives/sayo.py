"""SAYO's region attention reward and its companions (arXiv 2602.08241; code Cratileo/Sayo
``train/reward/attn_rewards.py``; methods.md "SAYO").

* Token selection [code]: policy entropy H_t = −Σ_v π log π from logits / temperature; the top
  ``frac`` (30 %) of each sequence's completion positions by entropy.
* r_att [code]: from the LAST decoder layer, mean over heads and selected tokens of the per-key
  means ā_R (keys in the evidence box, primitive 6) and ā_V (image keys), then
  ``r_att = tanh(log((ā_R + 1e-8) / (ā_V + 1e-8)))`` ∈ (−1, 1) [averaging order inferred];
  the paper's diagnostic R_a = ½(1 + r_att).
* Format reward [code]: 1 if exactly one ``<answer>…</answer>``, times min(1, 0.6·100/L) when L > 100
  and 0.6·L/60 when L < 60 (L = completion tokens).

``variant="released"`` (:func:`select_high_entropy`, :func:`format_reward`) follows the release
exactly: top-k over the padded completion width, k = max(1, ⌊0.3·(W − 1)⌋), and the format regex
:data:`ANSWER_PATTERN` (satisfied by the last of several ``<answer>`` blocks). r_att itself is the
release's rule (a mean over the concatenated key values of equal-length rows = the mean of row means).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Shaped

from jaxmm.probes import key_mean
from jaxmm.prompts import PROMPTS

VARIANTS = ("paper", "released")

# released: Sayo train/reward/format_rewards.py:4,6 (re.search with re.DOTALL | re.MULTILINE)
ANSWER_PATTERN = r"<answer>(?!.*<answer>)(.*?)</answer>"


# released: Sayo train/main.py:66-74, the system turn of every training prompt (jaxmm.prompts)
SYSTEM_PROMPT = PROMPTS["sayo"].system


def _check(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"SAYO: variant={variant!r}; expected one of {VARIANTS}")


def token_entropy(logits: Float[Array, "batch time vocab"], temperature: float = 1.0) -> Float[Array, "batch time"]:
    """The policy's entropy per position, H_t = −Σ_v π log π with π = softmax(logits / temperature)
    (SAYO's token selection, Sayo ``train/trainer/grpo_trainer.py``): [B,T,V] (any float dtype,
    computed in float32) -> H_t [B,T] float32 (nats)."""
    lp = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, -1)
    return -jnp.sum(jnp.exp(lp) * lp, -1)


def select_high_entropy(
    entropy: Float[Array, "batch time"], completion: Bool[Array, "batch time"], frac: float = 0.3, variant: str = "paper"
) -> Bool[Array, "batch time"]:
    """[B,T] entropies and completion mask -> bool [B,T]: the top ⌈frac·n⌉ completion positions
    of each row (n its completion length; ties to the earlier position).

    ``variant="released"`` (host-side: needs concrete arrays): W = the longest completion (the
    width the release pads completions to); the last position is dropped, and the top
    k = max(1, ⌊frac·(W − 1)⌋) of positions 0..W−2 are kept in every row, padding included.

    Raises:
        ValueError: ``variant`` not in :data:`VARIANTS`.
    """
    _check(variant)
    if variant == "released":
        # released: Sayo train/trainer/grpo_trainer.py, _get_entropies_mask (entropies[:, :-1]: the last
        # position is dropped; completions are right-padded to the longest one)
        width = int(np.max(np.sum(np.asarray(completion), -1))) - 1
        if width < 1:
            return jnp.zeros(jnp.shape(completion), bool)
        # released: Sayo train/trainer/grpo_trainer.py get_top_entropy_indices_list (k = max(1, int(W·0.3)),
        # torch.topk over the padded width, the completion mask not consulted)
        k = max(1, int(width * frac))
        pos = jnp.arange(jnp.shape(entropy)[-1])[None, :]
        masked = jnp.where(pos < width, entropy, -jnp.inf)
        rank = jnp.argsort(jnp.argsort(-masked, -1, stable=True), -1)
        return (pos < width) & (rank < k)
    n = jnp.sum(completion, -1)
    k = jnp.ceil(frac * n).astype(jnp.int32)
    masked = jnp.where(completion, entropy, -jnp.inf)
    rank = jnp.argsort(jnp.argsort(-masked, -1, stable=True), -1)
    return completion & (rank < k[:, None])


def r_att(
    weights: Float[Array, "batch heads time key"],
    image: Shaped[Array, "batch key"],
    region: Shaped[Array, "batch key"],
    selected: Bool[Array, "batch time"],
) -> Float[Array, " batch"]:
    """SAYO's region attention reward (module doc; arXiv 2602.08241, Sayo
    ``train/reward/attn_rewards.py``): weights [B,H,T,K] of the last layer at the generated
    queries, image/region [B,K] key masks (bool; ā_R, ā_V by :func:`~jaxmm.probes.key_mean`),
    selected [B,T] (:func:`select_high_entropy`) -> r_att [B] float32 in (−1, 1).

    A row with no selected token gives tanh(log(1e-8 / 1e-8)) = 0."""
    a_r = key_mean(weights, region)  # [B,H,T]
    a_v = key_mean(weights, image)
    sel = selected.astype(jnp.float32)[:, None, :]
    n = jnp.maximum(jnp.sum(sel, -1) * weights.shape[1], 1.0)[:, 0]
    mean_r = jnp.sum(a_r * sel, axis=(1, 2)) / n
    mean_v = jnp.sum(a_v * sel, axis=(1, 2)) / n
    return jnp.tanh(jnp.log((mean_r + 1e-8) / (mean_v + 1e-8)))


def format_reward(text: str, n_tokens: int, variant: str = "paper") -> float:
    """SAYO's format reward of one completion. ``variant="released"``: 1 when
    :data:`ANSWER_PATTERN` matches anywhere (so several ``<answer>`` blocks also pass: the last one
    matches), times the same length coefficients. ``n_tokens``: the completion's length in tokens.
    Host-side (Python strings); returns a float in [0, 1].

    Raises:
        ValueError: ``variant`` not in :data:`VARIANTS`.
    """
    _check(variant)
    if variant == "released":
        if re.search(ANSWER_PATTERN, text, re.DOTALL | re.MULTILINE) is None:  # released: format_rewards.py:6-7
            return 0.0
    elif len(re.findall(r"<answer>.*?</answer>", text, flags=re.S)) != 1:
        return 0.0
    if n_tokens > 100:
        return min(1.0, 0.6 * 100 / n_tokens)
    if n_tokens < 60:
        return 0.6 * n_tokens / 60
    return 1.0
