"""The model families jaxmm runs, by ``config.json``'s ``model_type``.

A module of its own so that :mod:`jaxmm.loading` and :mod:`jaxmm.checkpoint.store` (which
:mod:`jaxmm.loading` calls) both read it without importing each other.
"""

from __future__ import annotations

from pathlib import Path

from jaxmm.models import qwen2_5_vl, qwen2_vl, qwen3_vl

FAMILIES = {"qwen2_5_vl": qwen2_5_vl, "qwen2_vl": qwen2_vl, "qwen3_vl": qwen3_vl}
"""``config.json``'s ``model_type`` -> the family module (``jaxmm.models.<family>``) that loads and runs it."""


def family_of(path: str | Path):
    """The model-family module for the checkpoint directory ``path`` (by its config's model_type).

    Raises:
        FileNotFoundError: no config.json in ``path``.
        ConfigError: config.json is not valid JSON (names the file and the JSON problem), or its
            ``model_type`` is missing or not supported.
    """
    from jaxmm.models.qwen2_5_vl.config import ConfigError, read_config_json

    cfg_file = Path(path) / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{path}: no config.json (is this a Hugging Face checkpoint directory?)")
    model_type = read_config_json(cfg_file).get("model_type")
    family = FAMILIES.get(model_type)
    if family is None:
        raise ConfigError(f"{cfg_file}: model_type={model_type!r} is not supported (supported: {sorted(FAMILIES)})")
    return family
