"""Qwen2.5-VL: config, pure forward, host-side batch preparation and the checkpoint key map.

Submodules: ``config`` (typed config.json), ``modeling`` (NNX model + pure ``forward``), ``rope``
(M-RoPE index, host), ``inputs`` (HF processor outputs -> Batch), ``params`` (checkpoint key map).
"""

from jaxmm.models.qwen2_5_vl.config import Qwen2_5_VLConfig as Config
from jaxmm.models.qwen2_5_vl.inputs import prepare_batch
from jaxmm.models.qwen2_5_vl.modeling import (
    Batch,
    ModelOutput,
    Qwen2_5_VLForConditionalGeneration,
    abstract_params,
    forward,
    forward_jit,
    graphdef,
)
from jaxmm.models.qwen2_5_vl.params import IGNORE, IGNORE_TIED, KEY_RULES
