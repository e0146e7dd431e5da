"""The embedded default model: a small, seeded, random-weight Qwen2.5-VL checkpoint.

No model weights can be downloaded where jaxmm is developed and tested, so the default that
``jaxmm demo`` runs is built on first use: the same architecture as Qwen2.5-VL (windowed vision
tower with full-attention blocks, M-RoPE GQA decoder) at toy width, written to disk as a genuine
Hugging Face checkpoint directory (``config.json``, ``model.safetensors``,
``preprocessor_config.json``, and a tiny BPE tokenizer with a Qwen-style chat template) and then
loaded through the ordinary ``jaxmm.load`` path. Its outputs
are meaningless as language; its attention statistics exercise every code path.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

VERSION = 3

CONFIG = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "image_token_id": 290,
    "video_token_id": 291,
    "vision_start_token_id": 292,
    "vision_end_token_id": 293,
    "tie_word_embeddings": True,
    "bos_token_id": None,
    "eos_token_id": 1,
    "pad_token_id": 0,
    "text_config": {
        "model_type": "qwen2_5_vl_text",
        "vocab_size": 294,
        "bos_token_id": None,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "eos_token_id": 1,
        "pad_token_id": 0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
    },
    "vision_config": {
        "model_type": "qwen2_5_vl_vision",
        "depth": 4,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_heads": 4,
        "in_channels": 3,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "tokens_per_second": 2,
        "window_size": 112,
        "out_hidden_size": 128,
        "fullatt_block_indexes": [1, 3],
        "hidden_act": "silu",
        "rope_parameters": {"rope_type": "axial", "rope_theta": 10000.0},
    },
}

PREPROCESSOR = {
    "image_processor_type": "Qwen2VLImageProcessor",
    "do_resize": True,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "do_convert_rgb": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "size": {"shortest_edge": 56 * 56, "longest_edge": 224 * 224},
}


SHIPPED = Path(__file__).parent / "assets" / "organism"


def default() -> Path:
    """The embedded default model: the trained organism shipped in ``jaxmm/assets/organism`` (see
    ``experiments/organism/``), or, where that is absent, the seeded random one (:func:`build`)."""
    if (SHIPPED / "model.safetensors").exists():
        return SHIPPED
    return build()


def resolve(model: str | Path | None) -> Path | str:
    """A config's or the CLI's ``model`` -> the checkpoint directory to load; the same in eval, SFT,
    GRPO and the CLI (:data:`jaxmm.config.ModelRef`).

    ``None`` or ``"organism"``: the shipped trained organism (:func:`default`); ``"organism-random"``:
    the seeded random-weight one (:func:`build`, built on first use); anything else is returned as
    given (an HF checkpoint directory, checked when it is loaded).
    """
    from jaxmm.config import ORGANISM, ORGANISM_RANDOM

    if model is None or str(model) == ORGANISM:
        return default()
    if str(model) == ORGANISM_RANDOM:
        return build()
    return model


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
    from jaxmm.models.core.model import abstract_params
    from jaxmm.models.core.params import to_hf

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
        if p[-1] == "weight" and len(shape) == 1:  # norm scales
            flat[p] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            fan_in = shape[0] if p[-1] == "kernel" else shape[-1]
            std = 1.0 / np.sqrt(fan_in) if len(shape) == 2 else 0.02
            flat[p] = (std * rng.standard_normal(shape)).astype(np.float32)
    save_safetensors(to_hf(flat, config), tmp / "model.safetensors")
    (tmp / "config.json").write_text(json.dumps(CONFIG, indent=2))
    (tmp / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2))
    build_tokenizer(tmp, image_token_id=CONFIG["image_token_id"])
    try:
        tmp.rename(path)
    except OSError:  # another process finished first
        if not (path / "model.safetensors").exists():
            raise
    return path


# ----------------------------------------------------------------------------- tokenizer
# The tiny tokenizer's training text.
CORPUS = (
    """
the cat sat on the mat and looked at the red ball near the window . a small dog ran across the
garden while two birds sang in the old tree . what color is the car in the picture ? how many
people are standing next to the boat ? the answer is three . describe the image in one sentence .
there is a man riding a horse on the beach at sunset . count the apples on the table . the rocket
stands on the launch pad under a clear blue sky . is the coffee cup full or empty ? it is full .
let us think step by step about the objects we can see , then give the final answer .
you are a helpful assistant . the photo shows an astronaut in a white suit holding a helmet .
"""
    * 4
)

TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(path, image_token_id: int = 290):
    """Trains a tiny byte-level BPE (ids 3 … image_token_id−1) on :data:`CORPUS`, adds the Qwen special
    tokens (<|endoftext|> 0 = pad, <|im_end|> 1 = eos, <|im_start|> 2, then <|image_pad|>,
    <|video_pad|>, <|vision_start|>, <|vision_end|> at ``image_token_id`` … +3) and a Qwen2.5-VL-style
    chat template, and ``save_pretrained(path)``s it. Returns the tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=image_token_id,
        special_tokens=["<|endoftext|>", "<|im_end|>", "<|im_start|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS], trainer)
    if tok.get_vocab_size() != image_token_id:
        raise RuntimeError(f"BPE vocabulary of {tok.get_vocab_size()} tokens, expected {image_token_id}")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=TEMPLATE
    )
    fast.add_special_tokens(
        {"additional_special_tokens": ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]}
    )
    ids = fast.convert_tokens_to_ids(
        ["<|endoftext|>", "<|im_end|>", "<|im_start|>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]
    )
    want = [0, 1, 2] + [image_token_id + i for i in range(4)]
    if ids != want:
        raise RuntimeError(f"special token ids {ids}, expected {want}")
    fast.save_pretrained(path)
    return fast
