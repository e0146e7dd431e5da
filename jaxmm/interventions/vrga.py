"""VRGA — visual region-guided attention (CVPR 2026, arXiv 2603.14184; code Ivine11/VRGA,
``models/modeling_qwen2_5_vl.py``; methods.md "VRGA").

**Phase 1** (prefill; query row q* = the last question token of each sample; every layer l, head h),
computed in :meth:`VRGA.after_prefill` from the row ``a`` [L,B,H,K] ([code] unless marked):

* R_img = (m_V/|V|) / (Σ_j a_j / N) with N the keys q* sees; H_img = entropy of the renormalised
  image slice; EFR = H_img / R_img.
* Per-sample thresholds t1 = P5(EFR), t2 = P95(R_img) over all (l, h) (linear interpolation).
* Visual heads H_v = {EFR ≤ t1 ∧ R_img ≥ t2}, or {R_img ≥ t2} when that is empty. Background
  heads H_b = {R_img < 0.01} among the first 64 heads in layer-major order.
* Refined map A_ref = Norm(max(0, Norm(mean_{H_v} a_V) − Norm(mean_{H_b} a_V))) over the image
  keys; Norm is min-max scaling to [0, 1] [inferred: the paper's "Norm" is not defined in methods.md];
  an empty H_b contributes 0.
* Border exclusion (attention sinks): up to ⌊0.2·|V|⌋ image tokens are excluded, in this order —
  the top-left 2×2 block of the merged grid, then the rest of its first row, then its first column
  (raster order within each; with several images the classes run across images — every 2×2 block
  first, then the first rows, then the first columns — and ⌊0.2·|V|⌋ counts all images [ours]).
* ρ_j = A_ref,j / mean(A_ref over kept tokens); focus tokens T_q = {ρ_j > μ_ρ + 0.6·σ_ρ} (μ, σ over
  kept tokens, population σ), at least 10: the top-10 by ρ when fewer pass.

**Phase 2** (every decode step, all layers, post-softmax, each (layer, head, row)):

* Gate: edit only if R_img > 0.6 and R_img > 0.2·H_img, with H_img = −Σ_{j∈V} a_j log a_j on the raw,
  un-renormalised slice.
* Soft (``fa=1``, default): focus tokens and their ±2 raster neighbours (same image; in-image
  positions < 3 skipped) get a_j ← 1.5·a_j, then the row is renormalised (= +log 1.5 on logits).
* Hard (``fa=2``): image keys farther than 3 raster positions from every focus token are zeroed,
  then the row is renormalised ("radius-3 neighbourhoods" read as raster distance [ours]; the
  release takes ±3 positions along the image slice: ``variant="released"``).

The EFR-guided head-masking ablation is :func:`efr_head_mask` (zero the visual heads' weights).

``variant="released"`` follows the authors' ``models/modeling_qwen2_5_vl.py`` (transformers 4.52.4,
eager attention) and ``eval/eval_qwen.py`` instead, quirks included (each marked
``# released: file:line``; table in docs/methods.md "Released variant"): one image per sample; the
image slice runs from ``<|vision_start|>`` to the last image token; q* = vision_end + (number of
question tokens) − 1; R's denominator is the mean over every prompt key; the first 63 heads are
the background pool; Norm is division by the sum (no Norm without background heads); the border
exclusion and the focus-token neighbourhoods are in slice coordinates; μ, σ (ddof 1) of ρ are
taken at the release's indices ``ρ[~mask_flat]``; ``fa=2`` also zeroes the image slice of rows that
fail the gate. The released head-masking ablation (heads re-selected at each decode step) is
``head_mask=`` with :func:`released_head_mask`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxmm.attention import Intervention, Probe, Site, register, static_field
from jaxmm.probes import focus_ratio, key_count, visual_entropy


VARIANTS = ("paper", "released")
MODEL = "VRGA/models/modeling_qwen2_5_vl.py"  # the released file the line numbers below refer to


def check_variant(variant: str) -> None:
    """Raises ``ValueError`` unless ``variant`` is in :data:`VARIANTS`."""
    if variant not in VARIANTS:
        raise ValueError(f"VRGA: variant={variant!r}; expected one of {list(VARIANTS)}")


def vision_slice(layout) -> jax.Array:
    """[B,K] bool: ``<|vision_start|>`` (the key before the first image token) through the last image
    token of each row — the released ``attn[vision_start:vision_end]`` (eval/eval_qwen.py:261-262)."""
    img = layout.image_mask
    k = img.shape[-1]
    first = jnp.argmax(img, -1)[:, None]
    last = (k - 1 - jnp.argmax(img[:, ::-1], -1))[:, None]
    pos = jnp.arange(k)[None]
    return (pos >= first - 1) & (pos <= last) & img.any(-1, keepdims=True)


def released_question_position(layout) -> jax.Array:
    """[B] q* = vision_end + len(question tokens) − 1 (eval/eval_qwen.py:263-264, modeling:1586): the
    question's second-to-last token when the question follows ``<|vision_end|>``; jaxmm's default
    row when no question is marked."""
    img = layout.image_mask
    k = img.shape[-1]
    vision_end = k - jnp.argmax(img[:, ::-1], -1)
    nq = jnp.sum(layout.question_mask, -1)
    return jnp.where(nq > 0, vision_end + nq - 1, last_question_position(layout)).astype(jnp.int32)


def last_question_position(layout) -> jax.Array:
    """[B] key index of each sample's last question token (last prompt token if none is marked)."""
    q = layout.question_mask
    k = q.shape[-1]
    has = q.any(-1)
    last_q = k - 1 - jnp.argmax(q[:, ::-1], axis=-1)
    prompt = layout.attention_mask.astype(bool) & ~layout.generated_mask
    last_p = k - 1 - jnp.argmax(prompt[:, ::-1], axis=-1)
    return jnp.where(has, last_q, last_p).astype(jnp.int32)


