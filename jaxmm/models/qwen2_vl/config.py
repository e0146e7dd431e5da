"""Qwen2-VL configuration read from Qwen2-VL's ``config.json`` field names.

Vision fields (``transformers/models/qwen2_vl/configuration_qwen2_vl.py``): ``embed_dim`` (tower
width), ``hidden_size`` (output width = the text width), ``mlp_ratio``, ``hidden_act``
(quick_gelu). No windows: every block attends within each frame; M-RoPE positions of videos
advance by 1 per temporal step.
"""

from __future__ import annotations

import dataclasses

from jaxmm.models.core import config as core


@dataclasses.dataclass(frozen=True)
class VisionConfig(core.VisionConfig):
    """The shared vision fields (``hidden_size`` = ``embed_dim``, ``out_hidden_size`` = HF's
    ``hidden_size``, ``intermediate_size`` = ``embed_dim · mlp_ratio``)."""


@dataclasses.dataclass(frozen=True)
class Qwen2VLConfig(core.VLConfig):
    """Qwen2-VL as read from ``config.json`` (``transformers/models/qwen2_vl/
    configuration_qwen2_vl.py``; module doc); build it with :meth:`VLConfig.from_dict`, which
    raises :class:`~jaxmm.models.core.config.ConfigError` on a missing, ill-typed or inconsistent
    field."""

    vision: VisionConfig
    model_type: str = "qwen2_vl"

    MODEL_TYPE = "qwen2_vl"
    VISION_CONFIG = VisionConfig
    VISION_ACTS = ("quick_gelu",)
    # transformers' configuration_qwen2_vl.py: the vision tower's width is embed_dim, hidden_size its
    # output (the text width); intermediate = embed_dim * mlp_ratio.
    REQUIRED_VISION = ("depth", "embed_dim", "hidden_size", "num_heads")
    TEXT_DEFAULTS = {"rms_norm_eps": 1e-5, "hidden_act": "silu", "max_position_embeddings": 32768, "rope_theta": 1000000.0}
    VISION_DEFAULTS = {
        "hidden_act": "quick_gelu",
        "mlp_ratio": 4,
        "in_channels": 3,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }

    @staticmethod
    def vision_fields(vis: dict) -> dict:
        """Qwen2-VL's ``vision_config`` names -> VisionConfig's: ``hidden_size`` = ``embed_dim``,
        ``out_hidden_size`` = HF's ``hidden_size``, ``intermediate_size`` = ``embed_dim · mlp_ratio``,
        ``tokens_per_second`` 1 (video positions advance by 1 per temporal step)."""
        out = dict(vis)
        embed = vis["embed_dim"]
        out["out_hidden_size"] = vis["hidden_size"]
        out["hidden_size"] = embed
        out["intermediate_size"] = int(embed * vis["mlp_ratio"])
        out["tokens_per_second"] = 1
        return out
