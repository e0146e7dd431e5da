"""What every model family shares: layers, the text decoder and its KV cache, the vision towers'
attention and block, the model class and its pure ``forward``, the host pipeline to a ``Batch``.

Submodules: ``config`` (typed config.json: TextConfig, VisionConfig, VLConfig), ``layers``,
``decoder`` (M-RoPE, attention on the seam, KVCache), ``vision`` (segments, VisionAttention,
VisionBlock; the tower contract), ``vision_inputs`` (host: segments, positions, bucketing),
``model`` (Batch, ModelOutput, VLForConditionalGeneration, forward), ``rope`` (host: M-RoPE
position ids), ``inputs`` (host: HF processor outputs -> Batch), ``params`` (shared key rules),
``clip`` (the LLaVA families' CLIP tower, projector, LLaVA-style config and key rules).
"""

from jaxmm.models.core.decoder import KVCache
from jaxmm.models.core.inputs import prepare_batch
from jaxmm.models.core.model import Batch, ModelOutput, abstract_params, forward, forward_jit, graphdef

__all__ = ["Batch", "KVCache", "ModelOutput", "abstract_params", "forward", "forward_jit", "graphdef", "prepare_batch"]
