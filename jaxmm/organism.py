"""The embedded default model: a small, seeded, random-weight Qwen2.5-VL checkpoint.

No model weights can be downloaded where jaxmm is developed and tested, so the default that
``jaxmm demo`` runs is built on first use: the same architecture as Qwen2.5-VL (windowed vision
tower with full-attention blocks, M-RoPE GQA decoder) at toy width, written to disk as a genuine
Hugging Face checkpoint directory (``config.json``, ``model.safetensors``,
``preprocessor_config.json``) and then loaded through the ordinary ``jaxmm.load`` path. Its outputs
are meaningless as language; its attention statistics exercise every code path.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

VERSION = 1

CONFIG = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "image_token_id": 500, "video_token_id": 501,
    "vision_start_token_id": 502, "vision_end_token_id": 503,
    "tie_word_embeddings": True,
    "text_config": {
        "model_type": "qwen2_5_vl_text", "vocab_size": 512, "hidden_size": 128,
        "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "hidden_act": "silu",
        "max_position_embeddings": 4096, "eos_token_id": 1, "pad_token_id": 0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
    },
    "vision_config": {
        "model_type": "qwen2_5_vl_vision", "depth": 4, "hidden_size": 64, "intermediate_size": 128,
        "num_heads": 4, "in_channels": 3, "patch_size": 14, "spatial_merge_size": 2,
        "temporal_patch_size": 2, "tokens_per_second": 2, "window_size": 112,
        "out_hidden_size": 128, "fullatt_block_indexes": [1, 3], "hidden_act": "silu",
        "rope_parameters": {"rope_type": "axial", "rope_theta": 10000.0},
    },
}

PREPROCESSOR = {
    "image_processor_type": "Qwen2VLImageProcessor", "do_resize": True, "do_rescale": True,
    "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "size": {"shortest_edge": 56 * 56, "longest_edge": 224 * 224},
}


def default_dir() -> Path:
    """``$JAXMM_HOME/organism-v{VERSION}`` (default ``~/.cache/jaxmm``)."""
    home = Path(os.environ.get("JAXMM_HOME", Path.home() / ".cache" / "jaxmm"))
    return home / f"organism-v{VERSION}"


def build(path: str | Path | None = None, seed: int = 0) -> Path:
    """Writes the organism checkpoint to ``path`` (default :func:`default_dir`) unless it is there.

    The directory is written under a temporary name and renamed into place, so an interrupted build
    never leaves a half-written checkpoint behind.
    """
    from jaxmm.checkpoint.hf import save_safetensors
    from jaxmm.models.qwen2_5_vl.config import Qwen2_5_VLConfig
    from jaxmm.models.qwen2_5_vl.modeling import abstract_params
    from jaxmm.models.qwen2_5_vl.params import to_hf

    import flax.nnx as nnx

    path = Path(path) if path is not None else default_dir()
    if (path / "model.safetensors").exists():
        return path
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    config = Qwen2_5_VLConfig.from_dict(CONFIG)
    rng = np.random.default_rng(seed)
    flat = {}
    for p, v in nnx.to_flat_state(abstract_params(config)):
        shape = v.get_value().shape
        if p[-1] == "weight" and len(shape) == 1:          # norm scales
            flat[p] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            fan_in = shape[0] if p[-1] == "kernel" else shape[-1]
            std = 1.0 / np.sqrt(fan_in) if len(shape) == 2 else 0.02
            flat[p] = (std * rng.standard_normal(shape)).astype(np.float32)
    save_safetensors(to_hf(flat, config), tmp / "model.safetensors")
    (tmp / "config.json").write_text(json.dumps(CONFIG, indent=2))
    (tmp / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2))
    try:
        tmp.rename(path)
    except OSError:  # another process finished first
        if not (path / "model.safetensors").exists():
            raise
    return path
