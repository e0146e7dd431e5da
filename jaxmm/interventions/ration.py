"""RATION — entropy-driven, task-adaptive visual attention allocation (Xu et al., Findings of ACL
2026; code betterfly123/RATION, ``lmms_eval/entropy_qwen_vl/``; methods.md "RATION").

Two phases inside one ``generate`` call (``prefill_probes`` then ``after_prefill``):

1. **Layer probe** [code]: s_l = mean_{j∈V, d} |h_out[l,j,d] − h_in[l,j,d]| per decoder layer
   (:class:`~jaxmm.probes.ResidualUpdate`); layers ranked by s_l, descending (rank 0 = largest).
2. **Task routing** [code, rules ours]: δ_l = (L_max − l) − rank(l), L_max = L − 1. The released
   router applies rules to δ at layers 9–14, 19, 23, 24 of a 28-layer backbone, but the rules
   themselves are not in methods.md: jaxmm's default router is ours and configurable — ``ocr`` if
   mean δ over layers 9–14 ≥ ``thresholds[0]``, else ``grounding`` if δ_19 ≥ ``thresholds[1]``,
   else ``recognition`` if mean δ over 23–24 ≥ ``thresholds[2]``, else ``counting`` (the released
   default). Rule layers are given in 28-layer coordinates and mapped to a backbone of L layers as
   ``round(l · (L − 1) / 27)``. Direction: counting → 1, the others → 0.
3. **Entropy control on key layers** [code]: attention recomputed from pre-RoPE q̃, k̃ (GQA-repeated,
   no causal mask, scale 1/√d); per head H_h = mean over the prompt's queries of the visual entropy
   H_V; H̄ = mean_h H_h, H_max, H_min over heads. τ = d_a·H_max/(H̄+1e-6) if direction = 1, else
   d_b·H_min/(H̄+1e-6); d_a = 0.8, d_b = 1.2. Key layers: a configuration input; default the
   top-``top_k`` layers of the ranking (``top_k`` = 4 is ours). Intervention: z_ij ← z_ij / τ for
   j ∈ V at the key layers, for every later query — a logits stage here (equal to scaling the image
   keys by 1/τ; on Qwen3-VL's k_norm the key trick would be a no-op, the logits form is not).
   "Prefill and decode": RATION sets ``replans_prompt``, so ``generate`` runs the prompt again
   under τ by default (``reprefill=False`` applies τ to generated tokens only).

Per-sample: each row gets its own ranking, route, key layers and τ ([B, L] leaves).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxmm.attention import Intervention, Probe, Site, static_field
from jaxmm.interventions.keys import _iv, key_set
from jaxmm.probes import ResidualUpdate, _probe, visual_entropy

TASKS = ("ocr", "grounding", "recognition", "counting")
RULE_LAYERS_28 = ((9, 10, 11, 12, 13, 14), (19,), (23, 24))


@_probe
class PreRopeVisualEntropy(Probe):
    """H_V of attention recomputed from pre-RoPE q̃, k̃ (GQA-repeated, no mask) -> [B,H,T]."""

    name: str = static_field("ration_entropy")
    layers: tuple[int, ...] | None = static_field(None)
    towers: tuple[str, ...] = static_field(("text",))

    def __call__(self, a, site: Site):
        q, k = site.q_pre.astype(jnp.float32), site.k_pre.astype(jnp.float32)     # [B,T,H,D], [B,K,G,D]
        k = jnp.repeat(k, q.shape[2] // k.shape[2], axis=2)
        z = jnp.matmul(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 3, 1)) / jnp.sqrt(q.shape[-1])
        return visual_entropy(jax.nn.softmax(z, -1), site.layout.image_mask[:, :k.shape[1]])


def map_layers(layers_28, num_layers: int) -> tuple[int, ...]:
    """Rule layers given for a 28-layer backbone -> the same relative depth in ``num_layers``."""
    return tuple(sorted({int(round(l * (num_layers - 1) / 27)) for l in layers_28}))


def rank_layers(s: jax.Array) -> jax.Array:
    """s [B,L] -> rank [B,L] int32 (0 = the largest update; ties broken by layer index)."""
    order = jnp.argsort(-s, axis=-1, stable=True)
    return jnp.argsort(order, axis=-1).astype(jnp.int32)


def route(delta: jax.Array, num_layers: int, thresholds=(0.0, 0.0, 0.0)) -> jax.Array:
    """δ [B,L] -> task index [B] into :data:`TASKS` by jaxmm's default rules (see module doc)."""
    groups = [jnp.mean(delta[:, list(map_layers(g, num_layers))], -1) for g in RULE_LAYERS_28]
    task = jnp.full(delta.shape[:1], 3)
    for i in (2, 1, 0):                      # first matching rule wins: ocr, grounding, recognition
        task = jnp.where(groups[i] >= thresholds[i], i, task)
    return task.astype(jnp.int32)


