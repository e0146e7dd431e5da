"""What the LLaVA families share: a CLIP vision tower, the 2-layer GELU projector, a Llama decoder.

Used by ``jaxmm.models.llava`` (LLaVA-1.5) and ``jaxmm.models.llava_next`` (LLaVA-NeXT), so that
neither family names the other.

Configuration. :class:`ClipVisionConfig` and :class:`ClipLlamaConfig` mirror transformers'
``configuration_llava.py`` / ``configuration_llava_next.py`` (5.x) with their sub-configs, a CLIP
vision tower (``configuration_clip.py: CLIPVisionConfig``) and a Llama decoder
(``configuration_llama.py: LlamaConfig``). Published LLaVA checkpoints leave most fields to those
classes' defaults (``llava-hf/llava-1.5-7b-hf`` gives no text ``hidden_size``: it is Llama's 4096),
so absent fields take transformers' defaults, the same values: LLaVA's CLIP ViT-L/14-336 when
``vision_config`` is absent, ``CLIPVisionConfig``'s for fields missing from a given one, and
``LlamaConfig``'s for the text fields. The decoder is the shared one
(:mod:`jaxmm.models.core.decoder`) with Llama's switches: no biases, 1-D RoPE, which is M-RoPE with
one section of ``head_dim/2`` frequencies and the same position on all three rows.

Modules (Flax NNX). Mirror ``CLIPVisionTransformer`` (``transformers/models/clip/modeling_clip.py``)
and ``LlavaMultiModalProjector`` (``transformers/models/llava/modeling_llava.py``): Conv2d patch
embedding (as a Linear over flattened patches), a CLS token, learned position embeddings,
``pre_layrnorm``, pre-norm encoder layers (LayerNorm, attention with q/k/v/out biases and no rotary,
LayerNorm, ``fc2(quick_gelu(fc1))``); :func:`clip_features` returns the hidden states of
``vision_feature_layer`` (the penultimate layer by default), without the CLS token with the
"default" strategy, mapped by ``linear_2(gelu(linear_1(·)))`` to the text width.

Letters: n images (or tiles), L = 1 + grid² positions per image, C tower width, E text width.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import flax.nnx as nnx
import jax
import jax.numpy as jnp

from jaxmm.attention import Site, attend
from jaxmm.checkpoint.hf import Rule
from jaxmm.models.core import config as core
from jaxmm.models.core.config import ConfigError, TextConfig, check_fields, read_config_json
from jaxmm.models.core.layers import Embedding, LayerNorm, Linear, in_float32, param
from jaxmm.models.core.params import conv_patch
from jaxmm.models.core.vision import collect

Array = jax.Array

#: transformers' LlamaConfig defaults (configuration_llama.py)
LLAMA_DEFAULTS = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": None,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "attention_bias": False,
    "mlp_bias": False,
    "head_dim": None,
    "tie_word_embeddings": False,
    "eos_token_id": 2,
}
#: LlavaConfig's / LlavaNextConfig's vision sub-config when config.json has none (CLIP ViT-L/14 at 336 px)
LLAVA_VISION = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "patch_size": 14,
    "image_size": 336,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
}
#: CLIPVisionConfig's defaults for fields a given vision_config leaves out
CLIP_DEFAULTS = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 32,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}


# ----------------------------------------------------------------------------- configuration
@dataclasses.dataclass(frozen=True)
class ClipVisionConfig(core.VisionConfig):
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
        """Features the tower gives per image (or tile): grid², plus the CLS token with "full"."""
        return self.grid**2 + (self.vision_feature_select_strategy == "full")

    @property
    def feature_layers(self) -> tuple[int, ...]:
        """``vision_feature_layer`` as non-negative indexes into the depth+1 hidden states."""
        layers = (self.vision_feature_layer,) if isinstance(self.vision_feature_layer, int) else self.vision_feature_layer
        return tuple(i % (self.depth + 1) for i in layers)


@dataclasses.dataclass(frozen=True)
class ClipLlamaConfig(core.VLConfig):
    """A LLaVA-style config (CLIP tower, projector, Llama decoder). A family subclasses it with its
    ``MODEL_TYPE``, its ``VISION_CONFIG`` (a :class:`ClipVisionConfig`) and, for fields of its own
    at the top level of config.json, :meth:`vision_extras`."""

    vision: ClipVisionConfig
    model_type: str = ""
    video_token_id: int = -1  # no video and no vision start/end tokens
    vision_start_token_id: int = -1
    vision_end_token_id: int = -1

    MODEL_TYPE = ""
    VISION_CONFIG = ClipVisionConfig
    VISION_ACTS = ("quick_gelu",)
    VISION_ROTARY = False  # CLIP: learned absolute positions

    def consistency_checks(self) -> list[tuple[bool, str]]:
        """The shared checks (:meth:`~jaxmm.models.core.config.VLConfig.consistency_checks`) plus the
        CLIP tower's: ``image_size`` a multiple of ``patch_size``, ``vision_feature_layer`` within the
        tower's depth, ``vision_feature_select_strategy`` 'default' or 'full', a 'gelu' projector; a
        failing one makes ``__post_init__`` raise :class:`~jaxmm.models.core.config.ConfigError`."""
        v = self.vision
        layers = (v.vision_feature_layer,) if isinstance(v.vision_feature_layer, int) else v.vision_feature_layer
        return super().consistency_checks() + [
            (
                v.image_size % v.patch_size == 0,
                f"vision image_size={v.image_size} is not a multiple of patch_size={v.patch_size}",
            ),
            (
                all(-(v.depth + 1) <= i <= v.depth for i in layers),
                f"vision_feature_layer={v.vision_feature_layer} out of range for {v.depth} vision layers",
            ),
            (
                v.vision_feature_select_strategy in ("default", "full"),
                f"vision_feature_select_strategy={v.vision_feature_select_strategy!r}; expected 'default' or 'full'",
            ),
            (v.projector_hidden_act == "gelu", f"projector_hidden_act={v.projector_hidden_act!r} is not supported ('gelu')"),
        ]

    @classmethod
    def vision_extras(cls, d: dict[str, Any], source: str) -> dict[str, Any]:
        """The family's own :attr:`VISION_CONFIG` fields read from config.json ``d`` (none here)."""
        return {}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> "ClipLlamaConfig":
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
            raise ConfigError(
                f"{source}: text_config.model_type={text['model_type']!r}; jaxmm's {cls.MODEL_TYPE} reads a 'llama' decoder"
            )
        check_fields({k: v for k, v in text.items() if v is not None}, "text_config.", (), source)
        rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ConfigError(
                f"{source}: text_config rope type {rope.get('rope_type', rope.get('type'))!r} is not "
                f"supported (jaxmm implements Llama's default RoPE)"
            )
        theta = rope.get("rope_theta", text.get("rope_theta", 10000.0))
        check_fields({"rope_theta": theta}, "text_config.rope_parameters.", (), source)
        if text["mlp_bias"]:
            raise ConfigError(f"{source}: text_config.mlp_bias=true is not supported")
        heads = text["num_attention_heads"]
        head_dim = text["head_dim"] or text["hidden_size"] // heads
        tcfg = dict(
            vocab_size=text["vocab_size"],
            hidden_size=text["hidden_size"],
            intermediate_size=text["intermediate_size"],
            num_hidden_layers=text["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=text["num_key_value_heads"] or heads,
            rms_norm_eps=float(text["rms_norm_eps"]),
            rope_theta=float(theta),
            mrope_section=(head_dim // 2, 0, 0),
            hidden_act=text["hidden_act"],
            max_position_embeddings=text["max_position_embeddings"],
            head_dim_override=text["head_dim"],
            attention_bias=text["attention_bias"],
            o_proj_bias=text["attention_bias"],
        )
        vis = {**CLIP_DEFAULTS, **(LLAVA_VISION if d.get("vision_config") is None else {}), **(d.get("vision_config") or {})}
        check_fields(vis, "vision_config.", (), source)
        top = {
            k: d[k] for k in ("image_token_index", "image_token_id", "tie_word_embeddings", "multimodal_projector_bias") if k in d
        }
        check_fields(top, "", (), source)
        layer = d.get("vision_feature_layer", -2)
        if not (core.is_int(layer) or (isinstance(layer, list) and layer and all(core.is_int(i) for i in layer))):
            raise ConfigError(
                f"{source}: field 'vision_feature_layer' must be an integer or a list of integers, "
                f"got {type(layer).__name__} {layer!r}"
            )
        vcfg = dict(
            depth=vis["num_hidden_layers"],
            hidden_size=vis["hidden_size"],
            intermediate_size=vis["intermediate_size"],
            num_heads=vis["num_attention_heads"],
            in_channels=vis["num_channels"],
            patch_size=vis["patch_size"],
            image_size=vis["image_size"],
            spatial_merge_size=1,
            temporal_patch_size=1,
            out_hidden_size=text["hidden_size"],
            hidden_act=vis["hidden_act"],
            layer_norm_eps=float(vis["layer_norm_eps"]),
            vision_feature_layer=layer if isinstance(layer, int) else tuple(layer),
            vision_feature_select_strategy=d.get("vision_feature_select_strategy", "default"),
            projector_hidden_act=d.get("projector_hidden_act", "gelu"),
            multimodal_projector_bias=bool(d.get("multimodal_projector_bias", True)),
            **cls.vision_extras(d, source),
        )
        eos = text.get("eos_token_id")
        eos = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
        tie = d.get("tie_word_embeddings", False) or text.get("tie_word_embeddings", False)
        image_token = d.get("image_token_index", d.get("image_token_id", 32000))
        try:
            return cls(
                vision=cls.VISION_CONFIG(**vcfg),
                text=TextConfig(**tcfg),
                image_token_id=int(image_token),
                tie_word_embeddings=bool(tie),
                eos_token_id=eos,
                model_type=cls.MODEL_TYPE,
            )
        except ConfigError as e:
            raise ConfigError(f"{source}: {str(e).removeprefix('config.json: ')}") from None

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ClipLlamaConfig":
        """Reads ``<path>/config.json`` (or ``path`` itself if it is a file); errors as :meth:`from_dict`."""
        p = Path(path)
        f = p / "config.json" if p.is_dir() else p
        return cls.from_dict(read_config_json(f), source=str(f))


# ----------------------------------------------------------------------------- modules
class ClipAttention(nnx.Module):
    """``CLIPAttention``: full attention over each image's L positions."""

    def __init__(self, cfg: ClipVisionConfig, dtype):
        c = cfg.hidden_size
        self.num_heads = cfg.num_heads
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(self, name, Linear(c, c, bias=True, dtype=dtype, names=("embed", "heads")))
        self.out_proj = Linear(c, c, bias=True, dtype=dtype, names=("heads", "embed"))

    def __call__(self, x: Array, site: Site, interventions, probes):
        """x [n,L,C] -> (output [n,L,C], probe results)."""
        n, length, c = x.shape
        d = c // self.num_heads
        q = self.q_proj(x).reshape(n, length, self.num_heads, d)
        k = self.k_proj(x).reshape(n, length, self.num_heads, d)
        v = self.v_proj(x).reshape(n, length, self.num_heads, d)
        site = dataclasses.replace(site, q_pre=q, k_pre=k)
        out, res = attend(q, k, v, site=site, mask=None, scale=d**-0.5, interventions=interventions, probes=probes)
        return self.out_proj(out.reshape(n, length, c)), res


class ClipMlp(nnx.Module):
    """``CLIPMLP``: ``fc2(quick_gelu(fc1(x)))``."""

    def __init__(self, cfg: ClipVisionConfig, dtype):
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, bias=True, dtype=dtype, names=("embed", "mlp"))
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, bias=True, dtype=dtype, names=("mlp", "embed"))

    def __call__(self, x: Array) -> Array:
        return self.fc2(in_float32(lambda h: h * jax.nn.sigmoid(1.702 * h))(self.fc1(x)))


