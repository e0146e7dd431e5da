"""A tiny Qwen2.5-VL-style tokenizer, chat template and image-processor config, built locally (no hub).

:func:`build_tokenizer` trains a byte-level BPE with the ``tokenizers`` library on :data:`CORPUS`,
adds the Qwen special tokens at FIXED ids that agree with the tiny test models (``tests/tiny.py``:
vocab 300, image 290, video 291, vision_start 292, vision_end 293, eos 1, pad 0), attaches the
Qwen2.5-VL chat template (:data:`CHAT_TEMPLATE`, verbatim from the Qwen2.5-VL-Instruct checkpoints)
and ``save_pretrained``s everything so that ``AutoTokenizer.from_pretrained(dir)`` (and, once a
Qwen2.5-VL ``config.json`` is saved there too, ``AutoProcessor.from_pretrained(dir)``) works offline.

Token ids (defaults):

=======  =====================  ==========================================
id       token                  role
=======  =====================  ==========================================
0        ``<|endoftext|>``      pad token (``pad_token_id`` 0 of the tiny configs)
1        ``<|im_end|>``         eos token (``eos_token_id`` 1 of the tiny configs)
2        ``<|im_start|>``       turn header
3..289   byte-level BPE         256 byte symbols, then merges learnt on :data:`CORPUS`
290      ``<|image_pad|>``      ``image_token_id``
291      ``<|video_pad|>``      ``video_token_id``
292      ``<|vision_start|>``   ``vision_start_token_id``
293      ``<|vision_end|>``     ``vision_end_token_id``
294..299 (none)                 rows of the model's embedding no token maps to, as in real Qwen
                                checkpoints (151665 tokens for a 151936-row embedding)
=======  =====================  ==========================================

Ordinary BPE tokens always get ids below ``min(image, video, vision_start, vision_end)``; when the
four vision ids are not consecutive, the gaps are filled with ``<|reserved_{id}|>`` special tokens.
"""

from __future__ import annotations

from pathlib import Path

# A few hundred words of plain English covering the words the chat tests use.
CORPUS = """
the cat sat on the mat and looked at the red ball near the window . a small dog ran across the
garden while two birds sang in the old tree . what color is the car in the picture ? the car is
red . how many people are standing next to the boat ? the answer is three . describe the image in
one sentence . there is a man riding a horse on the beach at sunset . count the apples on the
table and the birds in the sky . the rocket stands on the launch pad under a clear blue sky . is
the coffee cup full or empty ? it is full . let us think step by step about the objects we can see ,
then give the final answer . you are a helpful assistant . the photo shows an astronaut in a white
suit holding a helmet . where is the ball ? the ball is on the left of the chair . which animal is
bigger , the cat or the dog ? the dog is bigger . read the text on the sign : stop . is there a
person in the image ? yes , there is one person . what is the woman holding ? she is holding an
umbrella . the train is yellow and it is leaving the station . name the fruit in the bowl : an
orange , a banana and two green apples . the clock on the wall shows ten past four . look at the
picture carefully and answer the question with a single word or number . the sky is blue , the
grass is green and the sun is bright . what is written on the cup ? is the light on or off ?
the light is off . how many wheels does the bicycle have ? it has two wheels . first , find the
car ; second , check its color ; finally , answer . the boy kicks the ball to his friend .
"""

# The chat template of Qwen/Qwen2.5-VL-*-Instruct (tokenizer_config.json / chat_template.json).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

ENDOFTEXT, IM_END, IM_START = "<|endoftext|>", "<|im_end|>", "<|im_start|>"
IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END = "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"

# Image-processor defaults for tiny tests: 4..32 merged tokens per image.
MIN_PIXELS, MAX_PIXELS = 28 * 28 * 4, 112 * 112 * 2


