"""Qwen3-VL (dense): config, vision tower, model class and the checkpoint key map, on :mod:`jaxmm.models.core`."""

from jaxmm.models.core import Batch, ModelOutput, abstract_params, forward, forward_jit, graphdef, prepare_batch
from jaxmm.models.qwen3_vl.config import Qwen3VLConfig as Config
from jaxmm.models.qwen3_vl.modeling import Qwen3VLForConditionalGeneration
from jaxmm.models.qwen3_vl.params import IGNORE, IGNORE_TIED, KEY_RULES

__all__ = [
    "Config",
    "Batch",
    "ModelOutput",
    "Qwen3VLForConditionalGeneration",
    "abstract_params",
    "forward",
    "forward_jit",
    "graphdef",
    "prepare_batch",
    "KEY_RULES",
    "IGNORE",
    "IGNORE_TIED",
]
