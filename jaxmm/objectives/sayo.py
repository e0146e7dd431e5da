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
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp


def token_entropy(logits, temperature: float = 1.0):
    """[B,T,V] -> H_t [B,T] (nats)."""
    lp = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, -1)
    return -jnp.sum(jnp.exp(lp) * lp, -1)


def select_high_entropy(entropy, completion, frac: float = 0.3):
    """[B,T] entropies and completion mask -> bool [B,T]: the top ⌈frac·n⌉ completion positions."""
    n = jnp.sum(completion, -1)
    k = jnp.ceil(frac * n).astype(jnp.int32)
    masked = jnp.where(completion, entropy, -jnp.inf)
    rank = jnp.argsort(jnp.argsort(-masked, -1, stable=True), -1)
    return completion & (rank < k[:, None])


def r_att(weights, image, region, selected):
    """weights [B,H,T,K] of the last layer at the generated queries, image/region [B,K] key masks,
    selected [B,T] -> r_att [B]."""
    img = image.astype(jnp.float32)[:, None, None, :]
    reg = region.astype(jnp.float32)[:, None, None, :]
    a_r = jnp.sum(weights * reg, -1) / jnp.maximum(jnp.sum(region, -1), 1)[:, None, None]   # [B,H,T]
    a_v = jnp.sum(weights * img, -1) / jnp.maximum(jnp.sum(image, -1), 1)[:, None, None]
    sel = selected.astype(jnp.float32)[:, None, :]
    n = jnp.maximum(jnp.sum(sel, -1) * weights.shape[1], 1.0)[:, 0]
    mean_r = jnp.sum(a_r * sel, axis=(1, 2)) / n
    mean_v = jnp.sum(a_v * sel, axis=(1, 2)) / n
    return jnp.tanh(jnp.log((mean_r + 1e-8) / (mean_v + 1e-8)))


def format_reward(text: str, n_tokens: int) -> float:
    """SAYO's format reward of one completion."""
    if len(re.findall(r"<answer>.*?</answer>", text, flags=re.S)) != 1:
        return 0.0
    if n_tokens > 100:
        return min(1.0, 0.6 * 100 / n_tokens)
    if n_tokens < 60:
        return 0.6 * n_tokens / 60
    return 1.0
