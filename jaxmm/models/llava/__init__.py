"""LLaVA-1.5: config, CLIP tower + projector, model class and the checkpoint key map, on
:mod:`jaxmm.models.core` (the shared decoder run as Llama).

Submodules: ``config`` (typed config.json), ``vision`` (CLIP tower, projector), ``inputs`` (host:
HF processor outputs -> Batch), ``modeling`` (the model class), ``params`` (checkpoint key map).
"""

from jaxmm.models.core import Batch, ModelOutput, abstract_params, forward, forward_jit, graphdef
from jaxmm.models.llava.config import LlavaConfig as Config
from jaxmm.models.llava.inputs import prepare_batch
from jaxmm.models.llava.modeling import LlavaForConditionalGeneration
from jaxmm.models.llava.params import IGNORE, IGNORE_TIED, KEY_RULES

__all__ = [
    "Config",
    "Batch",
    "ModelOutput",
    "LlavaForConditionalGeneration",
    "abstract_params",
    "forward",
    "forward_jit",
    "graphdef",
    "prepare_batch",
    "KEY_RULES",
    "IGNORE",
    "IGNORE_TIED",
]
