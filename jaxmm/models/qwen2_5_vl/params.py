"""Hugging Face checkpoint keys -> jaxmm parameter paths for Qwen2.5-VL (a declarative table).

Both key layouts are accepted: published checkpoints (``visual.*``, ``model.layers.*``,
``model.embed_tokens.*``, ``lm_head.*``) and transformers 5 (``model.visual.*``,
``model.language_model.*``). Torch ``Linear`` weights [out, in] become ``kernel`` [in, out]; the
Conv3d patch embedding [C, 3, T, P, P] (stride = kernel) becomes a Linear over flattened patches.
"""

from __future__ import annotations

import numpy as np

from jaxmm.checkpoint.hf import Rule

_V = r"(?:model\.)?visual\."
_T = r"model\.(?:language_model\.)?"


def _conv_patch(w: np.ndarray, shape) -> np.ndarray:
    """Conv3d weight [C, in, T, P, P] -> kernel [in·T·P·P, C] (the processor flattens patches in
    (channel, t, row, col) order, the Conv3d's own order)."""
    return w.reshape(w.shape[0], -1).T


KEY_RULES: tuple[Rule, ...] = (
    Rule(_V + r"patch_embed\.proj\.weight", "visual.patch_embed.kernel", _conv_patch),
    Rule(_V + r"blocks\.(\d+)\.(norm1|norm2)\.weight", r"visual.blocks.\1.\2.weight"),
    Rule(_V + r"blocks\.(\d+)\.attn\.(qkv|proj)\.weight", r"visual.blocks.\1.attn.\2.kernel", "T"),
    Rule(_V + r"blocks\.(\d+)\.attn\.(qkv|proj)\.bias", r"visual.blocks.\1.attn.\2.bias"),
    Rule(_V + r"blocks\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight",
         r"visual.blocks.\1.mlp.\2.kernel", "T"),
    Rule(_V + r"blocks\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.bias", r"visual.blocks.\1.mlp.\2.bias"),
    Rule(_V + r"merger\.ln_q\.weight", "visual.merger.ln_q.weight"),
    Rule(_V + r"merger\.mlp\.(0|2)\.weight", r"visual.merger.mlp_\1.kernel", "T"),
    Rule(_V + r"merger\.mlp\.(0|2)\.bias", r"visual.merger.mlp_\1.bias"),
    Rule(_T + r"embed_tokens\.weight", "language_model.embed_tokens.weight"),
    Rule(_T + r"layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight",
         r"language_model.layers.\1.\2.weight"),
    Rule(_T + r"layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|o_proj)\.weight",
         r"language_model.layers.\1.self_attn.\2.kernel", "T"),
    Rule(_T + r"layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj)\.bias",
         r"language_model.layers.\1.self_attn.\2.bias"),
    Rule(_T + r"layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight",
         r"language_model.layers.\1.mlp.\2.kernel", "T"),
    Rule(_T + r"norm\.weight", "language_model.norm.weight"),
    Rule(r"lm_head\.weight", "lm_head.kernel", "T"),
)

# Present in some checkpoints, not needed by jaxmm: rotary buffers, and the head of a tied model.
IGNORE = (r".*rotary_emb\.inv_freq",)
IGNORE_TIED = IGNORE + (r"lm_head\.weight",)


def to_hf(flat_params: dict[tuple, np.ndarray], config) -> dict[str, np.ndarray]:
    """jaxmm parameters -> Hugging Face tensors with the published key names (``visual.*``,
    ``model.layers.*``, ``lm_head.weight``), the inverse of :data:`KEY_RULES`, for export."""
    out = {}
    vc = config.vision
    for path, w in flat_params.items():
        w = np.asarray(w)
        name = ".".join(str(p) for p in path)
        if name == "visual.patch_embed.kernel":
            out["visual.patch_embed.proj.weight"] = np.ascontiguousarray(w.T).reshape(
                w.shape[1], vc.in_channels, vc.temporal_patch_size, vc.patch_size, vc.patch_size)
            continue
        name = name.replace("merger.mlp_0", "merger.mlp.0").replace("merger.mlp_2", "merger.mlp.2")
        if name.startswith("language_model."):
            name = "model." + name[len("language_model."):]
        if name.endswith(".kernel"):
            name, w = name[: -len(".kernel")] + ".weight", w.T
        out[name] = np.ascontiguousarray(w)
    return out
