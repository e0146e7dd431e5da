"""AVAR's attention-guided cold-start losses and VARS reward (arXiv 2603.03825; methods.md "AVAR").

Inputs are probe outputs of the chosen layers: per-query image mass ``m_v`` and system mass ``m_s``
[L,B,H,T] (:class:`~jaxmm.probes.VisualMass`, :class:`~jaxmm.probes.KeyMass` on the system span),
masks [B,T] of the queries that count, and the key-set sizes |V|, |S| [B].

* AGTO [code]: ``L_enh = −mean_l mean_h log( mean_{q∈Q, k∈V} A_qk + ε )``,
  ``L_sup = +mean_l mean_h log( mean_{q∈Q, k∈S} A_qk + ε )``; mean_{q∈Q,k∈V} A = Σ_{q∈Q} m_V(q) / (|Q|·|V|).
  Total ``L = L_LM + α·L_enh + β·L_sup``, α = β = 0.15, ε = 1e-6, Q = the user-turn span.
* VARS [paper]: ``r_visual = 0`` if wrong else ``mean_{t∈T} mean_l Σ_{k∈V} A_tk / (Σ_{k∈S} A_tk + ε)``
  (heads averaged as well [inferred]); ``r_total = r_acc + λ_v r_visual + λ_f r_format`` (0.3, 0.1),
  r_format = :func:`format_reward` (``<think>…</think><answer>…</answer>``) [code].
  ``variant="released"``: one ratio of total masses over the rows given, no correctness gate [code].
  The release sums every query row of prompt + response on layers 0–7, with the system span the
  first ``max(1, response_start // 5)`` tokens where ``response_start`` comes from labels that the
  RL batch does not have (the fallback, input_ids, makes it 1 token: key 0) — the GRPO trainer's
  ``vars_variant: released`` passes those rows and masses (:class:`FirstKeysMass`) and adds the
  reward at every response position (× the completion width).
* AGTO ``variant="released"``: means divided by ``|Q|·|K| + ε`` instead of ``max(|Q|,1)·max(|K|,1)``;
  :func:`released_agto_spans` gives the release's S/Q spans (a character offset × 0.4).
"""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Shaped

from jaxmm.attention import Probe, Site, register, static_field
from jaxmm.probes import key_mass, mass_ratio

VARIANTS = ("paper", "released")

# released: Qwen-AVAR LlamaFactory/src/llamafactory/train/sft/trainer.py:356-363 (searched in this order)
USER_MARKERS = ("<|im_start|>user", "<|start_header_id|>user", "[INST]", "user\n", "User:", "<|user|>")


def _check(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"AVAR: variant={variant!r}; expected one of {VARIANTS}")


def _block_mean(mass, queries, n_keys, eps=None):
    """mean over q∈Q, k∈K of A: [L,B,H,T] masses -> [L,B,H]. ``eps``: divide by |Q|·|K| + eps."""
    q = queries.astype(jnp.float32)[None, :, None, :]
    if eps is not None:
        # released: Qwen-AVAR LlamaFactory/src/llamafactory/train/avar_attention.py:99,122
        n = (jnp.sum(queries, -1).astype(jnp.float32) * jnp.asarray(n_keys, jnp.float32))[None, :, None]
        return jnp.sum(mass * q, -1) / (n + eps)
    nq = jnp.maximum(jnp.sum(queries, -1), 1).astype(jnp.float32)[None, :, None]
    return jnp.sum(mass * q, -1) / (nq * jnp.maximum(n_keys, 1).astype(jnp.float32)[None, :, None])