@register
class QuestionRow(Probe):
    """Attention row of the last question token -> [B,H,K] (chunks add up)."""

    name: str = static_field("vrga_row")
    layers: tuple[int, ...] | None = static_field(None)
    towers: tuple[str, ...] = static_field(("text",))
    query_axis: int | None = static_field(None)
    variant: str = static_field("paper")  # "released": the row of :func:`released_question_position`

    def __call__(self, a, site: Site):
        where = released_question_position if self.variant == "released" else last_question_position
        pos = where(site.layout)  # [B]
        sel = (site.query_pos[None, :] == pos[:, None]).astype(a.dtype)  # [B,T]
        return jnp.einsum("bhtk,bt->bhk", a, sel)


def _minmax(x, on):
    lo = jnp.min(jnp.where(on, x, jnp.inf), -1, keepdims=True)
    hi = jnp.max(jnp.where(on, x, -jnp.inf), -1, keepdims=True)
    return jnp.where(on, (x - lo) / jnp.maximum(hi - lo, 1e-12), 0.0)


def head_statistics(rows, image, n_keys):
    """rows [L,B,H,K], image [B,K], n_keys [B] -> R_img, H_img (renormalised), EFR, each [B, L·H]
    in layer-major order: :func:`~jaxmm.probes.focus_ratio` and :func:`~jaxmm.probes.visual_entropy`
    with the layers as the query axis."""
    a = jnp.transpose(rows, (1, 2, 0, 3))  # [B,H,L,K]
    n = jnp.broadcast_to(jnp.asarray(n_keys, jnp.float32)[:, None, None], a.shape[:-1])
    r = focus_ratio(a, image, n)  # [B,H,L]
    h = visual_entropy(a, image)
    flat = lambda x: jnp.transpose(x, (0, 2, 1)).reshape(x.shape[0], -1)
    return flat(r), flat(h), flat(h / r)


