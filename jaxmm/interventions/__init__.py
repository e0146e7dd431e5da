"""Interventions on the attention seam, one method per file, selectable by name or config.

    from jaxmm import interventions as I
    ivs = I.build(["vrga", {"method": "avar", "alpha_sys": 0.05}], model.config)
    model.generate(messages, interventions=ivs)

Names: ``pai``, ``avar``, ``ration``, ``vrga``, ``var``, ``rave`` (a trained module:
``{"method": "rave", "path": DIR}``; see docs/methods.md), plus the building
blocks ``KeyLogitShift``, ``KeyWeightScale``, ``KeyBias``, ``HeadMask``. YAML configs with every
knob and its default live in ``configs/methods/``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional, Union

from typing_extensions import TypedDict

from jaxmm.config import Float, Int
from jaxmm.interventions.avar import AVAR
from jaxmm.interventions.keys import KeyBias, KeyLogitShift, KeyWeightScale, key_set, per_sample
from jaxmm.interventions.pai import PAI, decoding_contrast, pai, pai_contrast
from jaxmm.interventions.ration import RATION
from jaxmm.interventions.rave import RAVE
from jaxmm.interventions.var import VAR, var
from jaxmm.interventions.vrga import VRGA, HeadMask, efr_head_mask

__all__ = [
    "AVAR",
    "PAI",
    "RATION",
    "RAVE",
    "VRGA",
    "VAR",
    "HeadMask",
    "KeyBias",
    "KeyLogitShift",
    "KeyWeightScale",
    "build",
    "check_ranges",
    "decoding_contrast",
    "efr_head_mask",
    "key_set",
    "pai",
    "pai_contrast",
    "per_sample",
    "var",
    "METHODS",
]


class LayerRange(TypedDict, total=False):
    """``{start, end}``: layers start … end−1 (``end`` None = the last)."""

    start: Int
    end: Optional[Int]


Layers = Union[list[Int], LayerRange, None]  # None = every layer


def _layers(cfg, spec):
    """``None`` (all), a list of indices, or ``{"start": a, "end": b}`` -> static tuple or None."""
    n = cfg.text.num_hidden_layers
    if spec is None:
        return None
    if isinstance(spec, dict):
        return tuple(range(spec.get("start", 0), min(spec.get("end") or n, n)))
    return tuple(int(i) for i in spec)


def _pai(
    cfg,
    alpha: Float = 0.2,
    start: Int = 2,
    end: Optional[Int] = None,
    variant: str = "paper",
    use_cfg: bool = False,
    gamma: Optional[Float] = None,
):
    """``gamma``: also decode with the contrast against a text-only pass at γ (eval, Model.generate)."""
    return pai(cfg.text.num_hidden_layers, alpha, start, end, variant, use_cfg, gamma)


def _avar(
    cfg,
    alpha_img: Float = 0.15,
    alpha_sys: Float = 0.0,
    on: str = "logits",
    renormalize: bool = False,
    layers: Layers = None,
    variant: str = "paper",
):
    return AVAR(
        alpha_img=alpha_img, alpha_sys=alpha_sys, on=on, renormalize=renormalize, layers=_layers(cfg, layers), variant=variant
    )


def _ration(
    cfg,
    top_k: Int = 4,
    d_a: Optional[Float] = None,
    d_b: Optional[Float] = None,
    thresholds: tuple[Float, Float, Float] = (0.0, 0.0, 0.0),
    key_layers: Optional[list[Int]] = None,
    variant: str = "paper",
):
    """d_a, d_b default to 0.8, 1.2 (paper) or the lmms-eval wrapper's 1.0, 1.0 (released)."""
    d_a = d_a if d_a is not None else (1.0 if variant == "released" else 0.8)
    d_b = d_b if d_b is not None else (1.0 if variant == "released" else 1.2)
    return RATION(
        num_layers=cfg.text.num_hidden_layers,
        top_k=top_k,
        d_a=d_a,
        d_b=d_b,
        thresholds=tuple(thresholds),
        key_layers=None if key_layers is None else tuple(key_layers),
        variant=variant,
    )


