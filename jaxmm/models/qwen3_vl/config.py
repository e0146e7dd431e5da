"""Qwen3-VL (dense) configuration read from ``config.json`` (``transformers/models/qwen3_vl/
configuration_qwen3_vl.py``): text ``head_dim``, ``attention_bias``, q/k RMSNorm and interleaved
M-RoPE; vision ``num_position_embeddings`` (a learned position table), ``deepstack_visual_indexes``,
a patch embedding with bias, no windows."""

from __future__ import annotations

import dataclasses

from jaxmm.models.core import config as core


@dataclasses.dataclass(frozen=True)
class VisionConfig(core.VisionConfig):
    """The shared vision fields plus ``num_position_embeddings`` (entries of the learned, bilinearly
    resampled position table; a square number) and ``deepstack_visual_indexes`` (blocks whose
    features are added to the decoder's image tokens after layers 0, 1, …)."""

    num_position_embeddings: int = 2304
    deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)


@dataclasses.dataclass(frozen=True)
class Qwen3VLConfig(core.VLConfig):
    """Qwen3-VL (dense) as read from ``config.json`` (``transformers/models/qwen3_vl/
    configuration_qwen3_vl.py``; module doc); build it with :meth:`VLConfig.from_dict`, which
    raises :class:`~jaxmm.models.core.config.ConfigError` on a missing, ill-typed or inconsistent
    field."""

    vision: VisionConfig
    model_type: str = "qwen3_vl"

    MODEL_TYPE = "qwen3_vl"
    VISION_CONFIG = VisionConfig
    VISION_ACTS = ("gelu_pytorch_tanh",)
    # transformers' configuration_qwen3_vl.py defaults (rope_theta 5e5, patch 16, ...); head_dim 128,
    # attention_bias false and mrope_section [24, 20, 20] (modeling_qwen3_vl.py) in text_fields.
    TEXT_DEFAULTS = {"rms_norm_eps": 1e-6, "hidden_act": "silu", "max_position_embeddings": 128000, "rope_theta": 500000.0}
    VISION_DEFAULTS = {
        "hidden_act": "gelu_pytorch_tanh",
        "in_channels": 3,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "num_position_embeddings": 2304,
        "deepstack_visual_indexes": (8, 16, 24),
    }

    def consistency_checks(self) -> list[tuple[bool, str]]:
        """The shared checks (:meth:`VLConfig.consistency_checks`) plus a square
        ``num_position_embeddings`` and ``deepstack_visual_indexes`` within the tower's depth; a failing
        one makes ``__post_init__`` raise :class:`~jaxmm.models.core.config.ConfigError`."""
        v = self.vision
        side = round(v.num_position_embeddings**0.5)
        return super().consistency_checks() + [
            (
                side * side == v.num_position_embeddings,
                f"num_position_embeddings={v.num_position_embeddings} is not a square number",
            ),
            (
                all(0 <= i < v.depth for i in v.deepstack_visual_indexes),
                f"deepstack_visual_indexes={list(v.deepstack_visual_indexes)} out of range for depth={v.depth}",
            ),
        ]

    @staticmethod
    def vision_fields(vis: dict) -> dict:
        """``vision_config`` -> VisionConfig's fields, with ``tokens_per_second`` set to 1 (Qwen3-VL's
        config.json has no such field)."""
        out = dict(vis)
        out["tokens_per_second"] = 1
        return out

    @staticmethod
    def text_fields(text: dict) -> dict:
        """``text_config`` -> TextConfig's fields: the explicit ``head_dim`` (default 128),
        ``attention_bias`` on q/k/v and o (default False), q/k RMSNorm, interleaved M-RoPE with
        ``mrope_section`` [24, 20, 20] unless ``rope_parameters``/``rope_scaling`` give one
        (``modeling_qwen3_vl.py``)."""
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
