"""PAI — "Paying More Attention to Image" (Liu et al., ECCV 2024; code LALBJ/PAI; methods.md "PAI").

Attention amplification, pre-softmax, on the last query row, at layers ``start … end−1``::

    z_ij ← z_ij + α·|z_ij|    for j ∈ V (image keys), i = the last query        [code]

"Last query" is each row's last non-padding query of a call (``site.last_query``): the final
prompt token at prefill — also in a right-padded batch, where it is not the last column — and the
new token at every decode step. Defaults α = 0.2, layers 2–32 (LLaVA-1.5); :func:`pai` maps the range
onto any depth (``end`` defaults to the number of layers).

The optional contrast with a text-only pass (:func:`pai_contrast`) is a logits processor:
``log p ← γ (log p_mm − log p_text) + log p_text``, tokens with ``log p_mm < log 0.1 + max log p_mm``
set to −∞; γ = 1.1 (the README's commands; the evaluation scripts default to γ = 2). The knob
``gamma`` (``pai:gamma=1.1``) asks for it: eval and ``Model.generate`` then decode with the
contrast (:func:`decoding_contrast`); the attention edit itself does not change.

``variant="released"`` follows the authors' code (LALBJ/PAI, ``attention.py``, ``CFG.py``,
``model_loader.py``) where it differs: the edited row is the call's last column (``[:, :, -1]``,
shared by the batch: a right-padded row's own last token is not edited), the image keys are one
span per row from the first to the last image token (text between two images included), and
the contrast at γ = 1 returns log p_mm with no cutoff; with ``use_cfg=True`` (the run also uses the
contrast, as the README's commands do) the prompt's prefill is not edited, only generated tokens.
docs/methods.md lists every difference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmm.attention import Intervention, register, static_field
from jaxmm.interventions.keys import image_span, key_set, per_sample


VARIANTS = ("paper", "released")


def _check_variant(variant):
    if variant not in VARIANTS:
        raise ValueError(f"PAI: variant={variant!r}; expected one of {VARIANTS}")


@register
class PAI(Intervention):
    """PAI's attention amplification z_ij ← z_ij + α·|z_ij| on the image keys of each row's last
    query (module doc; Liu et al., ECCV 2024, LALBJ/PAI ``attention.py``), at ``layers``
    (:func:`pai` builds the default range). ``alpha``: scalar or per-sample [B] leaf.

    Raises:
        ValueError: an unknown ``variant``, or ``use_cfg=True`` without ``variant="released"``.
    """

    alpha: jax.Array = 0.2
    layers: tuple[int, ...] | None = static_field(None)
    towers: tuple[str, ...] = static_field(("text",))
    variant: str = static_field("paper")
    use_cfg: bool = static_field(False)  # released only: the run also decodes with the contrast
    gamma: float | None = static_field(None)  # decode with the contrast at γ (None: the edit alone)

    def __post_init__(self):
        _check_variant(self.variant)
        if self.gamma is not None and not self.gamma > 0:
            raise ValueError(f"PAI: gamma={self.gamma!r}; expected a contrast strength > 0 (or None: no contrast)")
        if self.use_cfg and self.variant != "released":
            raise ValueError(f"PAI: use_cfg={self.use_cfg!r} applies to variant='released' only")

    def logits(self, z, site):
        """z [B,H,T,K] float32 -> z + α·|z| on (last query row, image key) entries that are visible;
        every other entry unchanged."""
        if self.variant == "released":
            # released: attention.py:91 edits row -1 of the call, the same column for every row
            row = jnp.broadcast_to(jnp.max(site.last_query), site.last_query.shape)
            if self.use_cfg:
                # released: attention.py:90,125 with CFG.py:32-33,48-49: with --use-cfg the flag is set
                # at setup and first cleared by the logits processor, so the prompt's prefill is not
                # edited; only generated queries are
                gen = jnp.take_along_axis(site.layout.generated_mask, jnp.clip(row, 0)[:, None], axis=1)[:, 0]
                row = jnp.where(gen, row, -2)  # -2: no query row
            # released: attention.py:91 slices img_start_idx:img_end_idx, one span per prompt
            # (model_loader.py:121-122: the first image position + 576 LLaVA-1.5 image tokens)
            keys = image_span(site.layout.image_mask).astype(jnp.float32)[:, None, None, :]
        else:
            row, keys = site.last_query, key_set(site, "image")
        last = (site.query_pos[None, :] == row[:, None])[:, None, :, None]  # [B,1,T,1]
        edit = z + per_sample(self.alpha) * jnp.abs(z) * keys
        return jnp.where(last & site.mask, edit, z)


def pai(
    num_layers: int,
    alpha: float = 0.2,
    start: int = 2,
    end: int | None = None,
    variant: str = "paper",
    use_cfg: bool = False,
    gamma: float | None = None,
) -> PAI:
    """PAI on layers ``start … end−1`` (default: 2 … num_layers−1); ``gamma``: also decode with the
    contrast against a text-only pass at γ (:func:`decoding_contrast`)."""
    end = num_layers if end is None else min(end, num_layers)
    return PAI(alpha=alpha, layers=tuple(range(start, end)), variant=variant, use_cfg=use_cfg, gamma=gamma)


def decoding_contrast(interventions) -> tuple[float, str] | None:
    """``(γ, variant)`` of the PAI among ``interventions`` that asks to decode with its contrast
    (``gamma`` set), or None. The caller decodes with
    ``Contrast(text_only(batch, config), gamma=γ, variant=variant)`` (:class:`jaxmm.generate.Contrast`).

    Raises:
        ValueError: two PAI interventions ask for a contrast (one text-only stream is decoded).
    """
    asks = [iv for iv in interventions if isinstance(iv, PAI) and iv.gamma is not None]
    if len(asks) > 1:
        raise ValueError(f"{len(asks)} PAI interventions set gamma; one contrast is decoded, set it on one of them")
    return (float(asks[0].gamma), asks[0].variant) if asks else None


def pai_contrast(
    logits_mm: jax.Array, logits_text: jax.Array, gamma: float = 1.1, cutoff: float = 0.1, variant: str = "paper"
) -> jax.Array:
    """PAI's image-vs-text contrast on next-token logits [..., V] -> contrasted log-probabilities
    (float32 [..., V]; ``variant="released"``: at γ = 1, log p_mm with no cutoff)."""
    _check_variant(variant)
    lp_mm = jax.nn.log_softmax(logits_mm.astype(jnp.float32), -1)
    lp_tx = jax.nn.log_softmax(logits_text.astype(jnp.float32), -1)
    out = gamma * (lp_mm - lp_tx) + lp_tx
    keep = lp_mm >= jnp.log(cutoff) + jnp.max(lp_mm, -1, keepdims=True)
    out = jnp.where(keep, out, -jnp.inf)
    if variant == "released":
        out = jnp.where(gamma == 1, lp_mm, out)  # released: CFG.py:29-31 returns log p_mm at γ = 1
    return out
