"""Chat prompts through the checkpoint's tokenizer and template, against transformers' Qwen2_5_VLProcessor
(``transformers/models/qwen2_5_vl/processing_qwen2_5_vl.py``) built from the tiny test tokenizer."""

import json

import numpy as np
import pytest

import tiny
from chat_fixtures import CHAT_TEMPLATE, MAX_PIXELS, MIN_PIXELS, build_tokenizer
from jaxmm.processing.chat import batch_prompts, build_prompt, decode, extract_answer, extract_think, load_tokenizer

DEFAULT_SYSTEM = "You are a helpful assistant."


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    build_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


@pytest.fixture(scope="module")
def proc(tok):
    from transformers import ProcessorMixin, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    # Without torchvision, transformers cannot resolve the video-processor base class while it
    # type-checks the constructor's arguments; skip that check only (processing is unchanged).
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: type(arg))
        return Qwen2_5_VLProcessor(
            image_processor=Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS),
            tokenizer=tok,
            chat_template=tok.chat_template,
        )


@pytest.fixture(scope="module")
def photos():
    return tiny.photos()


def img(name):
    return {"type": "image", "image": name}


def txt(s):
    return {"type": "text", "text": s}


# name -> (messages with photo names in the image parts, the last user turn's text runs)
CONVERSATIONS = {
    "one_image_default_system": (
        [{"role": "user", "content": [img("chelsea"), txt("what color is the car ?")]}],
        ["what color is the car ?"],
    ),
    "one_image_after_text_system": (
        [
            {"role": "system", "content": "you are a helpful assistant ."},
            {"role": "user", "content": [txt("describe the image ."), img("astronaut")]},
        ],
        ["describe the image ."],
    ),
    "two_images_system": (
        [
            {"role": "system", "content": "look at the picture carefully ."},
            {"role": "user", "content": [img("coffee"), txt("count the apples"), img("rocket"), txt(" and the birds ?")]},
        ],
        ["count the apples", " and the birds ?"],
    ),
    "multi_turn_text_last": (
        [
            {"role": "user", "content": [img("astronaut"), txt("describe the image .")]},
            {"role": "assistant", "content": "a cat sat on the mat ."},
            {"role": "user", "content": "how many people are standing ?"},
        ],
        ["how many people are standing ?"],
    ),
    "multi_turn_two_images_system": (
        [
            {"role": "system", "content": "you are a helpful assistant ."},
            {"role": "user", "content": [img("camera"), txt("is the light on or off ?")]},
            {"role": "assistant", "content": "the light is off ."},
            {"role": "user", "content": [img("logo"), txt("\nwhich animal is bigger ?\n")]},
        ],
        ["\nwhich animal is bigger ?\n"],
    ),
    "text_only": ([{"role": "user", "content": "the answer is three ."}], ["the answer is three ."]),
}


def with_photos(msgs, photos):
    return [
        m
        if isinstance(m["content"], str)
        else {**m, "content": [{**p, "image": photos[p["image"]]} if p["type"] == "image" else p for p in m["content"]]}
        for m in msgs
    ]


def photo_list(msgs, photos):
    return [photos[p["image"]] for m in msgs if not isinstance(m["content"], str) for p in m["content"] if p["type"] == "image"]