class ClipEncoderLayer(nnx.Module):
    """``CLIPEncoderLayer``: ``x + attn(layer_norm1(x))``, then ``+ mlp(layer_norm2(·))``."""

    def __init__(self, cfg: ClipVisionConfig, dtype):
        self.layer_norm1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype=dtype)
        self.self_attn = ClipAttention(cfg, dtype)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype=dtype)
        self.mlp = ClipMlp(cfg, dtype)

    def __call__(self, x, site, interventions, probes):
        h, res = self.self_attn(self.layer_norm1(x), site, interventions, probes)
        x = x + h
        return x + self.mlp(self.layer_norm2(x)), res


class ClipEmbeddings(nnx.Module):
    """``CLIPVisionEmbeddings``: patches, CLS token and position embeddings (no interpolation: the
    image must be ``image_size`` pixels square, as the processor makes it)."""

    def __init__(self, cfg: ClipVisionConfig, dtype):
        self.cfg = cfg
        self.class_embedding = param((cfg.hidden_size,), dtype, ("embed",))
        patch_dim = cfg.in_channels * cfg.patch_size**2
        self.patch_embedding = Linear(patch_dim, cfg.hidden_size, bias=False, dtype=dtype, names=(None, "embed"))
        self.position_embedding = Embedding(cfg.grid**2 + 1, cfg.hidden_size, dtype, names=(None, "embed"))

    def __call__(self, pixel_values: Array) -> Array:
        """pixel_values [n, C_in, S, S] -> [n, L, C]."""
        cfg = self.cfg
        n, ch = pixel_values.shape[:2]
        g, p = cfg.grid, cfg.patch_size
        x = pixel_values.reshape(n, ch, g, p, g, p).transpose(0, 2, 4, 1, 3, 5).reshape(n, g * g, ch * p * p)
        x = self.patch_embedding(x.astype(self.patch_embedding.kernel.dtype))
        cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (n, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1)
        return x + self.position_embedding.weight[...].astype(x.dtype)[None]


