"""A tiny Qwen-style tokenizer and chat template, built locally (no hub), saved beside test weights.

Special-token ids match tests/tiny.py: <|endoftext|> 0 (pad), <|im_end|> 1 (eos), <|im_start|> 2,
<|image_pad|> 290, <|video_pad|> 291, <|vision_start|> 292, <|vision_end|> 293; ordinary BPE tokens
use ids 3..289.
"""

from __future__ import annotations

CORPUS = """
the cat sat on the mat and looked at the red ball near the window . a small dog ran across the
garden while two birds sang in the old tree . what color is the car in the picture ? how many
people are standing next to the boat ? the answer is three . describe the image in one sentence .
there is a man riding a horse on the beach at sunset . count the apples on the table . the rocket
stands on the launch pad under a clear blue sky . is the coffee cup full or empty ? it is full .
let us think step by step about the objects we can see , then give the final answer .
you are a helpful assistant . the photo shows an astronaut in a white suit holding a helmet .
""" * 4

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


def build_tokenizer(path):
    """Trains the BPE, fixes the special ids, and ``save_pretrained(path)``; returns the tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=290, special_tokens=["<|endoftext|>", "<|im_end|>", "<|im_start|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS], trainer)
    assert tok.get_vocab_size() == 290, tok.get_vocab_size()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=TEMPLATE)
    fast.add_special_tokens({"additional_special_tokens": ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                                           "<|vision_end|>"]})
    ids = fast.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>", "<|im_start|>", "<|image_pad|>",
                                      "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"])
    assert ids == [0, 1, 2, 290, 291, 292, 293], ids
    fast.save_pretrained(path)
    return fast
