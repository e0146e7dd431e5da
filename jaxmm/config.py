"""One loader for jaxmm's YAML configs (``jaxmm eval``, ``jaxmm train``, ``jaxmm grpo``).

    cfg = load(EvalConfig, "run.yaml", ["batch_size=4", "benchmarks.0.limit=8"])

:func:`load` reads the YAML file, applies ``key=value`` overrides (dotted keys, YAML values), then
validates the result against the config dataclass with pydantic (the dataclass's annotations are
the schema: types, ``Literal`` choices, ranges, nested ``TypedDict`` sections) and builds it. Every
bad input raises :class:`ConfigError`, a ``ValueError`` whose message is one line naming the
culprit: the file and line (``run.yaml:3: batch_size: expected a valid integer, …, got 'eight'``) or
the override (``override 'max_new_tokens=-3': max_new_tokens: expected a number > 0, got -3``).

The annotations below (``PosInt``, ``Mesh``, …) are the building blocks the configs use. YAML 1.1
reads ``3e-4`` as a string; a ``float`` field accepts it as the number it spells.
"""

from __future__ import annotations

import contextvars
import copy
import dataclasses
import functools
import math
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Sequence

import pydantic
from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field
from typing_extensions import TypedDict, is_typeddict

from jaxmm.data.grounded import TASKS


class ConfigError(ValueError):
    """A bad config (a YAML config, an override, a field value, a checkpoint's config.json); the
    message names it, on one line."""


def _not_bool(v):
    if isinstance(v, bool):
        raise ValueError("expected a number, not a boolean")
    return v


Int = Annotated[int, BeforeValidator(_not_bool)]
PosInt = Annotated[int, BeforeValidator(_not_bool), Field(gt=0)]
NonNegInt = Annotated[int, BeforeValidator(_not_bool), Field(ge=0)]
Float = Annotated[float, BeforeValidator(_not_bool)]
PosFloat = Annotated[float, BeforeValidator(_not_bool), Field(gt=0)]
NonNegFloat = Annotated[float, BeforeValidator(_not_bool), Field(ge=0)]
Fraction = Annotated[float, BeforeValidator(_not_bool), Field(ge=0, le=1)]  # 0 … 1
Dtype = typing.Literal["float32", "bfloat16", "float16"]
GroundedTasks = Annotated[list[typing.Literal[TASKS]], Field(min_length=1)]  # task types of the grounded generator


def _axis(v: int) -> int:
    if v < 1 and v != -1:
        raise ValueError("expected a positive integer (or -1: the rest of the devices)")
    return v


MeshAxis = Annotated[int, BeforeValidator(_not_bool), AfterValidator(_axis)]


class Mesh(TypedDict, total=False):
    """``{data, fsdp, tensor}``: device counts per mesh axis (missing = 1; one may be -1)."""

    __pydantic_config__ = ConfigDict(extra="forbid")
    data: MeshAxis
    fsdp: MeshAxis
    tensor: MeshAxis


def mesh_axes(mesh, devices: int | None = None) -> dict | None:
    """A config's ``mesh`` section ({data, fsdp, tensor}: positive integers, missing axes 1; one axis
    may be -1, "the rest of the devices") as :func:`jaxmm.sharding.make_mesh` keywords; ``None``
    stays ``None``. ``devices`` (all processes' devices) resolves the -1 axis; without it a -1
    stays -1.

    Raises:
        ValueError: not a mapping, an unknown axis, a size that is neither a positive integer nor -1,
            two -1 axes, or (with ``devices``) axes that do not multiply to the device count.
    """
    if mesh is None:
        return None
    if not isinstance(mesh, dict):
        raise ValueError(f"mesh={mesh!r}: expected a mapping such as {{data: 1, fsdp: 4, tensor: 2}}")
    unknown = set(mesh) - {"data", "fsdp", "tensor"}
    if unknown:
        raise ValueError(f"mesh: unknown axis {sorted(unknown)}; the axes are data, fsdp, tensor")
    for k, v in mesh.items():
        if isinstance(v, bool) or not isinstance(v, int) or (v < 1 and v != -1):
            raise ValueError(f"mesh.{k}={v!r}: expected a positive integer (or -1: the rest of the devices)")
    axes = {k: int(mesh.get(k, 1)) for k in ("data", "fsdp", "tensor")}
    rest = [k for k, v in axes.items() if v == -1]
    if len(rest) > 1:
        raise ValueError(f"mesh: only one axis may be -1, got {rest}")
    if rest and devices is not None:
        fixed = math.prod(v for v in axes.values() if v != -1)
        if devices % fixed:
            raise ValueError(f"mesh {mesh}: {devices} devices are not a multiple of the other axes' {fixed}")
        axes[rest[0]] = devices // fixed
    if devices is not None and math.prod(axes.values()) != devices:
        raise ValueError(
            f"mesh {mesh}: data x fsdp x tensor = {math.prod(axes.values())}, but there are {devices} "
            "devices (all processes'); use -1 for one axis to take the rest"
        )
    return axes


