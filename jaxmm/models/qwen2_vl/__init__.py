"""Qwen2-VL: the Qwen2.5-VL family's functions with Qwen2-VL's config, vision tower and key map."""

from jaxmm.models.qwen2_5_vl.inputs import prepare_batch
from jaxmm.models.qwen2_5_vl.modeling import Batch, ModelOutput, abstract_params, forward, forward_jit, graphdef
from jaxmm.models.qwen2_vl.config import Qwen2VLConfig as Config
from jaxmm.models.qwen2_vl.modeling import Qwen2VLForConditionalGeneration
from jaxmm.models.qwen2_vl.params import IGNORE, IGNORE_TIED, KEY_RULES


__all__ = ["Config", "Batch", "ModelOutput", "Qwen2VLForConditionalGeneration", "abstract_params", "forward",
           "forward_jit", "graphdef", "prepare_batch", "KEY_RULES", "IGNORE", "IGNORE_TIED"]
