"""Typed model configuration read from a Hugging Face ``config.json``: what every family shares.

:class:`TextConfig` (the shared decoder), :class:`VisionConfig` (the fields every Qwen-style tower
has; a family's ``config.py`` subclasses it with its own) and :class:`VLConfig`, whose
:meth:`~VLConfig.from_dict` reads either layout of ``config.json`` for the family subclass it is
called on (its ``MODEL_TYPE``, required fields, transformers' defaults and field-name hooks):

* published checkpoints (transformers 4.x): text fields at the top level, RoPE under
  ``rope_scaling = {"type": "mrope", "mrope_section": [...]}`` and ``rope_theta``;
* transformers 5: text fields under ``text_config`` with ``rope_parameters``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from jaxmm.config import ConfigError, read_json  # ConfigError re-exported: one error type for every bad config


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """Fields of every Qwen-style vision tower (transformers' ``vision_config``): ``hidden_size`` is the
    tower's width, ``out_hidden_size`` the merger's output width (= the text width)."""

    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    tokens_per_second: int = 2
    out_hidden_size: int = 3584
    hidden_act: str = "silu"
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        """Width of one attention head of the vision tower: ``hidden_size // num_heads``."""
        return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The shared decoder's fields (transformers' ``text_config``); the switches at the end select
    each family's variant of the decoder (q/k/v biases, per-head q/k RMSNorm, M-RoPE layout)."""

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: tuple[int, ...] = (16, 24, 24)
    hidden_act: str = "silu"
    max_position_embeddings: int = 128000
    head_dim_override: int | None = None  # an explicit head_dim (else hidden_size / heads)
    attention_bias: bool = True  # q/k/v biases
    o_proj_bias: bool = False  # a bias on the output projection
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE
    mrope_interleaved: bool = False  # T/H/W sections interleaved over frequencies (else contiguous)

    @property
    def head_dim(self) -> int:
        """Width of one decoder attention head: ``head_dim_override`` (config.json's ``head_dim``)
        when given, else ``hidden_size // num_attention_heads``."""
        return self.head_dim_override or self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class VLConfig:
    """A vision-language model: ``vision`` and ``text`` sections and the special token ids.

    Family subclasses (a frozen dataclass each, re-declaring ``vision`` with the family's
    VisionConfig and ``model_type`` with its name) set the class attributes below: ``MODEL_TYPE``,
    ``VISION_CONFIG``, the required fields and transformers' defaults, the field-name hooks
    :meth:`vision_fields` / :meth:`text_fields` and :meth:`consistency_checks`.

    Raises (on construction):
        ConfigError: inconsistent values (``config.json: <what>``).
    """

    vision: VisionConfig
    text: TextConfig
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    tie_word_embeddings: bool = False
    eos_token_id: tuple[int, ...] = ()
    model_type: str = ""

    def __post_init__(self):
        for ok, msg in self.consistency_checks():
            if not ok:
                raise ConfigError(f"config.json: {msg}")

    def consistency_checks(self) -> list[tuple[bool, str]]:
        """``(holds, message)`` pairs; a family adds its own to these."""
        v, t = self.vision, self.text
        return [
            (
                t.head_dim_override or t.hidden_size % t.num_attention_heads == 0,
                f"text hidden_size={t.hidden_size} is not divisible by num_attention_heads={t.num_attention_heads}",
            ),
            (
                t.num_attention_heads % t.num_key_value_heads == 0,
                f"num_attention_heads={t.num_attention_heads} is not a multiple of num_key_value_heads={t.num_key_value_heads}",
            ),
            (
                2 * sum(t.mrope_section) == t.head_dim or t.mrope_interleaved,
                f"mrope_section={list(t.mrope_section)} sums to {sum(t.mrope_section)}, expected head_dim/2={t.head_dim // 2}",
            ),
            (v.hidden_size % v.num_heads == 0, f"vision hidden_size={v.hidden_size} is not divisible by num_heads={v.num_heads}"),
            (not self.VISION_ROTARY or v.head_dim % 4 == 0, f"vision head_dim={v.head_dim} must be a multiple of 4 (2-D rotary)"),
            (
                v.out_hidden_size == t.hidden_size,
                f"vision out_hidden_size={v.out_hidden_size} differs from text hidden_size={t.hidden_size}",
            ),
            (
                v.hidden_act in self.VISION_ACTS and t.hidden_act == "silu",
                f"unsupported hidden_act (vision={v.hidden_act!r}, text={t.hidden_act!r})",
            ),
        ]

    MODEL_TYPE = ""
    VISION_CONFIG = VisionConfig
    VISION_ACTS = ("silu",)
    VISION_ROTARY = True  # the tower's attention has 2-D rotary (head_dim a multiple of 4)

    #: Fields a checkpoint's config.json must give (``transformers`` writes them all): the sizes that
    #: shape the weights. transformers' class defaults for them describe one particular model (the
    #: 72B text tower, for instance), so filling them in would build a different model than the weights.
    REQUIRED_TEXT = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
    )
    REQUIRED_VISION = ("depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size")
    #: Every other field, when absent, takes transformers' default (the family's configuration file).
    TEXT_DEFAULTS = {}
    VISION_DEFAULTS = {}

    @staticmethod
    def vision_fields(vis: dict) -> dict:
        """Family hook: the vision_config dict in this family's field names -> VisionConfig's."""
        return vis

    @staticmethod
    def text_fields(text: dict) -> dict:
        """Family hook: the text fields in this family's names -> TextConfig's."""
        return text

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> "VLConfig":
        """Builds the config from a parsed ``config.json`` (either layout, see module doc).

        Fields in :attr:`REQUIRED_TEXT` / :attr:`REQUIRED_VISION` must be present; the others take
        transformers' defaults (:attr:`TEXT_DEFAULTS`, :attr:`VISION_DEFAULTS`).

        Raises:
            ConfigError: naming ``source`` and the field (e.g. ``text_config.hidden_size``): a missing
                required field, a value of the wrong type (with the expected type and the value), a
                non-positive size, a ``model_type`` of another family, or inconsistent values.
        """
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        model_type = d.get("model_type")
        if model_type not in (None, cls.MODEL_TYPE):
            raise ConfigError(f"{source}: model_type={model_type!r}; {cls.__name__} reads {cls.MODEL_TYPE!r}")
        if "vision_config" not in d:
            raise ConfigError(f"{source}: missing field 'vision_config'")
        for key in ("vision_config", "text_config"):
            if d.get(key) is not None and not isinstance(d[key], dict):
                raise ConfigError(f"{source}: field {key!r} must be an object, got {type(d[key]).__name__} {d[key]!r}")
        text = dict(d.get("text_config") or {})
        prefix = "text_config." if d.get("text_config") else ""
        # Legacy layout: text fields live at the top level.
        for name in {f.name for f in dataclasses.fields(TextConfig)} | {"head_dim", "attention_bias"}:
            if name not in text and name in d:
                text[name] = d[name]
        check_fields(text, prefix, cls.REQUIRED_TEXT, source)
        check_fields(d["vision_config"], "vision_config.", cls.REQUIRED_VISION, source)
        check_fields({k: d[k] for k in (*_TOP_INT, "tie_word_embeddings") if k in d}, "", (), source)
        for name, value in cls.TEXT_DEFAULTS.items():
            if name != "rope_theta":
                text.setdefault(name, value)
        text = cls.text_fields(text)
        rope = dict(text.get("rope_parameters") or d.get("rope_parameters") or {})
        legacy_rope = text.get("rope_scaling") or d.get("rope_scaling") or {}
        rope = {**legacy_rope, **rope}
        if "rope_theta" not in rope:
            rope["rope_theta"] = text.get("rope_theta", d.get("rope_theta", cls.TEXT_DEFAULTS["rope_theta"]))
        check_fields({k: rope[k] for k in ("rope_theta", "mrope_section") if k in rope}, prefix + "rope_parameters.", (), source)
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", "mrope"):
            raise ConfigError(f"{source}: rope type {rope.get('rope_type', rope.get('type'))!r} is not supported")
        text_kwargs = {f.name: text[f.name] for f in dataclasses.fields(TextConfig) if f.name in text}
        text_kwargs["rope_theta"] = float(rope["rope_theta"])
        if "mrope_section" in rope:
            text_kwargs["mrope_section"] = tuple(int(x) for x in rope["mrope_section"])
        if text_kwargs.get("num_key_value_heads") is None:  # an explicit null: MHA, as transformers
            text_kwargs["num_key_value_heads"] = text_kwargs["num_attention_heads"]

        vis = dict(d["vision_config"])
        for name, value in cls.VISION_DEFAULTS.items():
            vis.setdefault(name, value)
        vis = cls.vision_fields(vis)
        if "in_chans" in vis and "in_channels" not in vis:
            vis["in_channels"] = vis["in_chans"]
        vrope = vis.get("rope_parameters") or {}
        vis_kwargs = {f.name: vis[f.name] for f in dataclasses.fields(cls.VISION_CONFIG) if f.name in vis}
        if "rope_theta" in vrope:
            vis_kwargs["rope_theta"] = float(vrope["rope_theta"])
        for key, value in vis_kwargs.items():  # lists of block indexes (checked above)
            if isinstance(value, (list, tuple)):
                vis_kwargs[key] = tuple(int(i) for i in value)

        eos = text.get("eos_token_id", d.get("eos_token_id"))
        if not (eos is None or is_int(eos) or (isinstance(eos, (list, tuple)) and all(is_int(e) for e in eos))):
            raise ConfigError(
                f"{source}: field '{prefix}eos_token_id' must be an integer or a list of "
                f"integers, got {type(eos).__name__} {eos!r}"
            )
        eos = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
        top = {k: d[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id") if k in d}
        tie = d.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
        try:
            return cls(
                vision=cls.VISION_CONFIG(**vis_kwargs),
                text=TextConfig(**text_kwargs),
                tie_word_embeddings=bool(tie),
                eos_token_id=eos,
                model_type=cls.MODEL_TYPE,
                **top,
            )
        except TypeError as e:  # wrong types inside the json
            raise ConfigError(f"{source}: {e}") from e
        except ConfigError as e:  # inconsistent values (__post_init__): name the file they came from
            raise ConfigError(f"{source}: {str(e).removeprefix('config.json: ')}") from None

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "VLConfig":
        """Reads ``<path>/config.json`` (or ``path`` itself if it is a file).

        Raises:
            FileNotFoundError: no config.json.
            ConfigError: the file is not valid JSON (names the file, line and column), or any
                :meth:`from_dict` error.
        """
        p = Path(path)
        f = p / "config.json" if p.is_dir() else p
        return cls.from_dict(read_config_json(f), source=str(f))


def read_config_json(f: str | Path) -> dict:
    """The parsed JSON object of a checkpoint's ``config.json``.

    Raises:
        FileNotFoundError: ``f`` does not exist.
        ConfigError: not valid JSON (names the file and the JSON problem), or not a JSON object.
    """
    f = Path(f)
    if not f.is_file():
        raise FileNotFoundError(f"{f}: no such file (is {f.parent} a Hugging Face checkpoint directory?)")
    return read_json(f)


# ----------------------------------------------------------------------------- field checks
_INT = {
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "head_dim",
    "depth",
    "num_heads",
    "in_channels",
    "in_chans",
    "patch_size",
    "spatial_merge_size",
    "temporal_patch_size",
    "tokens_per_second",
    "window_size",
    "out_hidden_size",
    "embed_dim",
    "num_position_embeddings",
    "image_size",
    "num_channels",
}
_TOP_INT = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id", "image_token_index")
_FLOAT = {"rms_norm_eps", "rope_theta", "mlp_ratio", "layer_norm_eps"}
_BOOL = {"attention_bias", "tie_word_embeddings", "mlp_bias", "multimodal_projector_bias"}
_INT_LIST = {"fullatt_block_indexes", "deepstack_visual_indexes", "mrope_section"}
_NULLABLE = {"num_key_value_heads"}


def is_int(v) -> bool:
    """An int that is not a bool (JSON integers)."""
    return isinstance(v, int) and not isinstance(v, bool)


def check_fields(d: dict, prefix: str, required: tuple, source: str) -> None:
    """Required fields present; known fields of the right JSON type (sizes positive).

    Raises:
        ConfigError: naming ``source`` and the field ``prefix + name``, the expected type and the value.
    """
    for name in required:
        if name not in d:
            raise ConfigError(
                f"{source}: missing field '{prefix}{name}' (it sets the shapes of the weights; no default is assumed)"
            )
    for name, v in d.items():
        where = f"{source}: field '{prefix}{name}'"
        if v is None and name in _NULLABLE:
            continue
        if name in _INT or name in _TOP_INT:
            if not is_int(v):
                raise ConfigError(f"{where} must be an integer, got {type(v).__name__} {v!r}")
            if name in _INT and v <= 0:
                raise ConfigError(f"{where} must be positive, got {v!r}")
        elif name in _FLOAT:
            if not (is_int(v) or isinstance(v, float)):
                hint = ""
                if isinstance(v, str):
                    try:
                        float(v)
                        hint = " (in YAML write 1.0e-06, not 1e-06, which YAML 1.1 reads as a string)"
                    except ValueError:
                        pass
                raise ConfigError(f"{where} must be a number, got {type(v).__name__} {v!r}{hint}")
        elif name in _BOOL:
            if not isinstance(v, bool):
                raise ConfigError(f"{where} must be true or false, got {type(v).__name__} {v!r}")
        elif name in _INT_LIST:
            if not isinstance(v, (list, tuple)) or not all(is_int(x) and x >= 0 for x in v):
                raise ConfigError(f"{where} must be a list of non-negative integers, got {type(v).__name__} {v!r}")
        elif name == "hidden_act" and not isinstance(v, str):
            raise ConfigError(f"{where} must be a string, got {type(v).__name__} {v!r}")
