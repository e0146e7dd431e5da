"""Qwen2.5-VL: config, vision tower, model class and the checkpoint key map, on :mod:`jaxmm.models.core`.

Submodules: ``config`` (typed config.json), ``vision`` (the windowed tower), ``inputs`` (host: the
tower's index arrays), ``modeling`` (the model class), ``params`` (checkpoint key map).
"""

from jaxmm.models.core import Batch, ModelOutput, abstract_params, forward, forward_jit, graphdef, prepare_batch
from jaxmm.models.qwen2_5_vl.config import Qwen2_5_VLConfig as Config
from jaxmm.models.qwen2_5_vl.modeling import Qwen2_5_VLForConditionalGeneration
from jaxmm.models.qwen2_5_vl.params import IGNORE, IGNORE_TIED, KEY_RULES

__all__ = [
    "Config",
    "Batch",
    "ModelOutput",
    "Qwen2_5_VLForConditionalGeneration",
    "abstract_params",
    "forward",
    "forward_jit",
    "graphdef",
    "prepare_batch",
    "KEY_RULES",
    "IGNORE",
    "IGNORE_TIED",
]
