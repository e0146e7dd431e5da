"""Tiny random-weight Qwen2.5-VL checkpoints built with transformers, for parity tests.

Weights are re-drawn with a larger spread than HF's init (std 0.02 gives near-constant logits that
would hide bugs); every checkpoint is saved with ``save_pretrained`` like a real one.
"""

from __future__ import annotations

import numpy as np

IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 290, 291, 292, 293
VOCAB = 300

CONFIGS = {
    # untied head, GQA (4 query heads / 2 kv heads), windows of 2x2 merged tokens, 2 full-attention blocks
    "gqa_untied": dict(
        text=dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            mrope_section=[2, 3, 3],
        ),
        vision=dict(depth=4, hidden_size=32, intermediate_size=48, num_heads=2, window_size=56, fullatt_block_indexes=[1, 3]),
        tie=False,
    ),
    # tied head, MHA, larger windows (4x4 merged tokens), full attention at block 0 and 2
    "mha_tied": dict(
        text=dict(
            hidden_size=48,
            intermediate_size=80,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            mrope_section=[4, 4, 4],
        ),
        vision=dict(depth=3, hidden_size=48, intermediate_size=64, num_heads=4, window_size=112, fullatt_block_indexes=[0, 2]),
        tie=True,
    ),
}


def hf_config(name: str):
    from transformers import Qwen2_5_VLConfig

    c = CONFIGS[name]
    t = dict(c["text"])
    section = t.pop("mrope_section")
    cfg = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=VOCAB,
            rms_norm_eps=1e-6,
            bos_token_id=None,
            eos_token_id=1,
            pad_token_id=0,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
            **t,
        ),
        vision_config=dict(out_hidden_size=t["hidden_size"], **c["vision"]),
        image_token_id=IMAGE_TOKEN,
        video_token_id=VIDEO_TOKEN,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
        tie_word_embeddings=c["tie"],
    )
    cfg._attn_implementation = "eager"
    return cfg


def build_hf_model(name: str, seed: int = 0, std: float = 0.15):
    """A random-weight ``Qwen2_5_VLForConditionalGeneration`` in eval mode (float32, eager)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    return randomize(Qwen2_5_VLForConditionalGeneration(hf_config(name)).eval(), seed, std)


def randomize(model, seed: int, std: float):
    """Norm scales ~ 1 + 0.1·N(0,1) (biases of LayerNorms ~ std·N), every other tensor ~ std·N(0,1)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_scale = name.endswith("weight") and ("norm" in name or "ln_q" in name)
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen) if is_scale else std * torch.randn(p.shape, generator=gen))
    model.config._attn_implementation = "eager"
    return model


def save_hf_model(name: str, path, seed: int = 0, dtype=None):
    """Builds and saves a tiny checkpoint to ``path``; returns the torch model (float32)."""
    import torch

    model = build_hf_model(name, seed)
    if dtype is not None:
        model.to(dtype).save_pretrained(path)
        model.to(torch.float32)
    else:
        model.save_pretrained(path)
    return model


def photos():
    """Real photos from scikit-image, several sizes and aspect ratios."""
    from PIL import Image
    from skimage import data

    arrays = {
        "astronaut": data.astronaut(),
        "chelsea": data.chelsea(),
        "coffee": data.coffee(),
        "rocket": data.rocket(),
        "camera": data.camera(),
        "logo": data.logo(),
    }
    return {k: Image.fromarray(v) for k, v in arrays.items()}  # camera is grayscale (L), logo RGBA


def mm_token_type_ids(input_ids: np.ndarray) -> np.ndarray:
    return (input_ids == IMAGE_TOKEN).astype(np.int64) + 2 * (input_ids == VIDEO_TOKEN).astype(np.int64)


def make_rows(rows_tokens: list[list[int]], padding_side: str = "left", pad_id: int = 0):
    """Pads token lists into ``input_ids``/``attention_mask`` int64 arrays."""
    s = max(len(r) for r in rows_tokens)
    ids = np.full((len(rows_tokens), s), pad_id, np.int64)
    am = np.zeros((len(rows_tokens), s), np.int64)
    for i, r in enumerate(rows_tokens):
        sl = slice(s - len(r), s) if padding_side == "left" else slice(0, len(r))
        ids[i, sl] = r
        am[i, sl] = 1
    return ids, am


