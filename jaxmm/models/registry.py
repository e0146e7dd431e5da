"""The model families jaxmm knows, in one explicit table.

``FAMILIES[model_type]`` is a :class:`Family`: the config class and the functions the loader, the
planner and the checkpoint converter use. A new family adds its package under ``jaxmm/models/``
and one entry here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from jaxmm.models import llava, llava_next, qwen2_5_vl, qwen2_vl, qwen3_vl
from jaxmm.processing.anyres_image import AnyResImageProcessor
from jaxmm.processing.chat import LLAVA, QWEN, ChatFormat
from jaxmm.processing.clip_image import ClipImageProcessor
from jaxmm.processing.image import ImageProcessor
from jaxmm.processing import regions


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family: what ``config.json``'s ``model_type`` selects.

    Fields: ``name`` (the HF ``model_type``), ``Config`` (typed config class, ``from_pretrained``/
    ``from_dict``), ``model_class`` (the NNX ``...ForConditionalGeneration``), ``KEY_RULES``/``IGNORE``/
    ``IGNORE_TIED`` (checkpoint key map), ``prepare_batch`` (HF processor outputs -> Batch),
    ``forward``/``forward_jit``/``graphdef``/``abstract_params`` (the model's pure functions),
    ``image_processor`` (``(checkpoint dir, config) -> processor`` with ``preprocess_one`` and
    ``num_image_tokens``), ``chat_format`` (:class:`~jaxmm.processing.chat.ChatFormat`) and
    ``region_weights`` (boxes -> a layout's region mask, as
    :func:`jaxmm.processing.regions.region_weights`; LLaVA-NeXT has its own grids).
    """

    name: str
    Config: type
    model_class: type
    KEY_RULES: Any
    IGNORE: Any
    IGNORE_TIED: Any
    prepare_batch: Callable
    forward: Callable
    forward_jit: Callable
    graphdef: Callable
    abstract_params: Callable
    image_processor: Callable
    chat_format: ChatFormat
    region_weights: Callable = regions.region_weights


def _qwen_processor(path, config):
    return ImageProcessor.from_pretrained(path)


def _clip_processor(path, config):
    return ClipImageProcessor.from_pretrained(path, patch_size=config.vision.patch_size)


def _anyres_processor(path, config):
    return AnyResImageProcessor.from_pretrained(path, patch_size=config.vision.patch_size)


def _family(
    name: str, module, model_class: type, image_processor=_qwen_processor, chat_format=QWEN, region_weights=regions.region_weights
) -> Family:
    return Family(
        name=name,
        Config=module.Config,
        model_class=model_class,
        KEY_RULES=module.KEY_RULES,
        IGNORE=module.IGNORE,
        IGNORE_TIED=module.IGNORE_TIED,
        prepare_batch=module.prepare_batch,
        forward=module.forward,
        forward_jit=module.forward_jit,
        graphdef=module.graphdef,
        abstract_params=module.abstract_params,
        image_processor=image_processor,
        chat_format=chat_format,
        region_weights=region_weights,
    )


FAMILIES: dict[str, Family] = {
    "qwen2_5_vl": _family("qwen2_5_vl", qwen2_5_vl, qwen2_5_vl.Qwen2_5_VLForConditionalGeneration),
    "qwen2_vl": _family("qwen2_vl", qwen2_vl, qwen2_vl.Qwen2VLForConditionalGeneration),
    "qwen3_vl": _family("qwen3_vl", qwen3_vl, qwen3_vl.Qwen3VLForConditionalGeneration),
    "llava": _family("llava", llava, llava.LlavaForConditionalGeneration, _clip_processor, LLAVA),
    "llava_next": _family(
        "llava_next",
        llava_next,
        llava_next.LlavaNextForConditionalGeneration,
        _anyres_processor,
        LLAVA,
        llava_next.inputs.region_weights,
    ),
}


def family_of(path: str | Path):
    """The :class:`Family` of the checkpoint directory ``path`` (by its config's model_type).

    Raises:
        FileNotFoundError: no config.json in ``path``.
        ConfigError: config.json is not valid JSON (names the file and the JSON problem), or its
            ``model_type`` is missing or not supported.
    """
    from jaxmm.models.core.config import ConfigError, read_config_json

    cfg_file = Path(path) / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{path}: no config.json (is this a Hugging Face checkpoint directory?)")
    model_type = read_config_json(cfg_file).get("model_type")
    family = FAMILIES.get(model_type)
    if family is None:
        raise ConfigError(f"{cfg_file}: model_type={model_type!r} is not supported (supported: {sorted(FAMILIES)})")
    return family
