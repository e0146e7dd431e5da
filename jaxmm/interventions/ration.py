"""RATION — entropy-driven, task-adaptive visual attention allocation (Xu et al., Findings of ACL
2026; code betterfly123/RATION, ``lmms_eval/entropy_qwen_vl/``; methods.md "RATION").

Two phases inside one ``generate`` call (``prefill_probes`` then ``after_prefill``):

1. **Layer probe** [code]: s_l = mean_{j∈V, d} |h_out[l,j,d] − h_in[l,j,d]| per decoder layer
   (:class:`~jaxmm.probes.ResidualUpdate`); layers ranked by s_l, descending (rank 0 = largest).
2. **Task routing** [code, rules ours]: δ_l = (L_max − l) − rank(l), L_max = L − 1. The released
   router applies rules to δ at layers 9–14, 19, 23, 24 of a 28-layer backbone (those rules are
   :func:`route_released`, ``variant="released"``); jaxmm's default router is ours and configurable — ``ocr`` if
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

``variant="released"`` follows the authors' code (``lmms_eval/entropy_qwen_vl/``) instead, quirks
included (each marked ``# released: file:line``; table in docs/methods.md "Released variant"):
the released router :func:`route_released` on δ of absolute layers 9–24 (0 for layers the model
lacks); the image set is the span from the first to the last image token of row 0 (text between
images included), for s_l and for the edit; τ is computed at each key layer inside the edit pass,
from that pass's (already edited) q̃, k̃ of every prompt query over every prompt key (no mask),
entropies averaged over the batch (one τ per layer for all rows); the prompt's own queries are
edited too (scaled keys sit in the cache), so generate must run with ``reprefill`` (the default);
decode steps reuse the edit pass's τ (:meth:`RATION.after_reprefill`). The wrapper's
d_a = d_b = 1.0 are the factory's defaults for this variant.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxmm.attention import Intervention, Probe, Site, register, static_field
from jaxmm.interventions.keys import key_set, row0_image_span
from jaxmm.probes import ResidualUpdate, visual_entropy

TASKS = ("ocr", "grounding", "recognition", "counting")
RULE_LAYERS_28 = ((9, 10, 11, 12, 13, 14), (19,), (23, 24))
VARIANTS = ("paper", "released")


def check_variant(variant: str) -> None:
    """Raises ``ValueError`` unless ``variant`` is in :data:`VARIANTS`."""
    if variant not in VARIANTS:
        raise ValueError(f"RATION: variant={variant!r}; expected one of {list(VARIANTS)}")


def pre_rope_scores(q, k):
    """Attention logits recomputed from pre-RoPE q̃ [B,T,H,D], k̃ [B,K,G,D] (GQA: k̃ repeated per
    group, ``repeat_interleave``), float32, scaled by 1/√D, no mask -> z [B,H,T,K]."""
    q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    k = jnp.repeat(k, q.shape[2] // k.shape[2], axis=2)
    return jnp.matmul(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 3, 1)) / jnp.sqrt(q.shape[-1])


def released_entropy(q, k, span, key_ok):
    """The released per-query visual entropy (controller.py:5-11, 53-64): q [B,T,H,D], k [B,T,G,D]
    pre-RoPE, span [B,T] image keys, key_ok [T] the call's real positions -> H [B,H,T]. Softmax
    over every key of the call (no causal or padding mask); the image slice renormalised with a
    clamp at 1e-12, log of the renormalised weights clamped at 1e-12."""
    z = jnp.where(key_ok[None, None, None, :], pre_rope_scores(q, k), -jnp.inf)  # bucket padding only
    p = jax.nn.softmax(z, -1) * span.astype(jnp.float32)[:, None, None, :]
    p = p / jnp.maximum(jnp.sum(p, -1, keepdims=True), 1e-12)
    return -jnp.sum(p * jnp.log(jnp.maximum(p, 1e-12)), -1)


def released_tau(h, up, d_a, d_b):
    """Entropies h [B,H] (mean over the prompt's queries), up [B] (counting) -> τ [B]: heads
    averaged over the batch first (controller.py:65), one τ for all rows (controller.py:67-75)."""
    h_head = jnp.mean(h, 0)
    h_mean, h_max, h_min = h_head.mean(), h_head.max(), h_head.min()
    return jnp.where(up, h_max / (h_mean + 1e-6) * d_a, h_min / (h_mean + 1e-6) * d_b)


@register
class PreRopeVisualEntropy(Probe):
    """H_V of attention recomputed from pre-RoPE q̃, k̃ (GQA-repeated, no mask) -> [B,H,T]."""

    name: str = static_field("ration_entropy")
    layers: tuple[int, ...] | None = static_field(None)
    towers: tuple[str, ...] = static_field(("text",))
    variant: str = static_field("paper")  # "released": :func:`released_entropy` of this chunk's queries

    def __call__(self, a, site: Site):
        if self.variant == "released":
            t = site.call_pos.shape[0]
            ok = jnp.any(jnp.take(site.layout.attention_mask, site.call_pos, axis=1) > 0, 0)
            span = jnp.take(row0_image_span(site.layout.image_mask), site.call_pos, axis=1)
            return released_entropy(site.q_pre, site.k_pre[:, :t], span, ok)
        z = pre_rope_scores(site.q_pre, site.k_pre)  # [B,H,T,K]
        return visual_entropy(jax.nn.softmax(z, -1), site.layout.image_mask[:, : z.shape[-1]])


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
    for i in (2, 1, 0):  # first matching rule wins: ocr, grounding, recognition
        task = jnp.where(groups[i] >= thresholds[i], i, task)
    return task.astype(jnp.int32)


def route_released(delta: jax.Array) -> jax.Array:
    """δ [B,L] -> task index [B] into :data:`TASKS` by the released rules (task_select.py:27-84):
    δ of absolute layer ids (``max_pos.get("layer_i", 0)``: 0 where the model has no layer i);
    first match of ocr, grounding (``is_position``), counting, recognition; else counting."""
    d = lambda i: delta[:, i] if i < delta.shape[1] else jnp.zeros(delta.shape[:1])
    ocr = (d(13) >= 2) & ((d(19) >= 1) | (d(23) >= 1) | (d(24) >= 1))  # :27-35
    position = (d(12) >= 4) & ((d(11) >= 2) | (d(10) >= 3)) & (d(24) >= 1) & ((d(24) >= 2) | (d(23) >= 1))  # :37-43
    counting = (
        (
            (d(10) >= 6)
            | (d(12) >= 6)
            | (d(11) >= 5)
            | ((d(10) >= 5) & (d(12) >= 4))
            | ((d(10) >= 5) & (d(11) >= 3))
            | ((d(11) >= 4) & (d(12) >= 4))
        )
        & ((d(23) >= 1) | (d(24) >= 1))
        & (d(12) >= 2)
        & (d(14) >= 1)
    )  # :45-62
    recogn = (
        (((d(9) >= 2) & (d(10) >= 2)) | ((d(10) >= 3) & (d(12) >= 3)) | ((d(12) >= 4) & (d(14) >= 1)))
        & (d(24) >= 1)
        & (d(13) <= 2)
    )  # :64-73
    task = jnp.where(ocr, 0, jnp.where(position, 1, jnp.where(counting, 3, jnp.where(recogn, 2, 3))))
    return task.astype(jnp.int32)  # :75-84


@register
class RATION(Intervention):
    """Phase 1 (defaults): no edit, probes collect s_l and the pre-RoPE entropies. Phase 2: ``tau``
    [B,L] and ``key`` [B,L] (1 at key layers) set by :meth:`after_prefill`."""

    num_layers: int = static_field(28)
    top_k: int = static_field(4)
    d_a: float = static_field(0.8)
    d_b: float = static_field(1.2)
    thresholds: tuple[float, float, float] = static_field((0.0, 0.0, 0.0))
    key_layers: tuple[int, ...] | None = static_field(None)  # fixed key layers instead of top-k
    variant: str = static_field("paper")  # or "released" (module doc)
    tau: jax.Array | None = None
    key: jax.Array | None = None
    task: jax.Array | None = None
    layers: tuple[int, ...] | None = static_field(None)
    towers: tuple[str, ...] = static_field(("text",))

    replans_prompt = True  # generate re-runs the prompt under the plan (prefill and decode)

    def __post_init__(self):
        check_variant(self.variant)

    def has_stage(self, name: str) -> bool:
        """Only ``logits``, once planned (τ set, or the released variant's key layers)."""
        return name == "logits" and (self.tau if self.variant == "paper" else self.key) is not None

    def prefill_probes(self):
        """s_l per layer (:class:`~jaxmm.probes.ResidualUpdate`) and, for the paper variant, the
        pre-RoPE visual entropies (:class:`PreRopeVisualEntropy`)."""
        if self.variant == "released":  # no entropies from the unedited pass (τ comes from the edit pass)
            return (ResidualUpdate(name="ration_update", row0_span=True),)
        return (ResidualUpdate(name="ration_update"), PreRopeVisualEntropy())

    def logits(self, z, site):
        """z [B,H,T,K] float32 -> z / τ on the image keys at key layers (visible keys only)."""
        if self.variant == "released":
            return self._released_logits(z, site)
        inv = 1.0 / self.tau[:, site.layer]  # [B]
        on = self.key[:, site.layer]
        factor = 1.0 + on * (inv - 1.0)  # 1 off the key layers
        edit = z * (1.0 + (factor[:, None, None, None] - 1.0) * key_set(site, "image"))
        return jnp.where(site.mask, edit, z)

    def _released_logits(self, z, site):
        """z / τ on the span's keys at key layers, τ from this very call (the edit pass's prompt)
        or, while decoding, the one :meth:`after_reprefill` kept."""
        if self.tau is not None:
            tau = self.tau[:, site.layer]
        else:
            t = site.call_pos.shape[0]
            if t == 1:
                raise ValueError(
                    "RATION variant='released' computes τ from the prompt's edit pass: generate with reprefill=True (the default)"
                )
            # released: controller.py:39-40 (τ only from a multi-token call), :43 (q from the edited hs)
            ok = jnp.any(jnp.take(site.layout.attention_mask, site.call_pos, axis=1) > 0, 0)  # [T]
            span = jnp.take(row0_image_span(site.layout.image_mask), site.call_pos, axis=1)
            h = released_entropy(site.call_q_pre, site.k_pre[:, :t], span, ok)  # [B,H,T]
            h = jnp.sum(h * ok, -1) / jnp.maximum(jnp.sum(ok), 1)  # released: controller.py:10 (all queries)
            tau = released_tau(h, self.task == 3, self.d_a, self.d_b)
        factor = 1.0 + self.key[:, site.layer] * (1.0 / tau - 1.0)
        span = row0_image_span(site.layout.image_mask).astype(jnp.float32)[:, None, None, :]
        # released: controller.py:77-86 (image keys x 1/τ before the cache: = image logits / τ)
        edit = z * (1.0 + (factor[:, None, None, None] - 1.0) * span)
        return jnp.where(site.mask, edit, z)

    def reprefill_probes(self):
        """Probes of the prompt's run under the plan (``generate`` with ``reprefill``)."""
        return (PreRopeVisualEntropy(variant="released"),) if self.variant == "released" and self.tau is None else ()

    def after_reprefill(self, probe_results, layout):
        """released: τ of the edit pass kept for the decode steps, whose queries meet the scaled
        image keys in the cache (controller.py:39-40, 77-86)."""
        ent = probe_results["ration_entropy"]["text"].values  # [L,B,H,S]
        s = ent.shape[-1]
        ok = jnp.any(layout.attention_mask[:, :s] > 0, 0).astype(jnp.float32)  # [S]
        h = jnp.sum(ent * ok, -1) / jnp.maximum(jnp.sum(ok), 1.0)  # [L,B,H]
        tau = jax.vmap(lambda x: released_tau(x, self.task == 3, self.d_a, self.d_b))(h)  # [L,B]
        return dataclasses.replace(self, tau=tau.T)

    def after_prefill(self, probe_results, layout):
        """Phase 2 from the prefill's probes: :meth:`plan` on s [B,L] and the entropies [L,B,H,S]."""
        s = probe_results["ration_update"]["text"].values.T  # [B,L]
        if self.variant == "released":
            return self.plan(s, None)
        ent = probe_results["ration_entropy"]["text"].values  # [L,B,H,S]
        return self.plan(s, ent, layout.attention_mask[:, : ent.shape[-1]])

    def plan(self, s, ent, query_mask=None):
        """s [B,L], entropies [L,B,H,S] (+ [B,S] mask of the prompt's real queries) -> phase 2."""
        b, n = s.shape
        rank = rank_layers(s)
        delta = (n - 1 - jnp.arange(n))[None, :] - rank
        if self.variant == "released":
            task = route_released(delta)
            if self.key_layers is not None:
                key = jnp.zeros((b, n)).at[:, list(self.key_layers)].set(1.0)
            else:
                key = (rank < self.top_k).astype(jnp.float32)
            return dataclasses.replace(self, key=key, task=task)
        task = route(delta, n, self.thresholds)
        if query_mask is None:
            h = jnp.mean(ent, axis=-1)  # [L,B,H]
        else:
            w = query_mask.astype(jnp.float32)[None, :, None, :]
            h = jnp.sum(ent * w, -1) / jnp.maximum(jnp.sum(w, -1), 1.0)
        h_bar, h_max, h_min = h.mean(-1).T, h.max(-1).T, h.min(-1).T  # [B,L]
        up = (task == 3)[:, None]
        tau = jnp.where(up, self.d_a * h_max / (h_bar + 1e-6), self.d_b * h_min / (h_bar + 1e-6))
        if self.key_layers is not None:
            key = jnp.zeros((b, n)).at[:, list(self.key_layers)].set(1.0)
        else:
            key = (rank < self.top_k).astype(jnp.float32)
        return dataclasses.replace(self, tau=tau, key=key, task=task)