def reference(proc, msgs, photos, **kw):
    """Qwen2_5_VLProcessor on the rendered text and the images -> (input_ids [B,S], attention_mask, counts per row)."""
    texts = [proc.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in msgs]
    images = [im for m in msgs for im in photo_list(m, photos)]
    ref = proc(text=texts, images=images or None, return_tensors="np", **kw)
    grids = ref.get("image_grid_thw", np.zeros((0, 3), np.int64))
    merged = [int(g.prod()) // proc.image_processor.merge_size**2 for g in grids]
    counts, k = [], 0
    for m in msgs:
        n = len(photo_list(m, photos))
        counts.append(merged[k : k + n])
        k += n
    return ref["input_ids"], ref["attention_mask"], counts


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_prompt_ids_match_qwen2_5_vl_processor(tok, proc, photos, name):
    msgs, question = CONVERSATIONS[name]
    ref_ids, _, (counts,) = reference(proc, [msgs], photos)
    out = build_prompt(msgs, tok, image_token_counts=counts)
    assert out["input_ids"].dtype == np.int64 and out["input_ids"].ndim == 1
    np.testing.assert_array_equal(out["input_ids"], ref_ids[0])
    assert out["text"] == decode(tok, out["input_ids"], skip_special_tokens=False)

    # the image processor generation uses gives the same counts
    from jaxmm.processing.image import ImageProcessor

    ip = ImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    assert [ip.num_image_tokens(ip.preprocess_one(im)[1]) for im in photo_list(msgs, photos)] == counts

    s0, s1 = out["system_span"]
    system = msgs[0]["content"] if msgs[0]["role"] == "system" else DEFAULT_SYSTEM
    assert s0 == 0
    assert decode(tok, out["input_ids"][s0:s1], skip_special_tokens=False) == f"<|im_start|>system\n{system}<|im_end|>\n"
    assert decode(tok, out["input_ids"][s1:], skip_special_tokens=False).startswith("<|im_start|>user\n")

    runs = out["question_spans"]
    assert [decode(tok, out["input_ids"][a:b], skip_special_tokens=False) for a, b in runs] == question
    assert out["question_span"] == (runs[0][0], runs[-1][1])
    q0, q1 = out["question_span"]
    assert decode(tok, out["input_ids"][q0:q1]) == "".join(question)  # image tokens inside are special


def test_prompt_ids_match_processor_chat_template_with_images(tok, proc, photos):
    """The processor's own end-to-end path: images inside the messages, tokenize=True."""
    msgs, _ = CONVERSATIONS["two_images_system"]
    full = proc.apply_chat_template(
        with_photos(msgs, photos), tokenize=True, return_dict=True, add_generation_prompt=True, return_tensors="np"
    )
    counts = [int(g.prod()) // 4 for g in full["image_grid_thw"]]
    np.testing.assert_array_equal(build_prompt(msgs, tok, counts)["input_ids"], full["input_ids"][0])


def test_no_generation_prompt_and_vision_ids(tok, proc, photos):
    msgs, _ = CONVERSATIONS["multi_turn_two_images_system"]
    _, _, (counts,) = reference(proc, [msgs], photos)
    out = build_prompt(msgs, tok, counts, add_generation_prompt=False)
    assert out["text"].endswith("which animal is bigger ?\n<|im_end|>\n")
    with_ids = build_prompt(msgs, tok, counts, add_vision_id=True)  # template kwargs pass through
    assert "Picture 1: <|vision_start|>" in with_ids["text"] and "Picture 2: <|vision_start|>" in with_ids["text"]
    text = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, add_vision_id=True)
    ref = proc(text=[text], images=photo_list(msgs, photos), return_tensors="np")
    np.testing.assert_array_equal(with_ids["input_ids"], ref["input_ids"][0])


def test_system_span_without_default_system_turn(tok):
    """A template with no default system turn (Qwen3-VL-like): system_span is empty without a system message."""
    import copy

    t = copy.deepcopy(tok)
    t.chat_template = CHAT_TEMPLATE.replace("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n", "")
    out = build_prompt([{"role": "user", "content": "hello"}], t)
    assert out["system_span"] == (0, 0)
    assert decode(t, out["input_ids"][slice(*out["question_span"])]) == "hello"
    sys_msg = [{"role": "system", "content": "be brief ."}, {"role": "user", "content": "hello"}]
    s0, s1 = build_prompt(sys_msg, t)["system_span"]
    assert (
        decode(t, build_prompt(sys_msg, t)["input_ids"][s0:s1], skip_special_tokens=False)
        == "<|im_start|>system\nbe brief .<|im_end|>\n"
    )


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_matches_processor_padding_and_shifts_spans(tok, proc, photos, side):
    names = ["text_only", "two_images_system", "multi_turn_text_last"]
    convs = [CONVERSATIONS[n][0] for n in names]
    ref_ids, ref_am, counts = reference(proc, convs, photos, padding=True, padding_side=side)
    b = batch_prompts(convs, tok, counts, padding_side=side)
    np.testing.assert_array_equal(b["input_ids"], ref_ids)
    np.testing.assert_array_equal(b["attention_mask"], ref_am)
    assert b["input_ids"].dtype == np.int64 and b["attention_mask"].dtype == np.int64
    assert b["lengths"] == ref_am.sum(1).tolist() and len(set(b["lengths"])) == 3
    s = b["input_ids"].shape[1]
    for row, name in enumerate(names):
        n = b["lengths"][row]
        off = s - n if side == "left" else 0
        single = build_prompt(convs[row], tok, counts[row])
        assert b["texts"][row] == single["text"]
        assert b["system_spans"][row] == [(single["system_span"][0] + off, single["system_span"][1] + off)]
        ((s0, s1),) = b["system_spans"][row]
        assert s0 == off
        system = convs[row][0]["content"] if convs[row][0]["role"] == "system" else DEFAULT_SYSTEM
        assert decode(tok, b["input_ids"][row, s0:s1], skip_special_tokens=False) == f"<|im_start|>system\n{system}<|im_end|>\n"
        runs = b["question_spans"][row]
        assert [decode(tok, b["input_ids"][row, a:e], skip_special_tokens=False) for a, e in runs] == CONVERSATIONS[name][1]
        assert all(b["attention_mask"][row, a:e].all() for a, e in runs + b["system_spans"][row])
        pad = slice(0, off) if side == "left" else slice(n, s)
        assert (b["input_ids"][row, pad] == tok.pad_token_id).all() and not b["attention_mask"][row, pad].any()


def test_batch_pad_token_id_and_text_only_default(tok):
    convs = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "the cat sat on the mat ."}]]
    b = batch_prompts(convs, tok, padding_side="right", pad_token_id=7)
    n = b["lengths"][0]
    assert (b["input_ids"][0, n:] == 7).all() and b["attention_mask"][0, n:].sum() == 0
    ((q0, q1),) = b["question_spans"][0]
    assert q1 < n and decode(tok, b["input_ids"][0, q0:q1]) == "hi"
    assert decode(tok, b["input_ids"][0, q1:n], skip_special_tokens=False) == "<|im_end|>\n<|im_start|>assistant\n"