def border_mask(layout, frac: float = 0.2) -> jax.Array:
    """[B,K] bool: the image tokens excluded as border sinks (see module doc)."""
    img = layout.image_mask
    row, col = layout.grid_pos[..., 1], layout.grid_pos[..., 2]
    prio = jnp.where(img & (row < 2) & (col < 2), 0, jnp.where(img & (row == 0), 1, jnp.where(img & (col == 0), 2, 3)))
    k = img.shape[-1]
    order_key = jnp.where(prio < 3, prio * (4 * k) + layout.image_index * k + jnp.arange(k), 4 * k * 4)
    rank = jnp.argsort(jnp.argsort(order_key, -1), -1)
    budget = jnp.floor(frac * jnp.sum(img, -1)).astype(jnp.int32)[:, None]
    return (prio < 3) & (rank < budget)


def focus_tokens(a_ref, kept, min_focus: int = 10, z: float = 0.6):
    """ρ rule -> [B,K] bool focus tokens."""
    n = jnp.maximum(jnp.sum(kept, -1, keepdims=True), 1)
    mean_ref = jnp.sum(jnp.where(kept, a_ref, 0.0), -1, keepdims=True) / n
    rho = a_ref / jnp.maximum(mean_ref, 1e-12)
    mu = jnp.sum(jnp.where(kept, rho, 0.0), -1, keepdims=True) / n
    sigma = jnp.sqrt(jnp.sum(jnp.where(kept, (rho - mu) ** 2, 0.0), -1, keepdims=True) / n)
    focus = kept & (rho > mu + z * sigma)
    top = jnp.argsort(jnp.where(kept, -rho, jnp.inf), -1)[:, :min_focus]
    topmask = jnp.zeros_like(kept).at[jnp.arange(kept.shape[0])[:, None], top].set(True) & kept
    few = jnp.sum(focus, -1, keepdims=True) < min_focus
    return jnp.where(few, topmask, focus)


def neighbourhood(focus, layout, radius: int, skip_below: int = 0):
    """[B,K] bool: image keys within ``radius`` raster positions of a focus token of the same image."""
    out = jnp.zeros_like(focus)
    k = focus.shape[-1]
    for d in range(-radius, radius + 1):
        shifted = jnp.roll(focus, d, axis=-1)
        same = jnp.roll(layout.image_index, d, axis=-1) == layout.image_index
        valid = (jnp.arange(k) - d >= 0) & (jnp.arange(k) - d < k)
        out = out | (shifted & same & valid[None])
    raster = layout.grid_pos[..., 1] * layout.grid_hw[..., 1] + layout.grid_pos[..., 2]
    return out & layout.image_mask & (raster >= skip_below)