def image_span(n_tokens: int) -> list[int]:
    return [VISION_START] + [IMAGE_TOKEN] * n_tokens + [VISION_END]


def build_hf_qwen2_vl(seed: int = 0, std: float = 0.15, tie: bool = False):
    """A random-weight ``Qwen2VLForConditionalGeneration`` (eval mode, float32, eager)."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    cfg = Qwen2VLConfig(
        text_config=dict(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            bos_token_id=None,
            eos_token_id=1,
            pad_token_id=0,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        ),
        vision_config=dict(depth=3, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2),
        image_token_id=IMAGE_TOKEN,
        video_token_id=VIDEO_TOKEN,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
        tie_word_embeddings=tie,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    return randomize(Qwen2VLForConditionalGeneration(cfg).eval(), seed, std)


def build_hf_qwen3_vl(seed: int = 0, std: float = 0.15, tie: bool = False):
    """A random-weight dense ``Qwen3VLForConditionalGeneration`` (eval, float32, eager)."""
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    cfg = Qwen3VLConfig(
        text_config=dict(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            rms_norm_eps=1e-6,
            bos_token_id=None,
            eos_token_id=1,
            pad_token_id=0,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        ),
        vision_config=dict(
            depth=3,
            hidden_size=32,
            intermediate_size=48,
            num_heads=2,
            out_hidden_size=64,
            num_position_embeddings=16,
            deepstack_visual_indexes=[0, 1],
            patch_size=16,
        ),
        image_token_id=IMAGE_TOKEN,
        video_token_id=VIDEO_TOKEN,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
        tie_word_embeddings=tie,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    return randomize(Qwen3VLForConditionalGeneration(cfg).eval(), seed, std)


LLAVA_IMAGE_SIZE, LLAVA_PATCH = 56, 14  # a 4x4 patch grid: 16 image tokens per image


def build_hf_llava(seed: int = 0, std: float = 0.15, tie: bool = False, feature_layer=-2):
    """A random-weight ``LlavaForConditionalGeneration`` (CLIP tower, Llama decoder; eval, float32,
    eager) with image token ``IMAGE_TOKEN``."""
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    cfg = LlavaConfig(
        text_config=dict(
            model_type="llama",
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            max_position_embeddings=512,
            tie_word_embeddings=tie,
        ),
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=3,
            num_attention_heads=2,
            image_size=LLAVA_IMAGE_SIZE,
            patch_size=LLAVA_PATCH,
            projection_dim=32,
        ),
        image_token_index=IMAGE_TOKEN,
        vision_feature_layer=feature_layer,
        image_seq_length=16,
        tie_word_embeddings=tie,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    return randomize(LlavaForConditionalGeneration(cfg).eval(), seed, std)


#: tiny any-resolution grid (multiples of LLAVA_IMAGE_SIZE): landscape photos get 1x2 tiles, portrait 2x1
LLAVA_NEXT_PINPOINTS = [[56, 112], [112, 56], [56, 168], [168, 56]]


def build_hf_llava_next(seed: int = 0, std: float = 0.15, tie: bool = False, feature_layer=-2):
    """A random-weight ``LlavaNextForConditionalGeneration`` (CLIP tower, Llama decoder; eval, float32,
    eager) with image token ``IMAGE_TOKEN`` and the tiny ``LLAVA_NEXT_PINPOINTS``."""
    import torch
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    cfg = LlavaNextConfig(
        text_config=dict(
            model_type="llama",
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            max_position_embeddings=1024,
            tie_word_embeddings=tie,
        ),
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=3,
            num_attention_heads=2,
            image_size=LLAVA_IMAGE_SIZE,
            patch_size=LLAVA_PATCH,
            projection_dim=32,
        ),
        image_token_index=IMAGE_TOKEN,
        vision_feature_layer=feature_layer,
        image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
        tie_word_embeddings=tie,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    return randomize(LlavaNextForConditionalGeneration(cfg).eval(), seed, std)
