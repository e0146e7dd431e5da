"""Hugging Face keys -> jaxmm paths for Qwen2-VL: Qwen2.5-VL's table with Qwen2-VL's vision
block and merger names (LayerNorm weight and bias, ``mlp.fc1``/``mlp.fc2``)."""

from jaxmm.checkpoint.hf import Rule
from jaxmm.models.qwen2_5_vl import params as base

_V = base._V
_VISION_2_5 = ("norm1|norm2", "mlp\\.(gate_proj", "merger\\.ln_q")

KEY_RULES = tuple(r for r in base.KEY_RULES
                  if not (r.pattern.startswith(_V) and any(k in r.pattern for k in _VISION_2_5))) + (
    Rule(_V + r"blocks\.(\d+)\.(norm1|norm2)\.(weight|bias)", r"visual.blocks.\1.\2.\3"),
    Rule(_V + r"blocks\.(\d+)\.mlp\.(fc1|fc2)\.weight", r"visual.blocks.\1.mlp.\2.kernel", "T"),
    Rule(_V + r"blocks\.(\d+)\.mlp\.(fc1|fc2)\.bias", r"visual.blocks.\1.mlp.\2.bias"),
    Rule(_V + r"merger\.ln_q\.(weight|bias)", r"visual.merger.ln_q.\1"),
)
IGNORE, IGNORE_TIED = base.IGNORE, base.IGNORE_TIED
