"""LLaVA-NeXT (LLaVA-v1.6): config, CLIP tower + projector + any-resolution packing, model class
and the checkpoint key map, on :mod:`jaxmm.models.core` (the shared CLIP modules of
:mod:`jaxmm.models.core.clip`, the shared decoder run as Llama).

Submodules: ``config`` (typed config.json, ``image_grid_pinpoints``), ``vision`` (CLIP tower over
the tiles, projector, ``image_newline`` packing), ``inputs`` (host: HF processor outputs -> Batch,
the packing index), ``modeling`` (the model class), ``params`` (checkpoint key map).
"""

from jaxmm.models.core import Batch, ModelOutput, abstract_params, forward, forward_jit, graphdef
from jaxmm.models.llava_next.config import LlavaNextConfig as Config
from jaxmm.models.llava_next.inputs import prepare_batch
from jaxmm.models.llava_next.modeling import LlavaNextForConditionalGeneration
from jaxmm.models.llava_next.params import IGNORE, IGNORE_TIED, KEY_RULES

__all__ = [
    "Config",
    "Batch",
    "ModelOutput",
    "LlavaNextForConditionalGeneration",
    "abstract_params",
    "forward",
    "forward_jit",
    "graphdef",
    "prepare_batch",
    "KEY_RULES",
    "IGNORE",
    "IGNORE_TIED",
]
