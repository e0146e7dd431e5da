"""LLaVA-1.5 configuration read from ``config.json``.

Mirrors ``transformers/models/llava/configuration_llava.py`` (5.x) with its sub-configs: a CLIP
vision tower (``configuration_clip.py: CLIPVisionConfig``) and a Llama decoder
(``configuration_llama.py: LlamaConfig``). Published LLaVA checkpoints leave most fields to those
classes' defaults (``llava-hf/llava-1.5-7b-hf`` gives no text ``hidden_size``: it is Llama's 4096),
so absent fields take transformers' defaults, the same values: LLaVA's CLIP ViT-L/14-336 when
``vision_config`` is absent, ``CLIPVisionConfig``'s for fields missing from a given one, and
``LlamaConfig``'s for the text fields.

The decoder is the shared one (:mod:`jaxmm.models.core.decoder`) with Llama's switches: no biases,
1-D RoPE, which is M-RoPE with one section of ``head_dim/2`` frequencies and the same position on
all three rows.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from jaxmm.models.core import config as core
from jaxmm.models.core.config import ConfigError, TextConfig, check_fields, read_config_json

#: transformers' LlamaConfig defaults (configuration_llama.py)
LLAMA_DEFAULTS = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": None, "hidden_act": "silu",
                  "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "attention_bias": False, "mlp_bias": False,
                  "head_dim": None, "tie_word_embeddings": False, "eos_token_id": 2}
#: LlavaConfig's vision sub-config when config.json has none (CLIP ViT-L/14 at 336 px)
LLAVA_VISION = {"hidden_size": 1024, "intermediate_size": 4096, "patch_size": 14, "image_size": 336,
                "num_hidden_layers": 24, "num_attention_heads": 16}
#: CLIPVisionConfig's defaults for fields a given vision_config leaves out
CLIP_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                 "num_channels": 3, "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu",
                 "layer_norm_eps": 1e-5}


@dataclasses.dataclass(frozen=True)
class VisionConfig(core.VisionConfig):
    """CLIP tower and projector: ``depth`` = CLIP's ``num_hidden_layers``, ``num_heads`` its
    ``num_attention_heads``, ``in_channels`` its ``num_channels``; ``image_size`` (pixels per side);
    ``layer_norm_eps``; ``vision_feature_layer`` (an index into the tower's hidden states, negative
    from the end, or several, concatenated); ``vision_feature_select_strategy`` ("default" drops the
    CLS token, "full" keeps it); the projector's ``projector_hidden_act`` and
    ``multimodal_projector_bias``; ``out_hidden_size`` = the text width."""

    image_size: int = 336
    layer_norm_eps: float = 1e-5
    vision_feature_layer: int | tuple[int, ...] = -2
    vision_feature_select_strategy: str = "default"
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = True

    @property
    def grid(self) -> int:
        """Patches per image side (``image_size // patch_size``)."""
        return self.image_size // self.patch_size

    @property
    def tokens_per_image(self) -> int:
        """Image tokens the LLM sees per image: grid², plus the CLS token with "full"."""
        return self.grid ** 2 + (self.vision_feature_select_strategy == "full")

    @property
    def feature_layers(self) -> tuple[int, ...]:
        """``vision_feature_layer`` as non-negative indexes into the depth+1 hidden states."""
        layers = (self.vision_feature_layer,) if isinstance(self.vision_feature_layer, int) else self.vision_feature_layer
        return tuple(i % (self.depth + 1) for i in layers)


@dataclasses.dataclass(frozen=True)
class LlavaConfig(core.VLConfig):
    vision: VisionConfig
    model_type: str = "llava"
    video_token_id: int = -1             # LLaVA-1.5 has no video and no vision start/end tokens
    vision_start_token_id: int = -1
    vision_end_token_id: int = -1

    MODEL_TYPE = "llava"
    VISION_CONFIG = VisionConfig
    VISION_ACTS = ("quick_gelu",)
    VISION_ROTARY = False         # CLIP: learned absolute positions

    def consistency_checks(self) -> list[tuple[bool, str]]:
        v = self.vision
        layers = (v.vision_feature_layer,) if isinstance(v.vision_feature_layer, int) else v.vision_feature_layer
        return super().consistency_checks() + [
            (v.image_size % v.patch_size == 0,
             f"vision image_size={v.image_size} is not a multiple of patch_size={v.patch_size}"),
            (all(-(v.depth + 1) <= i <= v.depth for i in layers),
             f"vision_feature_layer={v.vision_feature_layer} out of range for {v.depth} vision layers"),
            (v.vision_feature_select_strategy in ("default", "full"),
             f"vision_feature_select_strategy={v.vision_feature_select_strategy!r}; expected 'default' or 'full'"),
            (v.projector_hidden_act == "gelu", f"projector_hidden_act={v.projector_hidden_act!r} is not supported ('gelu')"),
        ]

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> "LlavaConfig":
        """Builds the config from a parsed ``config.json`` (absent fields: transformers' defaults).

        Raises:
            ConfigError: naming ``source`` and the field: a value of the wrong type, a
                ``model_type`` of another family, a text model other than Llama, a RoPE scaling
                jaxmm does not implement, or inconsistent values.
        """
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        if d.get("model_type") not in (None, cls.MODEL_TYPE):
            raise ConfigError(f"{source}: model_type={d.get('model_type')!r}; {cls.__name__} reads {cls.MODEL_TYPE!r}")
        for key in ("vision_config", "text_config"):
            if d.get(key) is not None and not isinstance(d[key], dict):
                raise ConfigError(f"{source}: field {key!r} must be an object, got {type(d[key]).__name__} {d[key]!r}")
        text = {**LLAMA_DEFAULTS, **(d.get("text_config") or {})}
        if text.get("model_type", "llama") != "llama":
            raise ConfigError(f"{source}: text_config.model_type={text['model_type']!r}; jaxmm's LLaVA reads a "
                              f"'llama' decoder")
        check_fields({k: v for k, v in text.items() if v is not None}, "text_config.", (), source)
        rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ConfigError(f"{source}: text_config rope type {rope.get('rope_type', rope.get('type'))!r} is not "
                              f"supported (jaxmm implements Llama's default RoPE)")
        theta = rope.get("rope_theta", text.get("rope_theta", 10000.0))
        check_fields({"rope_theta": theta}, "text_config.rope_parameters.", (), source)
        if text["mlp_bias"]:
            raise ConfigError(f"{source}: text_config.mlp_bias=true is not supported")
        heads = text["num_attention_heads"]
        head_dim = text["head_dim"] or text["hidden_size"] // heads
        tcfg = dict(vocab_size=text["vocab_size"], hidden_size=text["hidden_size"],
                    intermediate_size=text["intermediate_size"], num_hidden_layers=text["num_hidden_layers"],
                    num_attention_heads=heads, num_key_value_heads=text["num_key_value_heads"] or heads,
                    rms_norm_eps=float(text["rms_norm_eps"]), rope_theta=float(theta),
                    mrope_section=(head_dim // 2, 0, 0), hidden_act=text["hidden_act"],
                    max_position_embeddings=text["max_position_embeddings"], head_dim_override=text["head_dim"],
                    attention_bias=text["attention_bias"], o_proj_bias=text["attention_bias"])
        vis = {**(LLAVA_VISION if d.get("vision_config") is None else CLIP_DEFAULTS), **(d.get("vision_config") or {})}
        check_fields(vis, "vision_config.", (), source)
        top = {k: d[k] for k in ("image_token_index", "image_token_id", "tie_word_embeddings",
                                 "multimodal_projector_bias") if k in d}
        check_fields(top, "", (), source)
        layer = d.get("vision_feature_layer", -2)
        if not (core.is_int(layer) or (isinstance(layer, list) and layer and all(core.is_int(i) for i in layer))):
            raise ConfigError(f"{source}: field 'vision_feature_layer' must be an integer or a list of integers, "
                              f"got {type(layer).__name__} {layer!r}")
        vcfg = dict(depth=vis["num_hidden_layers"], hidden_size=vis["hidden_size"],
                    intermediate_size=vis["intermediate_size"], num_heads=vis["num_attention_heads"],
                    in_channels=vis["num_channels"], patch_size=vis["patch_size"], image_size=vis["image_size"],
                    spatial_merge_size=1, temporal_patch_size=1, out_hidden_size=text["hidden_size"],
                    hidden_act=vis["hidden_act"], layer_norm_eps=float(vis["layer_norm_eps"]),
                    vision_feature_layer=layer if isinstance(layer, int) else tuple(layer),
                    vision_feature_select_strategy=d.get("vision_feature_select_strategy", "default"),
                    projector_hidden_act=d.get("projector_hidden_act", "gelu"),
                    multimodal_projector_bias=bool(d.get("multimodal_projector_bias", True)))
        eos = text.get("eos_token_id")
        eos = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
        tie = d.get("tie_word_embeddings", False) or text.get("tie_word_embeddings", False)
        image_token = d.get("image_token_index", d.get("image_token_id", 32000))
        try:
            return cls(vision=VisionConfig(**vcfg), text=TextConfig(**tcfg), image_token_id=int(image_token),
                       tie_word_embeddings=bool(tie), eos_token_id=eos)
        except ConfigError as e:
            raise ConfigError(f"{source}: {str(e).removeprefix('config.json: ')}") from None

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "LlavaConfig":
        """Reads ``<path>/config.json`` (or ``path`` itself if it is a file); errors as :meth:`from_dict`."""
        p = Path(path)
        f = p / "config.json" if p.is_dir() else p
        return cls.from_dict(read_config_json(f), source=str(f))