def _regex(v: str) -> str:
    import re

    try:
        re.compile(v)
    except re.error as e:
        raise ValueError(f"not a valid regular expression ({e})") from None
    return v


Regex = Annotated[str, AfterValidator(_regex)]

ORGANISM, ORGANISM_RANDOM = "organism", "organism-random"


def _model_ref(v: str | None) -> str | None:
    if v is not None and not v.strip():
        raise ValueError("expected a checkpoint directory, 'organism', 'organism-random' or null, got an empty string")
    return None if v == ORGANISM else v


#: A config's ``model`` field, the same in eval, SFT and GRPO: ``None`` (or ``"organism"``, read
#: as ``None``) = the shipped trained organism; ``"organism-random"`` = the seeded random-weight
#: organism (training from scratch); anything else = an HF checkpoint directory.
#: :func:`jaxmm.organism.resolve` turns it into a directory.
ModelRef = Annotated[str | None, AfterValidator(_model_ref)]


# ----------------------------------------------------------------------------- reading and overrides
def read_json(f: str | Path) -> dict:
    """The JSON object in file ``f`` (a checkpoint's config.json, a processor config).

    Raises:
        ConfigError: not valid JSON (names the file and the JSON problem), or not a JSON object.
        OSError: the file cannot be read.
    """
    import json

    try:
        d = json.loads(Path(f).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{f}: expected a JSON object, got a JSON {type(d).__name__}")
    return d


def read_yaml(path: str | Path) -> tuple[dict, dict]:
    """A YAML file's mapping and the line of each key path (``{("benchmarks", 0, "limit"): 4}``;
    lines from 1). An empty file is ``{}``.

    Raises:
        ConfigError: the file is not valid YAML (naming file, line and column), a key is given
            twice or reads as a boolean (a bare ``on``/``yes``/``no``), or the top level is not a
            mapping.
        OSError: the file cannot be read.
    """
    import yaml

    text = Path(path).read_text()
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        what = " ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x) or str(e)
        raise ConfigError(f"{where}: not valid YAML: {what}") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a mapping of config fields (key: value lines), got a {type(data).__name__}: {_show(data)}"
        )
    lines: dict = {}

    def walk(n, prefix):
        lines[prefix] = n.start_mark.line + 1
        if isinstance(n, yaml.MappingNode):
            seen = {}
            for k, v in n.value:
                line, key = k.start_mark.line + 1, ".".join(map(str, prefix + (k.value,)))
                if k.tag == "tag:yaml.org,2002:bool":
                    raise ConfigError(f'{path}:{line}: key {key!r} reads as a boolean in YAML 1.1; quote it ("{k.value}": ...)')
                if k.value in seen:
                    raise ConfigError(f"{path}:{line}: key {key!r} given twice (first at line {seen[k.value]})")
                seen[k.value] = line
                walk(v, prefix + (k.value,))
                lines[prefix + (k.value,)] = line
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                walk(v, prefix + (i,))

    walk(node, ())
    return data, lines


def apply_override(d: dict, override: str, defaults: dict | None = None) -> tuple:
    """Applies one ``key=value`` override (dotted key, YAML value) to ``d`` in place; returns the
    key path. A list entry is addressed by its index (``benchmarks.0.limit=8``); a missing or
    ``null`` section becomes a mapping; a top-level field absent from ``d`` starts from its value in
    ``defaults`` (so ``data.size=100`` keeps the other ``data`` defaults).

    Raises:
        ConfigError: no ``=``, an empty key part, a value that is not YAML, an index that is not an
            integer or out of range (naming the list and its length), or a key under a scalar.
    """
    import yaml

    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected key=value (dotted keys, e.g. benchmarks.0.limit=8); there is no '='")
    key, text = override.split("=", 1)
    keys = key.strip().split(".")
    if not all(keys):
        raise ConfigError(f"override {override!r}: empty key part in {key!r}")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(
            f"override {override!r}: the value {text!r} is not valid YAML ({getattr(e, 'problem', None) or e})"
        ) from None
    if defaults and keys[0] not in d and keys[0] in defaults and len(keys) > 1:
        d[keys[0]] = copy.deepcopy(defaults[keys[0]])
    path: list = []
    node: Any = d
    for i, k in enumerate(keys):
        last = i == len(keys) - 1
        where = ".".join(map(str, path)) or "the config"
        if isinstance(node, list):
            if not k.lstrip("-").isdigit():
                raise ConfigError(f"override {override!r}: {where} is a list; expected an index, got {k!r}")
            j = int(k)
            if not 0 <= j < len(node):
                has = (
                    f"has {len(node)} entr{'y' if len(node) == 1 else 'ies'} (indices 0..{len(node) - 1})"
                    if node
                    else "is an empty list"
                )
                raise ConfigError(
                    f"override {override!r}: {where} {has}, no index {j}; set the whole list with {where}=[...] to add one"
                )
            k = j
        elif not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {where} is {_show(node)}, not a mapping or list")
        path.append(k)
        if last:
            node[k] = value
        else:
            nxt = node[k] if isinstance(node, list) else node.get(k)
            if nxt is None:
                if keys[i + 1].isdigit():
                    raise ConfigError(
                        f"override {override!r}: {'.'.join(map(str, path))} is not set, so it has no "
                        f"index {keys[i + 1]}; set the whole list with {'.'.join(map(str, path))}=[...]"
                    )
                nxt = node[k] = {}
            node = nxt
    return tuple(path)