def build_tokenizer(
    path,
    vocab_size: int = 300,
    *,
    image_token_id: int = 290,
    video_token_id: int = 291,
    vision_start_token_id: int = 292,
    vision_end_token_id: int = 293,
    min_pixels: int | None = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
):
    """Builds and saves the tiny tokenizer (see the module docstring for the ids).

    Args:
        path: directory to ``save_pretrained`` into (created if missing): ``tokenizer.json``,
            ``tokenizer_config.json`` (with ``chat_template``; transformers may also write
            ``chat_template.jinja``), ``special_tokens_map.json`` where transformers writes one, and
            ``preprocessor_config.json``.
        vocab_size: the model's embedding rows; every token id must be below it.
        image_token_id, video_token_id, vision_start_token_id, vision_end_token_id: fixed ids of
            ``<|image_pad|>``, ``<|video_pad|>``, ``<|vision_start|>``, ``<|vision_end|>``; distinct,
            all >= 3 + 256 + 1 (room for the three leading specials, the byte alphabet and a merge).
        min_pixels, max_pixels: written to ``preprocessor_config.json`` through
            ``Qwen2VLImageProcessorPil.save_pretrained``; ``min_pixels=None`` writes no image config.

    Returns:
        the ``transformers.PreTrainedTokenizerFast`` (eos ``<|im_end|>``, pad ``<|endoftext|>``).

    Raises:
        ValueError: vision ids not distinct, too small for the byte alphabet, or >= ``vocab_size``.
        RuntimeError: the trained vocabulary or the special ids came out different (never expected).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    vision = {
        IMAGE_PAD: image_token_id,
        VIDEO_PAD: video_token_id,
        VISION_START: vision_start_token_id,
        VISION_END: vision_end_token_id,
    }
    ids = sorted(vision.values())
    bpe_size = ids[0]
    if len(set(ids)) != 4:
        raise ValueError(f"vision token ids must be distinct, got {vision}")
    if bpe_size < 3 + 256 + 1:
        raise ValueError(f"the lowest vision token id is {bpe_size}; it must be >= 260 (3 specials + 256 bytes + 1)")
    if ids[-1] >= vocab_size:
        raise ValueError(f"vision token id {ids[-1]} >= vocab_size {vocab_size}")

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_size,
        special_tokens=[ENDOFTEXT, IM_END, IM_START],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS], trainer)
    if tok.get_vocab_size() != bpe_size:
        raise RuntimeError(f"BPE vocabulary of {tok.get_vocab_size()} tokens, expected {bpe_size}")

    by_id = {v: k for k, v in vision.items()}
    added = [by_id.get(i, f"<|reserved_{i}|>") for i in range(bpe_size, ids[-1] + 1)]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
    )
    fast.add_special_tokens({"additional_special_tokens": added})
    names = [ENDOFTEXT, IM_END, IM_START, *added]
    got = fast.convert_tokens_to_ids(names)
    want = [0, 1, 2, *range(bpe_size, ids[-1] + 1)]
    if got != want:
        raise RuntimeError(f"special token ids {dict(zip(names, got))}, expected {dict(zip(names, want))}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(path)
    if min_pixels is not None:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels).save_pretrained(path)
    return fast


# ----------------------------------------------------------------------------- LLaVA-1.5
# LLaVA-1.5's conversation format as the llava-hf checkpoints' chat template writes it: an optional
# system text, then "USER: " with the turn's images first (one "<image>\n" each) and its text, then
# "ASSISTANT:" (and the answer).
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def build_llava_tokenizer(path, image_token_id: int = 290):
    """A tiny Llama-style tokenizer (``<unk>`` 0, ``<s>`` 1 = bos, added in front of every text,
    ``</s>`` 2 = eos, BPE 3 … image_token_id−1, ``<image>`` at ``image_token_id``) with
    :data:`LLAVA_CHAT_TEMPLATE`, saved to ``path``. Returns the tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=image_token_id,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",
        chat_template=LLAVA_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    assert fast.convert_tokens_to_ids(["<unk>", "<s>", "</s>", "<image>"]) == [0, 1, 2, image_token_id]
    Path(path).mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(path)
    return fast


def save_llava_chat_checkpoint(path, seed: int = 6):
    """A tiny LLaVA checkpoint (``tiny.build_hf_llava``) with :func:`build_llava_tokenizer`'s
    tokenizer and chat template and a CLIP processor config, saved to ``path``. Returns ``path``."""
    import tiny
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tiny.build_hf_llava(seed=seed).save_pretrained(path)
    build_llava_tokenizer(path)
    side = tiny.LLAVA_IMAGE_SIZE
    CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side}).save_pretrained(path)
    return path