def test_extract_think_and_answer():
    text = "<think>\n first look at the apples \n</think> so <answer> 3 </answer> no, <answer>\n4\n</answer>"
    assert extract_think(text) == "first look at the apples"
    assert extract_answer(text) == "4"
    assert extract_think("<think>a</think><think>b</think>") == "a"
    assert extract_answer("<answer>a</answer> <answer>b</answer>") == "b"
    assert extract_answer("<ANSWER> yes </ answer>") == "yes"
    assert extract_think("< think >\n\nmulti\nline\n</think >") == "multi\nline"
    assert extract_answer("<answer>a <answer>b</answer>") == "b"
    assert extract_answer("<answer></answer>") == ""
    assert extract_answer("no tags") is None and extract_answer("<answer>cut off") is None
    assert extract_think("<think>open") is None and extract_think("</think> only") is None
    assert extract_answer("<think><answer>1</answer></think><answer>2</answer>") == "2"


def test_decode(tok):
    ids = build_prompt([{"role": "user", "content": "the answer is three ."}], tok)["input_ids"]
    assert decode(tok, ids) == "system\nYou are a helpful assistant.\nuser\nthe answer is three .\nassistant\n"
    assert decode(tok, list(ids)) == decode(tok, ids)
    with pytest.raises(ValueError, match=r"1-D token ids, got shape \(1, "):
        decode(tok, ids[None])


def test_bad_messages_are_named(tok):
    one_image = CONVERSATIONS["one_image_default_system"][0]
    cases = [
        ([], None, r"messages: expected a non-empty list"),
        ([{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}], None, r"messages\[1\]\['role'\]: 'robot'"),
        ([{"role": "user"}], None, r"messages\[0\]: missing 'content'"),
        (["hi"], None, r"messages\[0\]: expected a dict"),
        ([{"role": "user", "content": 3}], None, r"messages\[0\]\['content'\]: expected a string or a list"),
        ([{"role": "user", "content": [{"type": "video"}]}], None, r"messages\[0\]\['content'\]\[0\]\['type'\]: 'video'"),
        (
            [{"role": "system", "content": "s"}, {"role": "user", "content": [img("x"), {"type": "text"}]}],
            [4],
            r"messages\[1\]\['content'\]\[1\]\['text'\]: expected a string",
        ),
        ([{"role": "user", "content": ["hi"]}], None, r"messages\[0\]\['content'\]\[0\]: expected a dict with 'type'"),
        (one_image, [], "1 images but image_token_counts has 0"),
        (one_image, None, "1 images but image_token_counts has 0"),
        ([{"role": "user", "content": [img("a"), img("b")]}], [4], "2 images but image_token_counts has 1"),
        (one_image, [4, 4], "1 images but image_token_counts has 2"),
        (one_image, [0], r"image_token_counts\[0\]: expected a positive integer, got 0"),
        ([{"role": "user", "content": "<|image_pad|> hi"}], None, r"rendered 1 <\|image_pad\|> for 0 image parts"),
    ]
    for msgs, counts, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            build_prompt(msgs, tok, counts)


def test_bad_batches_are_named(tok):
    ok = [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match=r"conversation 1: messages\[0\]\['role'\]"):
        batch_prompts([ok, [{"role": "bot", "content": "x"}]], tok, [[], []])
    with pytest.raises(ValueError, match="2 conversations but 1 image_token_counts lists"):
        batch_prompts([ok, ok], tok, [[]])
    with pytest.raises(ValueError, match="padding_side='middle'"):
        batch_prompts([ok], tok, padding_side="middle")
    with pytest.raises(ValueError, match="no conversations"):
        batch_prompts([], tok)


def test_load_tokenizer(tok_dir, tmp_path):
    t = load_tokenizer(tok_dir)
    assert t.chat_template == CHAT_TEMPLATE and t.eos_token_id == 1 and t.pad_token_id == 0
    ids = t.convert_tokens_to_ids(
        ["<|endoftext|>", "<|im_end|>", "<|im_start|>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]
    )
    assert ids == [0, 1, 2, 290, 291, 292, 293] and len(t) == 294
    plain = [i for i in t("the cat sat on the mat . count the apples ?")["input_ids"]]
    assert all(3 <= i < 290 for i in plain)
    pre = json.loads((tok_dir / "preprocessor_config.json").read_text())
    assert pre["size"] == {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}: no tokenizer\.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        load_tokenizer(tmp_path / "absent")


def test_fixture_ids_are_configurable(tmp_path):
    t = build_tokenizer(
        tmp_path, 320, image_token_id=300, video_token_id=301, vision_start_token_id=310, vision_end_token_id=311, min_pixels=None
    )
    assert t.convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]) == [
        300,
        301,
        310,
        311,
    ]
    assert t.convert_tokens_to_ids("<|reserved_305|>") == 305 and not (tmp_path / "preprocessor_config.json").exists()
    with pytest.raises(ValueError, match="vision token id 293 >= vocab_size 293"):
        build_tokenizer(tmp_path, 293)
