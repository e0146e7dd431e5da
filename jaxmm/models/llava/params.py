"""Hugging Face checkpoint keys -> jaxmm parameter paths for LLaVA (a declarative table).

Every key layout is read: transformers 5 (``model.vision_tower.*``, ``model.multi_modal_projector.*``,
``model.language_model.*``, ``lm_head.*``), what its ``save_pretrained`` writes
(``vision_tower.*``, ``multi_modal_projector.*``, ``language_model.model.*``,
``language_model.lm_head.*``: the renaming of transformers' ``conversion_mapping.py``, "llava",
reversed) and the published llava-hf checkpoints (the same with ``vision_tower.vision_model.*``).
"""

from __future__ import annotations

from jaxmm.checkpoint.hf import Rule
from jaxmm.models.core import params as core
from jaxmm.models.core.params import conv_patch

_V = r"(?:model\.)?vision_tower\.(?:vision_model\.)?"
_P = r"(?:model\.)?multi_modal_projector\."
_T = r"(?:model\.language_model\.|language_model\.model\.)"
_VIS = "visual.vision_model."

KEY_RULES: tuple[Rule, ...] = (
    Rule(_V + r"embeddings\.class_embedding", _VIS + "embeddings.class_embedding"),
    Rule(_V + r"embeddings\.patch_embedding\.weight", _VIS + "embeddings.patch_embedding.kernel", conv_patch),
    Rule(_V + r"embeddings\.position_embedding\.weight", _VIS + "embeddings.position_embedding.weight"),
    Rule(_V + r"(pre_layrnorm|post_layernorm)\.(weight|bias)", _VIS + r"\1.\2"),
    Rule(_V + r"encoder\.layers\.(\d+)\.(layer_norm1|layer_norm2)\.(weight|bias)", _VIS + r"layers.\1.\2.\3"),
    Rule(_V + r"encoder\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|out_proj)\.weight",
         _VIS + r"layers.\1.self_attn.\2.kernel", "T"),
    Rule(_V + r"encoder\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|out_proj)\.bias",
         _VIS + r"layers.\1.self_attn.\2.bias"),
    Rule(_V + r"encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)\.weight", _VIS + r"layers.\1.mlp.\2.kernel", "T"),
    Rule(_V + r"encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)\.bias", _VIS + r"layers.\1.mlp.\2.bias"),
    Rule(_P + r"(linear_1|linear_2)\.weight", r"visual.multi_modal_projector.\1.kernel", "T"),
    Rule(_P + r"(linear_1|linear_2)\.bias", r"visual.multi_modal_projector.\1.bias"),
    Rule(_T + r"embed_tokens\.weight", "language_model.embed_tokens.weight"),
    Rule(_T + r"layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight",
         r"language_model.layers.\1.\2.weight"),
    Rule(_T + r"layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|o_proj)\.weight",
         r"language_model.layers.\1.self_attn.\2.kernel", "T"),
    Rule(_T + r"layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|o_proj)\.bias",
         r"language_model.layers.\1.self_attn.\2.bias"),
    Rule(_T + r"layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight",
         r"language_model.layers.\1.mlp.\2.kernel", "T"),
    Rule(_T + r"norm\.weight", "language_model.norm.weight"),
    Rule(r"(?:language_model\.)?lm_head\.weight", "lm_head.kernel", "T"),
)
IGNORE = core.IGNORE + (r"(?:model\.)?vision_tower\.(?:vision_model\.)?embeddings\.position_ids",)
IGNORE_TIED = IGNORE + (r"(?:language_model\.)?lm_head\.weight",)