@register
class VRGA(Intervention):
    """Phase 1 (defaults): probes only. Phase 2: ``boost`` [B,K] set by :meth:`after_prefill`."""

    factor: float = static_field(1.5)
    fa: int = static_field(1)
    border_frac: float = static_field(0.2)
    min_focus: int = static_field(10)
    background_heads: int = static_field(64)
    boost: jax.Array | None = None  # [B,K] keys to boost (fa=1) or to keep (fa=2)
    visual_heads: jax.Array | None = None  # [B, L·H] (for the head-masking ablation)
    focus: jax.Array | None = None  # [B,K]
    layers: tuple[int, ...] | None = static_field(None)
    towers: tuple[str, ...] = static_field(("text",))
    variant: str = static_field("paper")  # or "released" (module doc)
    # the released head-masking ablation instead of the boost (variant="released" only): heads
    # re-selected at every decode step in layers > head_mask_after (:func:`released_head_mask`)
    head_mask: str | None = static_field(None)  # "R_high_HR_low" or "R_low_to_high"
    head_mask_topk: int = static_field(5)
    head_mask_after: int = static_field(5)
    head_mask_seed: int = static_field(0)  # "random_choose": the draw's seed

    def __post_init__(self):
        check_variant(self.variant)
        if self.head_mask is not None and (self.variant != "released" or self.head_mask not in HEAD_MASKS):
            raise ValueError(f"VRGA: head_mask={self.head_mask!r} needs variant='released' and one of {list(HEAD_MASKS)}")

    def has_stage(self, name: str) -> bool:
        """Only ``weights``, once planned (``boost`` set) or with the head-masking ablation."""
        return name == "weights" and (self.boost is not None or self.head_mask is not None)

    def prefill_probes(self):
        """The attention row of q* at every layer (:class:`QuestionRow`); none for ``head_mask``."""
        if self.head_mask is not None:
            return ()
        return (QuestionRow(variant=self.variant),)

    def after_prefill(self, probe_results, layout):
        """Phase 1 (module doc) from q*'s rows [L,B,H,K]: sets ``boost``, ``focus`` [B,K] and
        ``visual_heads`` [B, L·H]."""
        if self.head_mask is not None:
            return self
        if self.variant == "released":
            return self._released_plan(probe_results, layout)
        rows = probe_results["vrga_row"]["text"].values  # [L,B,H,K]
        k = rows.shape[-1]
        lay = jax.tree_util.tree_map(lambda x: x[:, :k], layout)
        qpos = last_question_position(lay)
        n_keys = jnp.sum((jnp.arange(k)[None] <= qpos[:, None]) & (lay.attention_mask > 0), -1).astype(jnp.float32)
        r, h, efr = head_statistics(rows, lay.image_mask, n_keys)
        t1 = jnp.percentile(efr, 5, axis=-1, keepdims=True)
        t2 = jnp.percentile(r, 95, axis=-1, keepdims=True)
        hv = (efr <= t1) & (r >= t2)
        hv = jnp.where(hv.any(-1, keepdims=True), hv, r >= t2)
        hb = (jnp.arange(r.shape[-1]) < self.background_heads)[None] & (r < 0.01)
        flat_rows = jnp.transpose(rows, (1, 0, 2, 3)).reshape(rows.shape[1], -1, k)  # [B, L·H, K]
        mean_of = lambda sel: (
            jnp.einsum("bnk,bn->bk", flat_rows, sel.astype(jnp.float32)) / jnp.maximum(jnp.sum(sel, -1, keepdims=True), 1)
        )
        img = lay.image_mask
        a_ref = _minmax(jnp.maximum(0.0, _minmax(mean_of(hv), img) - _minmax(mean_of(hb), img)), img)
        kept = img & ~border_mask(lay, self.border_frac)
        focus = focus_tokens(a_ref, kept, self.min_focus)
        radius, skip = (2, 3) if self.fa == 1 else (3, 0)
        boost = neighbourhood(focus, lay, radius, skip)
        pad = layout.image_mask.shape[-1] - k
        grow = lambda x: jnp.pad(x, ((0, 0), (0, pad)))
        return dataclasses.replace(self, boost=grow(boost), focus=grow(focus), visual_heads=hv)

    def _released_plan(self, probe_results, layout):
        """Phase 1 as released (modeling_qwen2_5_vl.py:1584-1765), row by row."""
        rows = probe_results["vrga_row"]["text"].values.astype(jnp.float32)  # [L,B,H,K]
        k = rows.shape[-1]
        lay = jax.tree_util.tree_map(lambda x: x[:, :k], layout)
        flat = jnp.transpose(rows, (1, 0, 2, 3)).reshape(rows.shape[1], -1, k)  # [B, L·H, K]
        eps = 1e-12
        vs = vision_slice(lay)  # [B,K]
        vsf = vs.astype(jnp.float32)[:, None, :]
        n_slice = jnp.sum(vsf, -1)  # [B,1]
        n_all = jnp.sum((lay.attention_mask > 0) & ~lay.generated_mask, -1).astype(jnp.float32)[:, None]
        total = jnp.sum(flat, -1)
        att = jnp.where(total[..., None] > 0, flat / (total[..., None] + eps), flat)  # :1606-1611
        image_att = att * vsf  # :1614
        img_sum = jnp.sum(image_att, -1)
        norm = image_att / (img_sum[..., None] + eps)
        h = jnp.where(img_sum > 0, -jnp.sum(norm * jnp.log(norm + eps) * vsf, -1), 0.0)  # :1617-1621
        # released: :1624 — att.mean() over every key of the prompt (seq_len_all), not those q* sees
        r = (img_sum / n_slice) / (jnp.sum(att, -1) / n_all + eps)
        efr = h / (r + eps)  # :1627
        finite = jnp.isfinite(efr) & jnp.isfinite(r)  # :1639-1647
        t1 = jnp.nanpercentile(jnp.where(finite, efr, jnp.nan), 5, axis=-1, keepdims=True)
        t2 = jnp.nanpercentile(jnp.where(finite, r, jnp.nan), 95, axis=-1, keepdims=True)
        hv = finite & (efr <= t1) & (r >= t2)  # :1661
        hv = jnp.where(hv.any(-1, keepdims=True), hv, finite & (r >= t2))  # :1671-1674
        # released: :1658-1665 — `i += 1` before `i < 64`: the first 63 (finite) heads
        hb = finite & (jnp.cumsum(finite, -1) < self.background_heads) & (r < 0.01)
        mean_of = lambda sel: (
            jnp.einsum("bnk,bn->bk", image_att, sel.astype(jnp.float32)) / jnp.maximum(jnp.sum(sel, -1, keepdims=True), 1)
        )
        need, bg = mean_of(hv), mean_of(hb)  # :1677-1685
        # released: :1687-1690 — Norm = division by the sum, applied only when there are background heads
        edited = jnp.maximum(need / jnp.sum(need, -1, keepdims=True) - bg / jnp.sum(bg, -1, keepdims=True), 0.0)
        edited = edited / jnp.sum(edited, -1, keepdims=True)
        need = jnp.where(hb.any(-1, keepdims=True), edited, need)
        # border exclusion in slice coordinates (slice index 0 = <|vision_start|>): :1696-1721
        start = jnp.argmax(vs, -1)[:, None]
        sidx = jnp.arange(k)[None] - start  # slice index
        gw = jnp.take_along_axis(lay.grid_hw[..., 1], jnp.argmax(lay.image_mask, -1)[:, None], 1)
        gh = n_slice.astype(jnp.int32) // gw
        row, col = sidx // gw, sidx % gw
        cand = vs & (row < gh)
        prio = jnp.where(cand & (row < 2) & (col < 2), 0, jnp.where(cand & (row == 0), 1, jnp.where(cand & (col == 0), 2, 3)))
        order = jnp.where(prio < 3, prio * (2 * k) + sidx, 8 * k)
        rank = jnp.argsort(jnp.argsort(order, -1), -1)
        t_max = jnp.floor(n_slice * self.border_frac).astype(jnp.int32)  # :1700
        masked = (prio < 3) & (rank < t_max)
        n_masked = jnp.sum(masked, -1, keepdims=True)
        att_mean = jnp.sum(jnp.where(masked, 0.0, need), -1, keepdims=True) / ((n_slice - n_masked) + eps)  # :1724-1728
        rho = need / (att_mean + eps)  # :1731
        rho = jnp.where(masked, -1e9, rho)  # :1734
        # released: :1747 — ρ[~mask_flat] with integer indices: ρ at slice index n_slice − 1 − m for
        # each masked slice index m (bitwise not counts from the end), μ and σ (ddof 1) over those
        picked = jnp.zeros_like(vs)
        mirror = (n_slice.astype(jnp.int32) - 1 - sidx) + start  # key of ρ[-(m+1)]
        picked = picked.at[jnp.arange(vs.shape[0])[:, None], jnp.where(masked, mirror, k)].set(True, mode="drop")
        n_p = jnp.sum(picked, -1, keepdims=True).astype(jnp.float32)
        mu = jnp.sum(jnp.where(picked, rho, 0.0), -1, keepdims=True) / n_p
        sigma = jnp.sqrt(jnp.sum(jnp.where(picked, (rho - mu) ** 2, 0.0), -1, keepdims=True) / (n_p - 1))
        focus = vs & (rho > mu + 0.6 * sigma)  # :1753-1756
        top = jnp.argsort(jnp.where(vs, -rho, jnp.inf), -1, stable=True)[:, : self.min_focus]
        topmask = jnp.zeros_like(vs).at[jnp.arange(vs.shape[0])[:, None], top].set(True) & vs
        focus = jnp.where(jnp.sum(focus, -1, keepdims=True) < self.min_focus, topmask, focus)  # :1759-1760
        # phase-2 keep set (:930-941, :969-982): focus slice index in [3, |slice|), ± radius, clipped
        radius = 2 if self.fa == 1 else 3
        ok = focus & (sidx >= 3)
        boost = jnp.zeros_like(vs)
        for d in range(-radius, radius + 1):
            boost = boost | (jnp.roll(ok, d, -1) & (jnp.arange(k) - d >= 0)[None] & (jnp.arange(k) - d < k)[None])
        boost = boost & vs
        pad = layout.image_mask.shape[-1] - k
        grow = lambda x: jnp.pad(x, ((0, 0), (0, pad)))
        return dataclasses.replace(self, boost=grow(boost), focus=grow(focus), visual_heads=hv)

    def _released_weights(self, a, site):
        """Phase 2 as released (modeling_qwen2_5_vl.py:882-1000, 1104-1105) on generated queries."""
        vs = vision_slice(site.layout).astype(jnp.float32)[:, None, None, :]
        att = a / jnp.sum(a, -1, keepdims=True)  # :916-917
        image_att = att * vs
        h = -jnp.sum(image_att * jnp.log(image_att + 1e-12) * vs, -1)  # :920-921
        n = jnp.sum(site.mask, -1).astype(jnp.float32)  # the keys in the cache (batch of one)
        r = (jnp.sum(image_att, -1) / jnp.sum(vs, -1)) / (jnp.sum(att, -1) / n)  # :924
        generated = jnp.take_along_axis(
            site.layout.generated_mask, jnp.broadcast_to(site.query_pos[None], (a.shape[0], a.shape[2])), axis=1
        )[:, None, :]  # q == 1 (:886)
        gate = (r > 0.6) & (r > 0.2 * h)  # :925
        sel = self.boost.astype(jnp.float32)[:, None, None, :]
        if self.fa == 1:
            edited = jnp.where(gate[..., None], a * (1.0 + (self.factor - 1.0) * sel), a)  # :947
        else:
            # released: :996-997 — the slice of every row, gated or not, is multiplied by the keep mask
            keep = jnp.where(gate[..., None], sel, 0.0)
            edited = a * (1.0 - vs * (1.0 - keep))
        edited = edited / jnp.sum(edited, -1, keepdims=True)  # :1104
        edited = edited / (jnp.sum(edited, -1, keepdims=True) + 1e-8)  # :1105
        return jnp.where(generated[..., None], edited, a)

    def weights(self, a, site):
        """Phase 2 on a [B,H,T,K] float32: gated rows of generated queries boosted (``fa=1``) or
        restricted to the focus neighbourhoods (``fa=2``), renormalised; other rows unchanged."""
        if self.head_mask is not None:
            return released_head_mask(a, site, self.head_mask, self.head_mask_topk, self.head_mask_after, self.head_mask_seed)
        if self.variant == "released":
            return self._released_weights(a, site)
        img = site.layout.image_mask
        imgf = img.astype(jnp.float32)[:, None, None, :]
        r = focus_ratio(a, img, key_count(site.mask, a))
        h_raw = visual_entropy(a, img, renormalize=False)  # the raw slice's entropy
        generated = jnp.take_along_axis(
            site.layout.generated_mask, jnp.broadcast_to(site.query_pos[None], (a.shape[0], a.shape[2])), axis=1
        )[:, None, :]  # [B,1,T]
        gate = (r > 0.6) & (r > 0.2 * h_raw) & generated
        sel = self.boost.astype(jnp.float32)[:, None, None, :]
        if self.fa == 1:
            edited = a * (1.0 + (self.factor - 1.0) * sel)
        else:
            edited = a * (1.0 - imgf * (1.0 - sel))
        edited = edited / jnp.sum(edited, -1, keepdims=True)
        return jnp.where(gate[..., None], edited, a)