@_iv
class RATION(Intervention):
    """Phase 1 (defaults): no edit, probes collect s_l and the pre-RoPE entropies. Phase 2: ``tau``
    [B,L] and ``key`` [B,L] (1 at key layers) set by :meth:`after_prefill`."""

    num_layers: int = static_field(28)
    top_k: int = static_field(4)
    d_a: float = static_field(0.8)
    d_b: float = static_field(1.2)
    thresholds: tuple[float, float, float] = static_field((0.0, 0.0, 0.0))
    key_layers: tuple[int, ...] | None = static_field(None)   # fixed key layers instead of top-k
    tau: jax.Array | None = None
    key: jax.Array | None = None
    task: jax.Array | None = None
    layers: tuple[int, ...] | None = static_field(None)
    towers: tuple[str, ...] = static_field(("text",))

    replans_prompt = True    # generate re-runs the prompt under the plan (prefill and decode)

    def has_stage(self, name):
        return name == "logits" and self.tau is not None

    def prefill_probes(self):
        return (ResidualUpdate(name="ration_update"), PreRopeVisualEntropy())

    def logits(self, z, site):
        inv = 1.0 / self.tau[:, site.layer]                                # [B]
        on = self.key[:, site.layer]
        factor = 1.0 + on * (inv - 1.0)                                    # 1 off the key layers
        edit = z * (1.0 + (factor[:, None, None, None] - 1.0) * key_set(site, "image"))
        return jnp.where(site.mask, edit, z)

    def after_prefill(self, probe_results, layout):
        s = probe_results["ration_update"]["text"].values.T              # [B,L]
        ent = probe_results["ration_entropy"]["text"].values              # [L,B,H,S]
        return self.plan(s, ent, layout.attention_mask[:, :ent.shape[-1]])

    def plan(self, s, ent, query_mask=None):
        """s [B,L], entropies [L,B,H,S] (+ [B,S] mask of the prompt's real queries) -> phase 2."""
        b, n = s.shape
        rank = rank_layers(s)
        delta = (n - 1 - jnp.arange(n))[None, :] - rank
        task = route(delta, n, self.thresholds)
        if query_mask is None:
            h = jnp.mean(ent, axis=-1)                                    # [L,B,H]
        else:
            w = query_mask.astype(jnp.float32)[None, :, None, :]
            h = jnp.sum(ent * w, -1) / jnp.maximum(jnp.sum(w, -1), 1.0)
        h_bar, h_max, h_min = h.mean(-1).T, h.max(-1).T, h.min(-1).T     # [B,L]
        up = (task == 3)[:, None]
        tau = jnp.where(up, self.d_a * h_max / (h_bar + 1e-6), self.d_b * h_min / (h_bar + 1e-6))
        if self.key_layers is not None:
            key = jnp.zeros((b, n)).at[:, list(self.key_layers)].set(1.0)
        else:
            key = (rank < self.top_k).astype(jnp.float32)
        return dataclasses.replace(self, tau=tau, key=key, task=task)
