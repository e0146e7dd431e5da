"""Qwen2-VL configuration: Qwen2.5-VL's schema read from Qwen2-VL's ``config.json`` field names.

Vision fields (``transformers/models/qwen2_vl/configuration_qwen2_vl.py``): ``embed_dim`` (tower
width), ``hidden_size`` (output width = the text width), ``mlp_ratio``, ``hidden_act``
(quick_gelu). No windows; M-RoPE positions of videos advance by 1 per temporal step.
"""

from __future__ import annotations

from jaxmm.models.qwen2_5_vl.config import Qwen2_5_VLConfig


class Qwen2VLConfig(Qwen2_5_VLConfig):
    MODEL_TYPE = "qwen2_vl"

    @staticmethod
    def vision_fields(vis: dict) -> dict:
        out = dict(vis)
        embed = int(vis.get("embed_dim", 1280))
        out["out_hidden_size"] = vis.get("hidden_size", 3584)
        out["hidden_size"] = embed
        out["intermediate_size"] = int(embed * vis.get("mlp_ratio", 4))
        out["hidden_act"] = vis.get("hidden_act", "quick_gelu")
        out["fullatt_block_indexes"] = tuple(range(int(vis.get("depth", 32))))
        out["windowed"] = False
        out["tokens_per_second"] = 1
        out.setdefault("window_size", 112)
        return out
