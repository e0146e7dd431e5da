"""Chat prompts through the checkpoint's tokenizer and template, against Qwen2_5_VLProcessor."""

import numpy as np
import pytest

import tiny
from chat_fixtures import build_tokenizer
from jaxmm.processing.chat import batch_prompts, build_prompt, decode, extract_answer, extract_think
from jaxmm.processing.image import ImageProcessor

MAXP = 112 * 112 * 2


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


def hf_processor(tok, monkeypatch):
    from transformers import ProcessorMixin, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    # Without torchvision, transformers cannot resolve its video-processor base class while it
    # type-checks the constructor's arguments; skip that check only (processing is unchanged).
    monkeypatch.setattr(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: type(arg))
    return Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=MAXP),
                               tokenizer=tok, chat_template=tok.chat_template)


CONVERSATIONS = {
    "one_image_default_system": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the car ?"}]}],
    "two_images_system": [{"role": "system", "content": "you are a helpful assistant ."},
                          {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "count the apples"},
                                                       {"type": "image"}, {"type": "text", "text": " and the birds ?"}]}],
    "multi_turn": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image ."}]},
                   {"role": "assistant", "content": "a cat sat on the mat ."},
                   {"role": "user", "content": "how many people are standing ?"}],
}
PHOTOS = {"one_image_default_system": ["chelsea"], "two_images_system": ["coffee", "rocket"], "multi_turn": ["astronaut"]}


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_prompt_ids_match_qwen2_5_vl_processor(tok, name, monkeypatch):
    msgs = CONVERSATIONS[name]
    images = [tiny.photos()[p] for p in PHOTOS[name]]
    proc = hf_processor(tok, monkeypatch)
    text = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ref = proc(text=[text], images=images, return_tensors="np")
    pix = ImageProcessor(min_pixels=28 * 28 * 4, max_pixels=MAXP)(images)
    counts = [int(g.prod()) // 4 for g in pix["image_grid_thw"]]
    out = build_prompt(msgs, tok, counts)
    np.testing.assert_array_equal(out["input_ids"], ref["input_ids"][0])
    np.testing.assert_array_equal(pix["pixel_values"], ref["pixel_values"])
    s0, s1 = out["system_span"]
    assert decode(tok, out["input_ids"][s0:s1], skip_special_tokens=False).startswith("<|im_start|>system\n")
    q0, q1 = out["question_span"]
    question = decode(tok, out["input_ids"][q0:q1])
    last_user = [m for m in msgs if m["role"] == "user"][-1]["content"]
    expected = last_user if isinstance(last_user, str) else "".join(p["text"] for p in last_user if p["type"] == "text")
    assert question == expected


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_padding_shifts_spans(tok, side):
    convs = [CONVERSATIONS["multi_turn"], [{"role": "user", "content": "the answer is three ."}]]
    b = batch_prompts(convs, tok, [[12], []], padding_side=side)
    assert b["input_ids"].shape[0] == 2 and b["attention_mask"].sum(1).tolist()[1] < b["input_ids"].shape[1]
    for row in range(2):
        (q0, q1), = b["question_spans"][row]
        assert decode(tok, b["input_ids"][row, q0:q1]) in ("how many people are standing ?", "the answer is three .")
        assert b["attention_mask"][row, q0:q1].all()
        (s0, s1), = b["system_spans"][row]
        assert decode(tok, b["input_ids"][row, s0:s1], skip_special_tokens=False).startswith("<|im_start|>system")


def test_extract_spans():
    text = "<think>\n first look at the apples \n</think> so <answer> 3 </answer> no, <answer>4</answer>"
    assert extract_think(text) == "first look at the apples"
    assert extract_answer(text) == "4"
    assert extract_answer("no tags") is None and extract_think("<think>open") is None


def test_bad_messages_are_named(tok):
    with pytest.raises(ValueError, match=r"messages\[1\]\['role'\]"):
        build_prompt([{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}], tok)
    with pytest.raises(ValueError, match=r"messages\[0\]\['content'\]\[0\]"):
        build_prompt([{"role": "user", "content": [{"type": "video"}]}], tok)
    with pytest.raises(ValueError, match="1 images but image_token_counts has 0"):
        build_prompt(CONVERSATIONS["one_image_default_system"], tok, [])
