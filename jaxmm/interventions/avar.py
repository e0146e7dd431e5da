"""AVAR's training-free intervention (Luo et al., "From Narrow to Panoramic Vision", ICLR 2026,
arXiv 2603.03825; methods.md "AVAR").

    Ẑ = Z + α_img · M_img ⊙ Z − α_sys · M_sys ⊙ Z                                  [paper]

with M_img / M_sys the image / system-prompt key masks. The paper does not say whether Z is the
pre-softmax logit or the attention weight, nor which layers: both are options here, default
``on="logits"`` on all layers [ours]. On weights the formula is applied as written (rows are not
renormalised) unless ``renormalize=True`` [ours]. Defaults α_img = 0.15, α_sys = 0 (the paper
sweeps α_sys ∈ {0, 0.05, 0.40, 0.60}). α_img and α_sys may be per-sample leaves ([B]).
The authors' release (lrlbbzl/Qwen-AVAR) has no code for this intervention: ``variant`` accepts
only ``"paper"`` and ``"released"`` raises, saying so (its AGTO and VARS are in
:mod:`jaxmm.objectives.avar`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmm.attention import Intervention, register, static_field
from jaxmm.interventions.keys import key_set, per_sample


@register
class AVAR(Intervention):
    """AVAR's training-free edit Ẑ = Z + α_img·M_img ⊙ Z − α_sys·M_sys ⊙ Z (module doc; arXiv
    2603.03825), on the logits (``on="logits"``, default) or the weights (``on="weights"``,
    optionally renormalised) of the text tower's layers (``layers``, None = all).

    ``alpha_img``, ``alpha_sys``: scalars or per-sample [B] leaves (dimensionless).

    Raises:
        ValueError: ``on`` not "logits"/"weights", or ``variant`` other than "paper" (the release
            has no code for the intervention).
    """

    alpha_img: jax.Array = 0.15
    alpha_sys: jax.Array = 0.0
    on: str = static_field("logits")
    renormalize: bool = static_field(False)
    layers: tuple[int, ...] | None = static_field(None)
    towers: tuple[str, ...] = static_field(("text",))
    variant: str = static_field("paper")

    def __post_init__(self):
        if self.on not in ("logits", "weights"):
            raise ValueError(f"AVAR: on={self.on!r}; expected 'logits' or 'weights'")
        if self.variant != "paper":
            raise ValueError(
                f"AVAR: variant={self.variant!r}; expected one of ('paper',): lrlbbzl/Qwen-AVAR "
                "releases no code for the training-free intervention"
            )

    def has_stage(self, name: str) -> bool:
        """Only the stage ``on`` names runs (``"logits"`` or ``"weights"``)."""
        return name == self.on

    def _edit(self, x, site):
        scale = per_sample(self.alpha_img) * key_set(site, "image") - per_sample(self.alpha_sys) * key_set(site, "system")
        return x + scale * x

    def logits(self, z: jax.Array, site) -> jax.Array:
        """z [B,H,T,K] float32 -> (1 + α_img·M_img − α_sys·M_sys)·z on visible keys; masked keys kept."""
        # masked keys hold the float32 minimum: leave them alone (scaling would overflow to -inf)
        return jnp.where(site.mask, self._edit(z, site), z)

    def weights(self, a: jax.Array, site) -> jax.Array:
        """a [B,H,T,K] float32 -> the same scaling on the weights; rows renormalised only with
        ``renormalize=True`` (else they no longer sum to 1)."""
        a = self._edit(a, site)
        return a / jnp.sum(a, axis=-1, keepdims=True) if self.renormalize else a
