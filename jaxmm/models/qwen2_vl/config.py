"""Qwen2-VL configuration: Qwen2.5-VL's schema read from Qwen2-VL's ``config.json`` field names.

Vision fields (``transformers/models/qwen2_vl/configuration_qwen2_vl.py``): ``embed_dim`` (tower
width), ``hidden_size`` (output width = the text width), ``mlp_ratio``, ``hidden_act``
(quick_gelu). No windows; M-RoPE positions of videos advance by 1 per temporal step.
"""

from __future__ import annotations

from jaxmm.models.qwen2_5_vl.config import Qwen2_5_VLConfig


class Qwen2VLConfig(Qwen2_5_VLConfig):
    MODEL_TYPE = "qwen2_vl"
    # transformers' configuration_qwen2_vl.py: the vision tower's width is embed_dim, hidden_size its
    # output (the text width); intermediate = embed_dim * mlp_ratio.
    REQUIRED_VISION = ("depth", "embed_dim", "hidden_size", "num_heads")
    VISION_DEFAULTS = {"hidden_act": "quick_gelu", "mlp_ratio": 4, "in_channels": 3, "patch_size": 14,
                       "spatial_merge_size": 2, "temporal_patch_size": 2}

    @staticmethod
    def vision_fields(vis: dict) -> dict:
        out = dict(vis)
        embed = vis["embed_dim"]
        out["out_hidden_size"] = vis["hidden_size"]
        out["hidden_size"] = embed
        out["intermediate_size"] = int(embed * vis["mlp_ratio"])
        out["fullatt_block_indexes"] = tuple(range(vis["depth"]))
        out["windowed"] = False
        out["tokens_per_second"] = 1
        out.setdefault("window_size", 112)
        return out