# ----------------------------------------------------------------------------- validation
def _show(v, n: int = 80) -> str:
    s = repr(v)
    return s if len(s) <= n else s[: n - 1] + "…"


def _strip(x):
    while typing.get_origin(x) in (Annotated, typing.Required, typing.NotRequired):
        x = typing.get_args(x)[0]
    return x


def _known_keys(cls, path, data=None) -> list | None:
    """The field names of the section at ``path`` of the schema ``cls`` (None if not a record);
    ``data`` (the validated input) picks the member of a union of records its values select."""
    tp: Any = cls
    node = data
    for k in path:
        tp = _record(tp, node)
        if tp is None:
            return None
        if isinstance(k, int):
            args = [a for a in typing.get_args(_strip(tp)) if a is not type(None)]
            tp = args[0] if args else None
        else:
            tp = _fields(tp).get(k) if _is_record(tp) else None
        node = _child(node, k)
        if tp is None:
            return None
    tp = _record(tp, node)
    return sorted(_fields(tp)) if tp is not None and _is_record(tp) else None


def _child(node, k):
    if isinstance(node, dict):
        return node.get(k)
    if isinstance(node, (list, tuple)) and isinstance(k, int) and 0 <= k < len(node):
        return node[k]
    return None


def _is_record(tp) -> bool:
    return dataclasses.is_dataclass(tp) or is_typeddict(tp) or (isinstance(tp, type) and issubclass(tp, pydantic.BaseModel))


def _fields(tp) -> dict:
    """A record type's field names and annotations."""
    if isinstance(tp, type) and issubclass(tp, pydantic.BaseModel):
        return {k: f.annotation for k, f in tp.model_fields.items()}
    return typing.get_type_hints(tp, include_extras=True)


def _selects(rec, node) -> bool:
    """Whether the mapping ``node`` may be an instance of record ``rec``: no ``Literal`` field of
    ``rec`` that ``node`` sets to another value (a union's tag, e.g. ``data.name``)."""
    if not isinstance(node, dict) or not _is_record(rec):
        return True
    for k, ann in _fields(rec).items():
        ann = _strip(ann)
        if typing.get_origin(ann) is typing.Literal and k in node and node[k] not in typing.get_args(ann):
            return False
    return True