def _vrga(
    cfg,
    factor: Float = 1.5,
    fa: Int = 1,
    border_frac: Float = 0.2,
    min_focus: Int = 10,
    background_heads: Int = 64,
    variant: str = "paper",
    head_mask: Optional[str] = None,
    head_mask_topk: Int = 5,
    head_mask_after: Int = 5,
    head_mask_seed: Int = 0,
):
    return VRGA(
        factor=factor,
        fa=fa,
        border_frac=border_frac,
        min_focus=min_focus,
        background_heads=background_heads,
        variant=variant,
        head_mask=head_mask,
        head_mask_topk=head_mask_topk,
        head_mask_after=head_mask_after,
        head_mask_seed=head_mask_seed,
    )


def _var(
    cfg,
    dims: list[Int] = (),
    tau: Float = 20.0,
    p: Float = 0.6,
    min_mass: Float = 0.2,
    max_share: Float = 0.5,
    start: Int = 2,
    variant: str = "paper",
):
    return VAR(
        dims=tuple(dims),
        tau=tau,
        p=p,
        min_mass=min_mass,
        max_share=max_share,
        layers=tuple(range(start, cfg.text.num_hidden_layers)),
        variant=variant,
    )


def _rave(cfg, path: Optional[str] = None, **init):
    """A trained RAVE module saved with :func:`jaxmm.interventions.rave.save` (``path``), or a fresh
    one (γ = 0: the model unchanged) from ``init``'s knobs."""
    from jaxmm.interventions import rave

    if path is not None:
        if init:
            raise TypeError(f"rave: give either path or init knobs, not both ({sorted(init)})")
        return rave.load(path)
    return rave.init(cfg, **init)


METHODS = {"pai": _pai, "avar": _avar, "ration": _ration, "vrga": _vrga, "var": _var, "rave": _rave}


def build(specs, config) -> tuple:
    """Interventions from names, ``NAME:knob=value,...`` strings (YAML values: ``ration:key_layers=[3,5]``),
    dicts (``{"method": name, knob: value}``), YAML paths or ready intervention objects, in order
    (they compose in that order).

    Raises:
        ValueError: an unknown method name or knob, or a knob value of the wrong type, naming the
            spec, the knob and the value (see :func:`parse`).
    """
    if isinstance(specs, (str, dict)) or hasattr(specs, "applies"):
        specs = [specs]
    out = []
    for spec in specs:
        if hasattr(spec, "applies"):
            out.append(spec)
            continue
        name, kw = parse(spec)
        check_ranges(name, kw, config, spec)
        try:
            out.append(METHODS[name](config, **kw))
        except TypeError as e:
            raise ValueError(f"method {name!r}: {e}") from None
    return tuple(out)


