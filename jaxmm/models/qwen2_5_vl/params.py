"""Hugging Face checkpoint keys -> jaxmm parameter paths for Qwen2.5-VL (a declarative table):
its vision tower (RMSNorm blocks, SwiGLU MLP, ``merger.mlp.{0,2}``) and the shared decoder's rules."""

from __future__ import annotations

from jaxmm.checkpoint.hf import Rule
from jaxmm.models.core.params import IGNORE, IGNORE_TIED, TEXT_RULES, VISION, conv_patch, to_hf  # noqa: F401

KEY_RULES: tuple[Rule, ...] = (
    Rule(VISION + r"patch_embed\.proj\.weight", "visual.patch_embed.kernel", conv_patch),
    Rule(VISION + r"blocks\.(\d+)\.(norm1|norm2)\.weight", r"visual.blocks.\1.\2.weight"),
    Rule(VISION + r"blocks\.(\d+)\.attn\.(qkv|proj)\.weight", r"visual.blocks.\1.attn.\2.kernel", "T"),
    Rule(VISION + r"blocks\.(\d+)\.attn\.(qkv|proj)\.bias", r"visual.blocks.\1.attn.\2.bias"),
    Rule(VISION + r"blocks\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight", r"visual.blocks.\1.mlp.\2.kernel", "T"),
    Rule(VISION + r"blocks\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.bias", r"visual.blocks.\1.mlp.\2.bias"),
    Rule(VISION + r"merger\.ln_q\.weight", "visual.merger.ln_q.weight"),
    Rule(VISION + r"merger\.mlp\.(0|2)\.weight", r"visual.merger.mlp_\1.kernel", "T"),
    Rule(VISION + r"merger\.mlp\.(0|2)\.bias", r"visual.merger.mlp_\1.bias"),
) + TEXT_RULES
