"""Hugging Face checkpoint keys -> jaxmm parameter paths: what every family's table shares.

Both key layouts are accepted: published checkpoints (``visual.*``, ``model.layers.*``,
``model.embed_tokens.*``, ``lm_head.*``) and transformers 5 (``model.visual.*``,
``model.language_model.*``). Torch ``Linear`` weights [out, in] become ``kernel`` [in, out]; the
Conv3d patch embedding [C, 3, T, P, P] (stride = kernel) becomes a Linear over flattened patches.
A family's ``params.py`` adds its vision tower's rules (and any text extras) to :data:`TEXT_RULES`.
"""

from __future__ import annotations

import numpy as np

from jaxmm.checkpoint.hf import Rule

#: key prefixes of the vision tower and the text decoder, in both layouts
VISION = r"(?:model\.)?visual\."
TEXT = r"model\.(?:language_model\.)?"


def conv_patch(w: np.ndarray, shape) -> np.ndarray:
    """Conv3d weight [C, in, T, P, P] -> kernel [in·T·P·P, C] (the processor flattens patches in
    (channel, t, row, col) order, the Conv3d's own order)."""
    return w.reshape(w.shape[0], -1).T


#: the shared decoder (``language_model``) and the lm head
TEXT_RULES: tuple[Rule, ...] = (
    Rule(TEXT + r"embed_tokens\.weight", "language_model.embed_tokens.weight"),
    Rule(TEXT + r"layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight", r"language_model.layers.\1.\2.weight"),
    Rule(
        TEXT + r"layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|o_proj)\.weight",
        r"language_model.layers.\1.self_attn.\2.kernel",
        "T",
    ),
    Rule(TEXT + r"layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj)\.bias", r"language_model.layers.\1.self_attn.\2.bias"),
    Rule(TEXT + r"layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight", r"language_model.layers.\1.mlp.\2.kernel", "T"),
    Rule(TEXT + r"norm\.weight", "language_model.norm.weight"),
    Rule(r"lm_head\.weight", "lm_head.kernel", "T"),
)

# Present in some checkpoints, not needed by jaxmm: rotary buffers, and the head of a tied model.
IGNORE = (r".*rotary_emb\.inv_freq",)
IGNORE_TIED = IGNORE + (r"lm_head\.weight",)


def to_hf(flat_params: dict[tuple, np.ndarray], config) -> dict[str, np.ndarray]:
    """jaxmm parameters -> Hugging Face tensors with the published key names (``visual.*``,
    ``model.layers.*``, ``lm_head.weight``), the inverse of a family's key table, for export."""
    out = {}
    vc = config.vision
    for path, w in flat_params.items():
        w = np.asarray(w)
        name = ".".join(str(p) for p in path)
        if name == "visual.patch_embed.kernel":
            out["visual.patch_embed.proj.weight"] = np.ascontiguousarray(w.T).reshape(
                w.shape[1], vc.in_channels, vc.temporal_patch_size, vc.patch_size, vc.patch_size
            )
            continue
        name = name.replace("merger.mlp_0", "merger.mlp.0").replace("merger.mlp_2", "merger.mlp.2")
        if name.startswith("language_model."):
            name = "model." + name[len("language_model.") :]
        if name.endswith(".kernel"):
            name, w = name[: -len(".kernel")] + ".weight", w.T
        out[name] = np.ascontiguousarray(w)
    return out