def _record(tp, node=None):
    """``tp`` without ``Annotated`` and ``| None`` (a dataclass, TypedDict or list type); of a union
    of records, the first that the input ``node`` may be (:func:`_selects`)."""
    tp = _strip(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [_strip(a) for a in typing.get_args(tp) if a is not type(None)]
        recs = [a for a in args if _is_record(a) or typing.get_origin(a) is list]
        return next((a for a in recs if _selects(a, node)), recs[0] if recs else None)
    return tp


def _path(err, data) -> tuple:
    """A pydantic error's location without its union/validator tags: only the keys and indices that
    exist in the input (plus, for a missing field, its name)."""
    out, node, loc = [], data, err["loc"]
    for i, k in enumerate(loc):
        if isinstance(node, dict) and k in node:
            out.append(k)
            node = node[k]
        elif isinstance(node, (list, tuple)) and isinstance(k, int) and 0 <= k < len(node):
            out.append(k)
            node = node[k]
        elif (
            isinstance(node, dict)
            and isinstance(k, str)
            and i == len(loc) - 1
            and err["type"] in ("missing", "missing_keyword_argument")
        ):
            out.append(k)
    return tuple(out)


def _what(err) -> str:
    t, msg, ctx = err["type"], err["msg"], err.get("ctx") or {}
    if t in ("missing", "missing_keyword_argument"):
        if err["loc"] and isinstance(err["loc"][-1], int):
            return f"too few entries (no entry {err['loc'][-1]})"
        return "missing (a required field)"
    bounds = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
    if t in bounds:
        return f"expected a number {bounds[t]} {next(iter(ctx.values()))}"
    if t == "value_error":
        return msg.removeprefix("Value error, ")
    if t == "too_short":
        return f"expected at least {ctx.get('min_length')} entr{'y' if ctx.get('min_length') == 1 else 'ies'}"
    return msg.replace("Input should be ", "expected ", 1)


@functools.cache
def _adapter(cls) -> pydantic.TypeAdapter:
    return pydantic.TypeAdapter(cls)


_VALIDATING = contextvars.ContextVar("jaxmm_config_validating", default=False)


class Validated:
    """Base of the config dataclasses: an instance built in Python (``EvalConfig(batch_size="eight")``,
    ``dataclasses.replace(cfg, lr=-1)``) is checked against the annotations as a YAML file is, and
    its values are the validated ones (``lr="3e-4"`` becomes 3e-4, ``model="organism"`` None).

    Raises:
        ConfigError: from the constructor, one line naming the class, each bad field, what was
            expected and the value given.
    """

    def __post_init__(self):
        if _VALIDATING.get():  # built by validate() itself, from checked values
            return
        fields = dataclasses.fields(self)
        checked = validate(type(self), {f.name: getattr(self, f.name) for f in fields}, type(self).__name__)
        for f in fields:
            object.__setattr__(self, f.name, getattr(checked, f.name))


def validate(cls, data: dict, source: str | None = None, lines: dict | None = None, origins: Sequence[tuple] = ()):
    """``cls`` (a config dataclass, or any type pydantic validates) built from ``data``, checked
    against its annotations.

    ``source`` (the file), ``lines`` (key path -> line, :func:`read_yaml`) and ``origins``
    (``(key path, override)`` pairs, in the order applied) let each error name its culprit.

    Raises:
        ConfigError: one line per bad field, joined by "; ": where (file:line or override), the
            field's dotted path, what was expected and the value given.
    """
    lines = lines or {}
    token = _VALIDATING.set(True)
    try:
        return _adapter(cls).validate_python(data)
    except pydantic.ValidationError as e:
        parts: dict = {}
        unknown: dict = {}  # parent path -> the unknown keys under it: one message per section
        for err in e.errors():
            path = _path(err, data)
            if err["type"] in ("extra_forbidden", "unexpected_keyword_argument") and path:
                unknown.setdefault(path[:-1], []).append(path[-1])
            else:
                parts.setdefault(path, []).append(err)
        msgs = []
        for parent, keys in unknown.items():
            known = _known_keys(cls, parent, data)
            msgs.append(
                _where(parent + (keys[0],), source, lines, origins)
                + (f"{'.'.join(map(str, parent))}: " if parent else "")
                + f"unknown field(s) {sorted(map(str, keys))}"
                + (f"; known: {known}" if known else "")
            )
        for path, errs in parts.items():
            whats = list(dict.fromkeys(_what(err) for err in errs))
            what = whats[0] + "".join(" or " + w.removeprefix("expected ") for w in whats[1:])
            msgs.append(_where(path, source, lines, origins) + _field(path, errs[0], what))
        raise ConfigError("; ".join(msgs)) from None
    finally:
        _VALIDATING.reset(token)


def _field(path, err, what) -> str:
    name = ".".join(map(str, path))
    absent = err["type"] in ("missing", "missing_keyword_argument") and not isinstance(err["loc"][-1], int)
    named = err["type"] == "value_error" and str(err.get("input")) in what  # the value is in the message
    if absent or not path or named:
        return f"{name + ': ' if name else ''}{what}"
    return f"{name}: {what}, got {_show(err.get('input'))}"


def _where(path, source, lines, origins) -> str:
    hits = [o for p, o in origins if path[: len(p)] == p]
    if hits:
        return f"override {hits[-1]!r}: "
    if not path and origins:
        return f"{source or 'config'} with overrides {[o for _, o in origins]}: "
    for n in range(len(path), 0, -1):
        if path[:n] in lines and source:
            return f"{source}:{lines[path[:n]]}: "
    return f"{source}: " if source else "config: "


def defaults(cls) -> dict:
    """Each field's default value (a fresh copy of factories' values)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = copy.deepcopy(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def load(cls, path: str | Path | None, overrides: Sequence[str] = ()):
    """A config dataclass ``cls`` from a YAML file (``None``: the defaults) plus ``key=value``
    overrides (dotted keys, YAML values; applied in order), validated against ``cls``'s annotations.

    Raises:
        ConfigError: invalid YAML, a top level that is not a mapping, a malformed override, an
            unknown field or a bad value, each naming the file (and line) or the override, the
            field's dotted path and the value.
        OSError: the file cannot be read (FileNotFoundError: it does not exist).
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    data, lines = read_yaml(path) if path is not None else ({}, {})
    base = defaults(cls)
    origins = [(apply_override(data, ov, base), ov) for ov in overrides]
    return validate(cls, data, None if path is None else str(path), lines, origins)