def agto_losses(
    m_v: Float[Array, "layers batch heads query"],
    m_s: Float[Array, "layers batch heads query"],
    queries: Bool[Array, "batch query"],
    n_image: Shaped[Array, " batch"],
    n_system: Shaped[Array, " batch"],
    eps: float = 1e-6,
    variant: str = "paper",
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """AGTO's (L_enh, L_sup) (module doc; arXiv 2603.03825 [code]): float32 scalars averaged over
    layers, heads and the batch (nats; L_enh ≥ 0 pulls image attention up, L_sup pushes system
    attention down).

    ``m_v``, ``m_s`` [L,B,H,T]: image and system mass per query (:func:`~jaxmm.probes.visual_mass`,
    :func:`~jaxmm.probes.key_mass`); ``queries`` [B,T] the rows Q that count; ``n_image``,
    ``n_system`` [B] the key-set sizes |V|, |S|. ``variant="released"`` divides the block sums by
    ``|Q|·|K| + eps`` (the release's avar_attention.py:99,122).

    Raises:
        ValueError: ``variant`` not in :data:`VARIANTS`.
    """
    _check(variant)
    d = eps if variant == "released" else None
    enh = -jnp.mean(jnp.log(_block_mean(m_v, queries, n_image, d) + eps))
    sup = jnp.mean(jnp.log(_block_mean(m_s, queries, n_system, d) + eps))
    return enh, sup


def released_agto_spans(
    prompt_text: str, response_start: int, seq_len: int, bos_first: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """The release's AGTO system and query spans of one sample -> (system, query) bool [seq_len].

    ``prompt_text``: the decoded ``input_ids[:response_start]`` (special tokens kept). The first
    user marker found at character offset c gives ``user_start = min(int(c·0.4), response_start)``,
    else ``min(max(10, response_start // 10), response_start)``; S = [bos_first, user_start)
    (only when user_start > 0), Q = [user_start, response_start). Host-side (numpy).
    """
    # released: LlamaFactory/src/llamafactory/train/sft/trainer.py:365-378 (a character offset read as a
    # token index, × 0.4)
    user_start = min(max(10, response_start // 10), response_start)
    for marker in USER_MARKERS:
        c = prompt_text.find(marker)
        if c != -1:
            user_start = min(int(c * 0.4), response_start)
            break
    system = np.zeros(seq_len, bool)
    query = np.zeros(seq_len, bool)
    if user_start > 0:  # released: trainer.py:295-300 (BOS excluded when present)
        system[int(bos_first) : user_start] = True
    if user_start < response_start:  # released: trainer.py:305-306
        query[user_start:response_start] = True
    return system, query


def agto_total(
    lm_loss: Float[Array, ""],
    m_v: Float[Array, "layers batch heads query"],
    m_s: Float[Array, "layers batch heads query"],
    queries: Bool[Array, "batch query"],
    n_image: Shaped[Array, " batch"],
    n_system: Shaped[Array, " batch"],
    alpha: float = 0.15,
    beta: float = 0.15,
    eps: float = 1e-6,
) -> Float[Array, ""]:
    """AGTO's total cold-start loss ``L = L_LM + α·L_enh + β·L_sup`` (arXiv 2603.03825; α = β = 0.15,
    ε = 1e-6), a float32 scalar; arguments as :func:`agto_losses` (paper variant), ``lm_loss`` the
    language-model cross-entropy (nats)."""
    enh, sup = agto_losses(m_v, m_s, queries, n_image, n_system, eps)
    return lm_loss + alpha * enh + beta * sup


def vars_reward(
    m_v: Float[Array, "layers batch heads query"],
    m_s: Float[Array, "layers batch heads query"],
    generated: Bool[Array, "batch query"],
    correct: Bool[Array, " batch"] | None,
    eps: float = 1e-6,
    variant: str = "paper",
) -> Float[Array, " batch"]:
    """VARS's r_visual [B] float32 (arXiv 2603.03825; module doc) from the image and system masses
    [L,B,H,T] over the query rows ``generated`` [B,T] (bool).

    ``variant="paper"``: the mean over rows, layers and heads of m_V / (m_S + eps)
    (:func:`~jaxmm.probes.mass_ratio`), 0 where ``correct`` [B] is False. ``"released"``: one
    ratio of the summed masses, ``correct`` unused (may be None).

    Raises:
        ValueError: ``variant`` not "paper" or "released".
    """
    g = generated.astype(jnp.float32)[None, :, None, :]
    if variant == "paper":
        ratio = mass_ratio(m_v, m_s, eps)  # [L,B,H,T]
        per = jnp.sum(ratio * g, -1) / jnp.maximum(jnp.sum(g, -1), 1.0)  # [L,B,H]
        return jnp.where(correct, jnp.mean(per, axis=(0, 2)), 0.0)
    if variant == "released":
        # released: Qwen-AVAR EasyR1/verl/utils/avar_attention.py:71-90 (sums over layers, heads, rows and
        # keys, then one ratio); no correctness gate: EasyR1/verl/trainer/ray_trainer.py:703-709
        return jnp.sum(m_v * g, axis=(0, 2, 3)) / (jnp.sum(m_s * g, axis=(0, 2, 3)) + eps)
    raise ValueError(f"variant={variant!r}; expected 'paper' or 'released'")


def total_reward(
    r_acc: Float[Array, " batch"],
    r_visual: Float[Array, " batch"],
    r_format: Float[Array, " batch"],
    lambda_v: float = 0.3,
    lambda_f: float = 0.1,
) -> Float[Array, " batch"]:
    """VARS's ``r_total = r_acc + λ_v·r_visual + λ_f·r_format`` (arXiv 2603.03825; λ_v = 0.3,
    λ_f = 0.1), elementwise (any matching shapes, scalars too)."""
    return r_acc + lambda_v * r_visual + lambda_f * r_format


#: AVAR's format: reasoning in <think>, then the answer in <answer>, nothing else (Qwen-AVAR
#: EasyR1/examples/reward_function/avar.py:34-37, ``re.fullmatch`` with DOTALL)
FORMAT_PATTERN = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)


def format_reward(text: str) -> float:
    """AVAR's r_format of one completion: 1.0 when the whole text is ``<think>…</think>`` then
    ``<answer>…</answer>`` (whitespace between), else 0.0 [code]. Host-side (Python strings)."""
    return 1.0 if FORMAT_PATTERN.fullmatch(text) else 0.0


def agto_probes(layers: tuple[int, ...] | None = None) -> tuple[Probe, Probe]:
    """The probes AGTO needs on ``layers`` (None = all): image mass and system mass per query
    (:class:`~jaxmm.probes.VisualMass` ``"visual_mass"``, :class:`~jaxmm.probes.KeyMass`
    ``"system_mass"``), each giving [L,B,H,T] float32 in the model output's ``probes``."""
    from jaxmm.probes import KeyMass, VisualMass

    return (VisualMass(layers=layers), KeyMass(layers=layers))


@register
class FirstKeysMass(Probe):
    """Attention mass on keys 0..n−1 per (b, h, query) -> [B,H,T]: the system span of the released
    VARS reward in the RL stage (n = 1: EasyR1/verl/trainer/ray_trainer.py:280 falls back to
    labels = input_ids, so avar_attention.py:224-234 marks max(1, 0 // 5) = 1 token)."""

    name: str = static_field("first_keys_mass")
    n: int = static_field(1)
    layers: tuple[int, ...] | None = static_field(None)
    towers: tuple[str, ...] = static_field(("text",))

    def __call__(self, a: Float[Array, "batch heads query key"], site: Site | None) -> Float[Array, "batch heads query"]:
        """Σ_{j<n} A_ij in float32 (:func:`~jaxmm.probes.key_mass` on keys 0..n−1; ``site`` unused)."""
        first = jnp.broadcast_to(jnp.arange(a.shape[-1]) < self.n, (a.shape[0], a.shape[-1]))
        return key_mass(a.astype(jnp.float32), first)


def agto_extra_loss(alpha: float = 0.15, beta: float = 0.15, eps: float = 1e-6):
    """``(model_output, batch) -> α·L_enh + β·L_sup`` (a float32 scalar) for
    :func:`jaxmm.train.sft.train`'s ``extra_losses`` (with ``probes=agto_probes()``, whose
    ``"visual_mass"`` and ``"system_mass"`` it reads); Q = the layout's question span, S its system
    span (arXiv 2603.03825, paper variant)."""

    def loss(out, batch):
        lay = batch.layout
        enh, sup = agto_losses(
            out.probes["visual_mass"]["text"].values,
            out.probes["system_mass"]["text"].values,
            lay.question_mask,
            jnp.sum(lay.image_mask, -1),
            jnp.sum(lay.system_mask, -1),
            eps,
        )
        return alpha * enh + beta * sup

    return loss