HEAD_MASKS = ("R_high_HR_low", "R_low_to_high", "random_choose")


def released_head_mask(a, site, mask_type: str, topk: int = 5, after: int = 5, seed: int = 0):
    """The released head-masking ablation (modeling_qwen2_5_vl.py:1022-1040): at decode steps
    (generated queries) of layers > ``after``, heads chosen from the batch-mean row (:728-795) —
    ``R_high_HR_low``: among heads with R above the median, the ``topk`` of lowest H/R (all of them
    when fewer); ``R_low_to_high``: the ``topk`` of lowest R — have their image slice zeroed, then
    each row is renormalised (+1e-12, :801-822; then :1104-1105); ``random_choose`` (:775): ``topk``
    heads drawn without replacement at every layer and decode step — the release draws with
    unseeded ``np.random.choice``, jaxmm from ``jax.random`` keyed by (``seed``, layer, the query's key position),
    so a run is reproducible. a [B,H,T,K]."""
    if site.layer <= after:  # :1023
        return a
    eps = 1e-12
    vs = vision_slice(site.layout).astype(jnp.float32)[:, None, None, :]
    mean = jnp.mean(a, 0)  # [H,T,K] (:747)
    vm = vs[0]
    n_slice = jnp.sum(vm, -1)
    n = jnp.sum(site.mask[0], -1).astype(jnp.float32)  # the keys in the cache
    r = (jnp.sum(mean * vm, -1) / n_slice) / (jnp.sum(mean, -1) / n + eps)  # :755
    p = mean * vm / (jnp.sum(mean * vm, -1, keepdims=True) + eps)
    h = -jnp.sum(p * jnp.log(p + eps) * vm, -1)  # :756-757
    hr = h / (r + eps)
    if mask_type == "R_high_HR_low":  # :778-782
        cand = r > jnp.median(r, axis=0, keepdims=True)
        order = jnp.argsort(jnp.where(cand, hr, jnp.inf), axis=0)
        rank = jnp.argsort(order, axis=0)
        heads = cand & (rank < topk)
    elif mask_type == "random_choose":  # :775
        n_heads, t = r.shape
        base = jax.random.fold_in(jax.random.PRNGKey(seed), site.layer)
        drawn = jax.vmap(lambda q: jax.random.permutation(jax.random.fold_in(base, q), n_heads)[: min(topk, n_heads)])(
            site.query_pos
        )  # [T,topk]
        heads = jnp.zeros((t, n_heads), bool).at[jnp.arange(t)[:, None], drawn].set(True).T
    else:  # :785
        rank = jnp.argsort(jnp.argsort(r, axis=0), axis=0)
        heads = rank < topk
    zero = heads.astype(jnp.float32)[None, :, :, None] * vs  # [B,H,T,K]
    edited = a * (1.0 - zero)
    edited = edited / (jnp.sum(edited, -1, keepdims=True) + 1e-12)  # :819-820
    edited = edited / jnp.sum(edited, -1, keepdims=True)  # :1104
    edited = edited / (jnp.sum(edited, -1, keepdims=True) + 1e-8)  # :1105
    generated = jnp.take_along_axis(
        site.layout.generated_mask, jnp.broadcast_to(site.query_pos[None], (a.shape[0], a.shape[2])), axis=1
    )[:, None, :, None]
    return jnp.where(generated, edited, a)


@register
class HeadMask(Intervention):
    """Zeroes the attention weights (hence the output) of chosen heads: ``mask`` [B, L·H] or
    [L·H] (layer-major, 1 = masked)."""

    mask: jax.Array = None
    num_heads: int = static_field(1)
    layers: tuple[int, ...] | None = static_field(None)
    towers: tuple[str, ...] = static_field(("text",))

    def weights(self, a, site):
        """a [B,H,T,K] -> a with the masked heads' rows zeroed (not renormalised)."""
        m = jnp.asarray(self.mask, jnp.float32)
        m = m.reshape(m.shape[:-1] + (-1, self.num_heads))[..., site.layer, :]  # [B,H] or [H]
        keep = 1.0 - (m[:, :, None, None] if m.ndim == 2 else m[None, :, None, None])
        return a * keep


def efr_head_mask(planned: VRGA, num_heads: int) -> HeadMask:
    """VRGA's ablation: mask the visual (EFR-selected) heads found at prefill."""
    return HeadMask(mask=planned.visual_heads.astype(jnp.float32), num_heads=num_heads)
