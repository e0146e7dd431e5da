"""Qwen2-VL: config, vision tower, model class and the checkpoint key map, on :mod:`jaxmm.models.core`."""

from jaxmm.models.core import Batch, ModelOutput, abstract_params, forward, forward_jit, graphdef, prepare_batch
from jaxmm.models.qwen2_vl.config import Qwen2VLConfig as Config
from jaxmm.models.qwen2_vl.modeling import Qwen2VLForConditionalGeneration
from jaxmm.models.qwen2_vl.params import IGNORE, IGNORE_TIED, KEY_RULES

__all__ = [
    "Config",
    "Batch",
    "ModelOutput",
    "Qwen2VLForConditionalGeneration",
    "abstract_params",
    "forward",
    "forward_jit",
    "graphdef",
    "prepare_batch",
    "KEY_RULES",
    "IGNORE",
    "IGNORE_TIED",
]
