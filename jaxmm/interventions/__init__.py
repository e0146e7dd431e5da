"""Interventions on the attention seam (one method per file)."""

from jaxmm.interventions.keys import KeyBias, KeyLogitShift, KeyWeightScale, key_set, per_sample

__all__ = ["KeyBias", "KeyLogitShift", "KeyWeightScale", "key_set", "per_sample"]
