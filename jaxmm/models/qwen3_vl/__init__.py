"""Qwen3-VL (dense): the shared Qwen-VL functions with Qwen3-VL's config, vision tower and key map."""

from jaxmm.models.qwen2_5_vl.inputs import prepare_batch
from jaxmm.models.qwen2_5_vl.modeling import Batch, ModelOutput, abstract_params, forward, forward_jit, graphdef
from jaxmm.models.qwen3_vl.config import Qwen3VLConfig as Config
from jaxmm.models.qwen3_vl.modeling import Qwen3VLForConditionalGeneration
from jaxmm.models.qwen3_vl.params import IGNORE, IGNORE_TIED, KEY_RULES


__all__ = ["Config", "Batch", "ModelOutput", "Qwen3VLForConditionalGeneration", "abstract_params", "forward",
           "forward_jit", "graphdef", "prepare_batch", "KEY_RULES", "IGNORE", "IGNORE_TIED"]