class VisionModel(nnx.Module):
    """``CLIPVisionTransformer`` (``vision_model``): embeddings, ``pre_layrnorm``, encoder layers,
    ``post_layernorm`` (loaded with the checkpoint; LLaVA's features do not use it)."""

    def __init__(self, cfg: ClipVisionConfig, dtype):
        self.embeddings = ClipEmbeddings(cfg, dtype)
        self.pre_layrnorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype=dtype)
        self.layers = nnx.List([ClipEncoderLayer(cfg, dtype) for _ in range(cfg.depth)])
        self.post_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype=dtype)


class Projector(nnx.Module):
    """``LlavaMultiModalProjector``: ``linear_2(gelu(linear_1(x)))``."""

    def __init__(self, cfg: ClipVisionConfig, dtype):
        din = cfg.hidden_size * len(cfg.feature_layers)
        bias = cfg.multimodal_projector_bias
        self.linear_1 = Linear(din, cfg.out_hidden_size, bias=bias, dtype=dtype, names=(None, "embed"))
        self.linear_2 = Linear(cfg.out_hidden_size, cfg.out_hidden_size, bias=bias, dtype=dtype, names=("mlp", "embed"))

    def __call__(self, x: Array) -> Array:
        return self.linear_2(in_float32(lambda h: jax.nn.gelu(h, approximate=False))(self.linear_1(x)))


