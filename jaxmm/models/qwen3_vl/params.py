"""Hugging Face keys -> jaxmm paths for Qwen3-VL (transformers-5 ``model.visual.*`` /
``model.language_model.*`` names, and the same without the ``model.`` prefix for the vision tower)."""

from __future__ import annotations

from jaxmm.checkpoint.hf import Rule
from jaxmm.models.core.params import IGNORE, IGNORE_TIED, TEXT_RULES, conv_patch, to_hf  # noqa: F401
from jaxmm.models.core.params import TEXT as _T
from jaxmm.models.core.params import VISION as _V

KEY_RULES: tuple[Rule, ...] = (
    Rule(_V + r"patch_embed\.proj\.weight", "visual.patch_embed.kernel", conv_patch),
    Rule(_V + r"patch_embed\.proj\.bias", "visual.patch_embed.bias"),
    Rule(_V + r"pos_embed\.weight", "visual.pos_embed.weight"),
    Rule(_V + r"blocks\.(\d+)\.(norm1|norm2)\.(weight|bias)", r"visual.blocks.\1.\2.\3"),
    Rule(_V + r"blocks\.(\d+)\.attn\.(qkv|proj)\.weight", r"visual.blocks.\1.attn.\2.kernel", "T"),
    Rule(_V + r"blocks\.(\d+)\.attn\.(qkv|proj)\.bias", r"visual.blocks.\1.attn.\2.bias"),
    Rule(_V + r"blocks\.(\d+)\.mlp\.(linear_fc1|linear_fc2)\.weight", r"visual.blocks.\1.mlp.\2.kernel", "T"),
    Rule(_V + r"blocks\.(\d+)\.mlp\.(linear_fc1|linear_fc2)\.bias", r"visual.blocks.\1.mlp.\2.bias"),
    Rule(_V + r"merger\.norm\.(weight|bias)", r"visual.merger.norm.\1"),
    Rule(_V + r"merger\.(linear_fc1|linear_fc2)\.weight", r"visual.merger.\1.kernel", "T"),
    Rule(_V + r"merger\.(linear_fc1|linear_fc2)\.bias", r"visual.merger.\1.bias"),
    Rule(_V + r"deepstack_merger_list\.(\d+)\.norm\.(weight|bias)", r"visual.deepstack_merger_list.\1.norm.\2"),
    Rule(
        _V + r"deepstack_merger_list\.(\d+)\.(linear_fc1|linear_fc2)\.weight", r"visual.deepstack_merger_list.\1.\2.kernel", "T"
    ),
    Rule(_V + r"deepstack_merger_list\.(\d+)\.(linear_fc1|linear_fc2)\.bias", r"visual.deepstack_merger_list.\1.\2.bias"),
    Rule(_T + r"layers\.(\d+)\.self_attn\.(q_norm|k_norm)\.weight", r"language_model.layers.\1.self_attn.\2.weight"),
    Rule(_T + r"layers\.(\d+)\.self_attn\.o_proj\.bias", r"language_model.layers.\1.self_attn.o_proj.bias"),
) + TEXT_RULES