def _ranges(n_layers: int, hidden: int) -> dict:
    """Each method's knob -> (test, what is allowed), from the papers' formulas: strengths and
    fractions where the formula needs them, layer indices within the model's ``n_layers``."""
    layer = (lambda v: 0 <= v < n_layers, f"a layer index in 0 … {n_layers - 1}")
    layers = (lambda v: all(0 <= i < n_layers for i in v), f"layer indices in 0 … {n_layers - 1}")
    nonneg = (lambda v: v >= 0, ">= 0")
    positive = (lambda v: v > 0, "> 0")
    unit = (lambda v: 0 <= v <= 1, "in [0, 1]")
    return {
        "pai": {
            "alpha": nonneg,
            "start": layer,
            "end": (lambda v: v is None or 0 < v <= n_layers, f"null or 1 … {n_layers}"),
            "gamma": (lambda v: v is None or v > 0, "null or > 0"),
        },
        "avar": {
            "alpha_img": nonneg,
            "alpha_sys": nonneg,
            "layers": (lambda v: v is None or isinstance(v, dict) or layers[0](v), layers[1]),
        },
        "ration": {
            "top_k": (lambda v: v >= 1, ">= 1 (more than the model's layers: all of them)"),
            "d_a": (lambda v: v is None or v > 0, "null or > 0"),
            "d_b": (lambda v: v is None or v > 0, "null or > 0"),
            "key_layers": (lambda v: v is None or layers[0](v), layers[1]),
        },
        "vrga": {
            "factor": positive,
            "fa": (lambda v: v in (1, 2), "1 or 2"),
            "border_frac": (lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
            "min_focus": (lambda v: v >= 1, ">= 1"),
            "background_heads": nonneg,
            "head_mask_topk": (lambda v: v >= 1, ">= 1"),
            "head_mask_after": (lambda v: v >= -1, ">= -1 (masks the layers above it)"),
        },
        "var": {
            "tau": positive,
            "p": unit,
            "min_mass": unit,
            "max_share": unit,
            "start": layer,
            "dims": (lambda v: all(0 <= d < hidden for d in v), f"hidden dimensions in 0 … {hidden - 1}"),
        },
    }


def check_ranges(name: str, knobs: dict, config, spec=None) -> None:
    """Checks a method's knob values against the ranges its formula allows, for ``config``'s model
    (layer indices below its ``num_hidden_layers``, VAR's sink dimensions below its ``hidden_size``).

    Raises:
        ValueError: a value out of range; the message names the method spec, the knob, the value and
            the allowed range.
    """
    rules = _ranges(config.text.num_hidden_layers, config.text.hidden_size).get(name, {})
    for k, v in knobs.items():
        if k in rules and not rules[k][0](v):
            raise ValueError(
                f"method {str(spec if spec is not None else name)!r}: {k}={v!r} is out of range; "
                f"expected {rules[k][1]} (model with {config.text.num_hidden_layers} layers)"
            )


def parse(spec) -> tuple[str, dict]:
    """A method spec (a name, ``NAME:knob=value,...``, a ``{"method": name, ...}`` dict or a YAML
    file's path) -> ``(name, knobs)``, each knob checked against the method's signature (its type:
    ``"1e-3"`` reads as a float, a list as a list). Needs no model.

    Raises:
        ValueError: an unreadable YAML file, a malformed ``knob=value``, an unknown method or knob,
            or a value of the wrong type; the message names the spec, the knob and the value.
    """
    import yaml

    from jaxmm.config import ConfigError, read_yaml, validate

    shown = spec
    if isinstance(spec, (str, Path)) and str(spec).endswith((".yaml", ".yml")):
        spec, _ = read_yaml(spec)
    if isinstance(spec, str):
        name, _, rest = spec.partition(":")
        kw = {}
        for part in _split(rest):
            k, eq, v = part.partition("=")
            if not eq or not k.strip():
                raise ValueError(f"method {shown!r}: {part!r} is not knob=value")
            try:
                kw[k.strip()] = yaml.safe_load(v)
            except yaml.YAMLError as e:
                raise ValueError(
                    f"method {shown!r}: {k.strip()}={v!r} is not a valid YAML value ({getattr(e, 'problem', None) or e})"
                ) from None
    elif isinstance(spec, dict):
        kw = dict(spec)
        name = kw.pop("method", None)
    else:
        raise ValueError(f"method spec {spec!r}: expected a name, NAME:knob=value,..., a mapping with 'method', or a YAML file")
    if name not in METHODS:
        raise ValueError(f"method {shown!r}: unknown method {name!r}; known: {sorted(METHODS)}")
    try:
        checked = validate(_knobs(name), kw, f"method {str(shown)!r}")
    except ConfigError as e:
        raise ValueError(str(e).replace("unknown field", "unknown knob")) from None
    return name, {**kw, **checked.model_dump(exclude_unset=True)}


def _split(rest: str) -> list[str]:
    """``"a=1,b=[2,3]"`` -> ``["a=1", "b=[2,3]"]``: commas inside brackets or braces stay."""
    parts, depth, cur = [], 0, ""
    for ch in rest:
        depth += ch in "[{("
        depth -= ch in "]})"
        if ch == "," and depth <= 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p for p in parts if p.strip()]


@functools.cache
def _knobs(name: str):
    """A pydantic model of method ``name``'s knobs: its factory's keyword arguments, their
    annotations and defaults (a factory taking ``**init`` also accepts other knobs)."""
    import inspect
    import typing

    import pydantic

    fn = METHODS[name]
    hints = typing.get_type_hints(fn, include_extras=True)
    params = list(inspect.signature(fn).parameters.values())[1:]
    fields = {
        p.name: (hints.get(p.name, typing.Any), p.default) for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }
    extra = "allow" if any(p.kind is p.VAR_KEYWORD for p in params) else "forbid"
    return pydantic.create_model(f"{name}_knobs", __config__=pydantic.ConfigDict(extra=extra), **fields)