def clip_features(
    cfg: ClipVisionConfig, vision_model: VisionModel, projector: Projector, pixel_values: Array, interventions=(), probes=()
) -> tuple[Array, dict]:
    """``LlavaModel.get_image_features`` up to the projector: runs the layers up to the deepest
    feature layer (probes see each layer's attention with the images as the batch), selects
    ``vision_feature_layer`` (CLS dropped with "default"), projects.

    pixel_values [n, C_in, S, S] -> (features [n, tokens_per_image, E], probe results per layer).
    """
    vm = vision_model
    x = vm.pre_layrnorm(vm.embeddings(pixel_values))
    hidden, results = [x], {}
    for i in range(max(cfg.feature_layers)):
        x, res = vm.layers[i](x, Site("vision", i), interventions, probes)
        collect(results, res, i)
        hidden.append(x)
    feats = [hidden[i] if cfg.vision_feature_select_strategy == "full" else hidden[i][:, 1:] for i in cfg.feature_layers]
    return projector(jnp.concatenate(feats, axis=-1)), results


# ----------------------------------------------------------------------------- checkpoint keys
def clip_key_rules(vision: str, projector: str, text: str) -> tuple[Rule, ...]:
    """Key rules of the CLIP tower (``vision`` regex prefix), the projector (``projector``), the
    Llama decoder (``text``) and the lm head, onto ``visual.vision_model.*``,
    ``visual.multi_modal_projector.*``, ``language_model.*`` and ``lm_head``."""
    v, p, t, vis = vision, projector, text, "visual.vision_model."
    return (
        Rule(v + r"embeddings\.class_embedding", vis + "embeddings.class_embedding"),
        Rule(v + r"embeddings\.patch_embedding\.weight", vis + "embeddings.patch_embedding.kernel", conv_patch),
        Rule(v + r"embeddings\.position_embedding\.weight", vis + "embeddings.position_embedding.weight"),
        Rule(v + r"(pre_layrnorm|post_layernorm)\.(weight|bias)", vis + r"\1.\2"),
        Rule(v + r"encoder\.layers\.(\d+)\.(layer_norm1|layer_norm2)\.(weight|bias)", vis + r"layers.\1.\2.\3"),
        Rule(
            v + r"encoder\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|out_proj)\.weight",
            vis + r"layers.\1.self_attn.\2.kernel",
            "T",
        ),
        Rule(
            v + r"encoder\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|out_proj)\.bias", vis + r"layers.\1.self_attn.\2.bias"
        ),
        Rule(v + r"encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)\.weight", vis + r"layers.\1.mlp.\2.kernel", "T"),
        Rule(v + r"encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)\.bias", vis + r"layers.\1.mlp.\2.bias"),
        Rule(p + r"(linear_1|linear_2)\.weight", r"visual.multi_modal_projector.\1.kernel", "T"),
        Rule(p + r"(linear_1|linear_2)\.bias", r"visual.multi_modal_projector.\1.bias"),
        Rule(t + r"embed_tokens\.weight", "language_model.embed_tokens.weight"),
        Rule(t + r"layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight", r"language_model.layers.\1.\2.weight"),
        Rule(
            t + r"layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|o_proj)\.weight",
            r"language_model.layers.\1.self_attn.\2.kernel",
            "T",
        ),
        Rule(t + r"layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|o_proj)\.bias", r"language_model.layers.\1.self_attn.\2.bias"),
        Rule(t + r"layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight", r"language_model.layers.\1.mlp.\2.kernel", "T"),
        Rule(t + r"norm\.weight", "language_model.norm.weight"),
        Rule(r"(?:language_model\.)?lm_head\.weight", "lm_head.kernel", "T"),
    )
