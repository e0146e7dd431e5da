"""Qwen3-VL (dense) configuration read from ``config.json`` (``transformers/models/qwen3_vl/
configuration_qwen3_vl.py``): text ``head_dim``, ``attention_bias``, q/k RMSNorm and interleaved
M-RoPE; vision ``num_position_embeddings``, ``deepstack_visual_indexes``, patch bias, no windows."""

from __future__ import annotations

from jaxmm.models.qwen2_5_vl.config import Qwen2_5_VLConfig


class Qwen3VLConfig(Qwen2_5_VLConfig):
    MODEL_TYPE = "qwen3_vl"
    # transformers' configuration_qwen3_vl.py defaults (rope_theta 5e5, patch 16, ...); head_dim 128,
    # attention_bias false and mrope_section [24, 20, 20] (modeling_qwen3_vl.py) in text_fields.
    TEXT_DEFAULTS = {"rms_norm_eps": 1e-6, "hidden_act": "silu", "max_position_embeddings": 128000,
                     "rope_theta": 500000.0}
    VISION_DEFAULTS = {"hidden_act": "gelu_pytorch_tanh", "in_channels": 3, "patch_size": 16,
                       "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 2304,
                       "deepstack_visual_indexes": (8, 16, 24)}

    @staticmethod
    def vision_fields(vis: dict) -> dict:
        out = dict(vis)
        out["fullatt_block_indexes"] = tuple(range(vis["depth"]))
        out["windowed"] = False
        out["patch_bias"] = True
        out.setdefault("window_size", 112)
        out["tokens_per_second"] = 1
        return out

    @staticmethod
    def text_fields(text: dict) -> dict:
        out = dict(text)
        out["head_dim_override"] = text.get("head_dim", 128)
        out["attention_bias"] = bool(text.get("attention_bias", False))
        out["o_proj_bias"] = out["attention_bias"]
        out["qk_norm"] = True
        out["mrope_interleaved"] = True
        rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
        rope.setdefault("mrope_section", [24, 20, 20])
        out["rope_parameters"] = rope
        return out
