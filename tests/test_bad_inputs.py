"""Issue 17: every bad input gets a clear error naming the culprit; nothing is silently wrong.

Each case asserts the exception's type (jaxmm's, not a raw one from json / PIL / numpy / jax) and
that its message names the culprit: the file, the config field, the tensor, the image (its index in
the prompt and its path) or the argument. The good inputs next to them still work.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import shutil
import struct
import warnings

import jax
import numpy as np
import pytest
from PIL import Image

import jaxmm
from jaxmm import organism
from jaxmm.checkpoint.hf import CheckpointError, open_checkpoint, save_safetensors
from jaxmm.generate import generate, stream
from jaxmm.models.qwen2_5_vl.config import ConfigError

# raw exceptions from the libraries underneath, which a bad input must never surface as
RAW = (json.JSONDecodeError, UnicodeDecodeError, Image.DecompressionBombError, KeyError, IndexError, AttributeError, struct.error)


def raises(exc_type, fn, *needles):
    """Calls ``fn``; asserts it raises exactly ``exc_type`` (or a jaxmm subclass of it) whose message
    holds every needle; returns the message."""
    with pytest.raises(Exception) as info:
        fn()
    e = info.value
    assert isinstance(e, exc_type), f"{type(e).__module__}.{type(e).__name__}: {e}"
    assert not isinstance(e, RAW), f"raw {type(e).__name__}: {e}"
    assert type(e) is exc_type or type(e).__module__.startswith("jaxmm"), type(e)
    msg = str(e)
    for n in needles:
        assert str(n) in msg, f"{n!r} not in: {msg}"
    return msg


@pytest.fixture(scope="module")
def org(tmp_path_factory):
    """The organism checkpoint (tiny Qwen2.5-VL with tokenizer and processor) and its model."""
    path = organism.build(tmp_path_factory.mktemp("bad") / "org")
    return path, jaxmm.load(path)


def _edit(d: dict, dotted: str, value):
    *parents, last = dotted.split(".")
    for k in parents:
        d = d[k]
    if value is _DELETE:
        del d[last]
    else:
        d[last] = value


_DELETE = object()


def _config_dir(tmp_path, text: str):
    (tmp_path / "config.json").write_text(text)
    return tmp_path


# ----------------------------------------------------------------------------- config.json
CONFIG_CASES = [
    # (edit: dotted field -> value, or _DELETE), needles in the message
    ("text_config.hidden_size", _DELETE, ["'text_config.hidden_size'", "missing"]),
    ("text_config.num_hidden_layers", _DELETE, ["'text_config.num_hidden_layers'", "missing"]),
    ("text_config.vocab_size", _DELETE, ["'text_config.vocab_size'", "missing"]),
    ("text_config.num_key_value_heads", _DELETE, ["'text_config.num_key_value_heads'", "missing"]),
    ("vision_config.depth", _DELETE, ["'vision_config.depth'", "missing"]),
    ("vision_config.out_hidden_size", _DELETE, ["'vision_config.out_hidden_size'", "missing"]),
    ("vision_config", _DELETE, ["'vision_config'", "missing"]),
    ("text_config.num_hidden_layers", "4", ["'text_config.num_hidden_layers'", "integer", "str", "'4'"]),
    ("text_config.hidden_size", 128.0, ["'text_config.hidden_size'", "integer", "float", "128.0"]),
    ("text_config.num_attention_heads", True, ["'text_config.num_attention_heads'", "integer", "True"]),
    ("text_config.num_hidden_layers", 0, ["'text_config.num_hidden_layers'", "positive", "0"]),
    ("text_config.intermediate_size", -5, ["'text_config.intermediate_size'", "positive", "-5"]),
    ("text_config.rms_norm_eps", "1e-6", ["'text_config.rms_norm_eps'", "number", "'1e-6'"]),
    ("text_config.rope_parameters.rope_theta", "big", ["'text_config.rope_parameters.rope_theta'", "number"]),
    (
        "text_config.rope_parameters.mrope_section",
        [4, "6", 6],
        ["'text_config.rope_parameters.mrope_section'", "list of non-negative integers"],
    ),
    ("text_config.hidden_act", 3, ["'text_config.hidden_act'", "string", "3"]),
    ("text_config.eos_token_id", "1", ["'text_config.eos_token_id'", "integer", "'1'"]),
    ("vision_config.fullatt_block_indexes", "1,3", ["'vision_config.fullatt_block_indexes'", "list", "'1,3'"]),
    ("vision_config.patch_size", [14, 14], ["'vision_config.patch_size'", "integer", "[14, 14]"]),
    ("vision_config", [1, 2], ["'vision_config'", "must be an object", "list"]),
    ("tie_word_embeddings", "false", ["'tie_word_embeddings'", "true or false", "'false'"]),
    ("image_token_id", "290", ["'image_token_id'", "integer", "'290'"]),
    ("model_type", "idefics2", ["model_type='idefics2'", "not supported"]),
    ("model_type", _DELETE, ["model_type=None", "not supported"]),
]


@pytest.mark.parametrize(
    "field,value,needles", CONFIG_CASES, ids=[f"{f}={'<deleted>' if v is _DELETE else v!r}" for f, v, _ in CONFIG_CASES]
)
def test_bad_config_field_is_named(tmp_path, field, value, needles):
    d = copy.deepcopy(organism.CONFIG)
    _edit(d, field, value)
    path = _config_dir(tmp_path, json.dumps(d))
    raises(ConfigError, lambda: jaxmm.load(path), str(path / "config.json"), *needles)


@pytest.mark.parametrize(
    "text,needles",
    [
        ('{"model_type": "qwen2_5_vl",}', ["not valid JSON", "line 1 column"]),
        ('{"model_type": "qwen2_5_vl"', ["not valid JSON", "line 1"]),
        ("[1, 2]", ["expected a JSON object", "list"]),
        ("", ["not valid JSON"]),
    ],
)
def test_config_that_is_not_json_names_the_file(tmp_path, text, needles):
    path = _config_dir(tmp_path, text)
    raises(ConfigError, lambda: jaxmm.load(path), str(path / "config.json"), *needles)
    from jaxmm.models import qwen2_5_vl

    raises(ConfigError, lambda: qwen2_5_vl.Config.from_pretrained(path), str(path / "config.json"), *needles)


def test_legacy_layout_names_top_level_field(tmp_path):
    """Published transformers-4 configs keep text fields at the top level: named without a prefix."""
    d = copy.deepcopy(organism.CONFIG)
    text = d.pop("text_config")
    d.update({k: v for k, v in text.items() if k != "model_type"})
    from jaxmm.models import qwen2_5_vl

    assert qwen2_5_vl.Config.from_dict(d).text.hidden_size == 128  # the good legacy layout reads
    del d["hidden_size"]
    raises(
        ConfigError, lambda: qwen2_5_vl.Config.from_dict(d, source="legacy.json"), "legacy.json", "missing field 'hidden_size'"
    )


def test_qwen2_vl_needs_embed_dim():
    from transformers import Qwen2VLConfig as HF

    from jaxmm.models import qwen2_vl

    d = HF(
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2),
        text_config=dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=300,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3]},
        ),
    ).to_dict()
    assert qwen2_vl.Config.from_dict(d).vision.hidden_size == 32
    del d["vision_config"]["embed_dim"]
    raises(ConfigError, lambda: qwen2_vl.Config.from_dict(d, source="c.json"), "'vision_config.embed_dim'")


def test_defaults_are_transformers_own():
    """Fields left out take the values transformers gives them, family by family, not 7B's."""
    from transformers import Qwen2_5_VLTextConfig, Qwen2_5_VLVisionConfig, Qwen3VLTextConfig, Qwen3VLVisionConfig

    from jaxmm.models import qwen2_5_vl, qwen3_vl

    d = copy.deepcopy(organism.CONFIG)
    for f in ("rms_norm_eps", "max_position_embeddings", "rope_parameters", "hidden_act"):
        del d["text_config"][f]
    for f in ("tokens_per_second", "window_size", "patch_size", "hidden_act", "fullatt_block_indexes"):
        del d["vision_config"][f]
    d["vision_config"]["depth"] = 32  # the default fullatt_block_indexes need 32 blocks
    d["text_config"]["rope_parameters"] = {"mrope_section": [4, 6, 6]}
    c = qwen2_5_vl.Config.from_dict(d)
    t, v = Qwen2_5_VLTextConfig(), Qwen2_5_VLVisionConfig()
    assert (c.text.rms_norm_eps, c.text.max_position_embeddings, c.text.rope_theta, c.text.hidden_act) == (
        t.rms_norm_eps,
        t.max_position_embeddings,
        t.rope_parameters["rope_theta"],
        t.hidden_act,
    )
    assert (
        c.vision.tokens_per_second,
        c.vision.window_size,
        c.vision.patch_size,
        c.vision.hidden_act,
        c.vision.fullatt_block_indexes,
    ) == (v.tokens_per_second, v.window_size, v.patch_size, v.hidden_act, tuple(v.fullatt_block_indexes))
    d["model_type"] = "qwen3_vl"
    d["text_config"]["rope_parameters"] = {}
    for f in ("num_position_embeddings",):
        d["vision_config"].pop(f, None)
    d["vision_config"]["deepstack_visual_indexes"] = [1]
    c3 = qwen3_vl.Config.from_dict(d)
    t3, v3 = Qwen3VLTextConfig(), Qwen3VLVisionConfig()
    assert (
        c3.text.rope_theta,
        c3.text.rms_norm_eps,
        c3.text.max_position_embeddings,
        c3.text.head_dim,
        c3.vision.patch_size,
        c3.vision.num_position_embeddings,
        c3.vision.hidden_act,
    ) == (
        t3.rope_parameters["rope_theta"],
        t3.rms_norm_eps,
        t3.max_position_embeddings,
        t3.head_dim,
        v3.patch_size,
        v3.num_position_embeddings,
        v3.hidden_act,
    )


# ----------------------------------------------------------------------------- weights
def _ckpt_dir(tmp_path, org_path, name="ck"):
    d = tmp_path / name
    d.mkdir()
    shutil.copy(org_path / "config.json", d / "config.json")
    return d


def test_torch_files_renamed_safetensors_get_the_conversion_hint(tmp_path, org):
    import torch

    for kind, zipped in (("zip archive", True), ("pickle (protocol 2)", False)):
        d = _ckpt_dir(tmp_path, org[0], kind.split()[0])
        torch.save({"w": torch.ones(3)}, d / "model.safetensors", _use_new_zipfile_serialization=zipped)
        raises(CheckpointError, lambda: jaxmm.load(d), str(d / "model.safetensors"), kind, "torch.save", "Convert to safetensors")


def test_header_over_safetensors_cap(tmp_path, org):
    d = _ckpt_dir(tmp_path, org[0])
    (d / "model.safetensors").write_bytes(struct.pack("<Q", 200_000_000) + b"{" + b" " * 100)
    raises(CheckpointError, lambda: jaxmm.load(d), "model.safetensors", "200000000", "limit of 100000000")


def test_integer_tensor_for_float_weight_and_model_type_mismatch(tmp_path, org):
    path, model = org
    ck = open_checkpoint(path)
    tensors = {k: ck.get(k) for k in ck.keys()}
    key = next(k for k in tensors if k.endswith("norm.weight"))
    d = _ckpt_dir(tmp_path, path, "ints")
    save_safetensors({**tensors, key: tensors[key].astype(np.int32)}, d / "model.safetensors")
    raises(CheckpointError, lambda: jaxmm.load(d), repr(key), "model.safetensors", "I32", "float weight")

    d = _ckpt_dir(tmp_path, path, "qwen3")
    shutil.copy(path / "model.safetensors", d / "model.safetensors")
    cfg = {**organism.CONFIG, "model_type": "qwen3_vl"}
    (d / "config.json").write_text(json.dumps(cfg))
    raises(
        CheckpointError,
        lambda: jaxmm.load(d),
        str(d / "config.json"),
        "model_type='qwen3_vl'",
        "'qwen2_5_vl' checkpoint",
        "mlp.gate_proj",
    )
    # the same tensors, all float, in a directory of their own load
    d = _ckpt_dir(tmp_path, path, "good")
    save_safetensors(tensors, d / "model.safetensors")
    assert jaxmm.load(d).config == model.config


# ----------------------------------------------------------------------------- images
def _png(path, size=(64, 48), mode="RGB"):
    Image.new(mode, size, 128).save(path)
    return path


def _chat(*images, text="What is this?"):
    return [{"role": "user", "content": [*({"type": "image", "image": im} for im in images), {"type": "text", "text": text}]}]


def test_corrupt_second_image_is_named(tmp_path, org):
    model = org[1]
    good = _png(tmp_path / "good.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(good.read_bytes()[:60])  # truncated: "broken data stream" inside PIL
    raises(ValueError, lambda: model.prepare_chat(_chat(good, bad)), "image 1", str(bad), "truncated or corrupt")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    raises(ValueError, lambda: model.prepare_chat(_chat(good, text)), "image 1", str(text), "not an image")
    raises(
        FileNotFoundError, lambda: model.prepare_chat(_chat(good, tmp_path / "gone.png")), "image 1", "gone.png", "no such file"
    )
    # PIL images opened lazily by the caller are named by their file too
    raises(ValueError, lambda: model.prepare_chat(_chat(Image.open(good), Image.open(bad))), "image 1", str(bad))
    batch, info = model.prepare_chat(_chat(good, Image.open(good)))  # the good ones work
    assert info["image_grid_thw"].shape == (2, 3)


def test_image_errors_name_index_and_conversation(tmp_path, org):
    model = org[1]
    ok = np.zeros((56, 56, 3), np.uint8)
    raises(
        ValueError, lambda: model.prepare_chat(_chat(ok, ok, np.zeros((56, 56, 3), np.float32))), "image 2", "uint8", "float32"
    )
    raises(ValueError, lambda: model.prepare_chat(_chat(ok, np.zeros((2, 500, 3), np.uint8))), "image 1", "aspect ratio", "250")
    wide = _png(tmp_path / "wide.png", size=(3000, 10))
    raises(ValueError, lambda: model.prepare_chat(_chat(wide)), "image 0", str(wide), "aspect ratio")
    raises(
        ValueError,
        lambda: model.prepare_chat([_chat(ok), _chat(ok, np.zeros((5, 5, 7), np.uint8))]),
        "conversation 1",
        "image 1",
        "shape (5, 5, 7)",
    )
    raises(
        ValueError,
        lambda: model.prepare_chat([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]),
        "image 0",
        "no 'image' entry",
    )
    raises(TypeError, lambda: model.prepare_chat(_chat(ok, 3.5)), "image 1", "float")


def test_decompression_bomb_says_so(tmp_path, org, monkeypatch):
    big = _png(tmp_path / "big.png", size=(200, 200))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # 40 000 pixels > twice the limit
    raises(
        ValueError, lambda: org[1].prepare_chat(_chat(_png(tmp_path / "s.png"), big)), "image 1", str(big), "decompression bomb"
    )
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 30_000)  # over the limit, not twice: PIL warns
    with pytest.warns(Image.DecompressionBombWarning, match=re.escape(f"image 1 ({big}): possible decompression bomb")):
        org[1].prepare_chat(_chat(_png(tmp_path / "s.png"), big))


def test_16_bit_greyscale_warns_that_it_is_clipped(tmp_path, org):
    from jaxmm.processing.image import ImageProcessor

    a = np.array([[0, 100, 255, 256, 1000, 65535]] * 56, np.uint16)[:, [0, 1, 2, 3, 4, 5] * 10]
    im = Image.fromarray(a)
    assert im.mode == "I;16"
    with pytest.warns(UserWarning, match=r"image 0: PIL mode 'I;16'.*clipping values above 255"):
        x = ImageProcessor(do_resize=False, do_normalize=False, do_rescale=False).preprocess_one(im.crop((0, 0, 56, 56)))[0]
    assert x.max() == 255 and x.min() == 0  # clipped as transformers clips
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ImageProcessor().preprocess_one(Image.fromarray(np.zeros((56, 56), np.uint8)))  # 8-bit: no warning


# ----------------------------------------------------------------------------- prompts and generation
@pytest.mark.parametrize(
    "messages,exc,needles",
    [
        ("Describe the image.", TypeError, ["expected chat messages", "str", "'Describe the image.'"]),
        (["hi", "there"], TypeError, ["conversation 0", "string 'hi'"]),
        ([{"role": "user"}], ValueError, ["messages[0]", "'content'"]),
        ([{"role": "robot", "content": "hi"}], ValueError, ["messages[0]['role']", "'robot'"]),
        (42, TypeError, ["expected chat messages", "int"]),
    ],
)
def test_bad_messages_are_named(org, messages, exc, needles):
    raises(exc, lambda: org[1].prepare_chat(messages), *needles)
    raises(exc, lambda: org[1].generate(messages, max_new_tokens=1), *needles)


@pytest.mark.parametrize("n", [0, -3, 2.5, "8", True, None])
def test_max_new_tokens_is_validated(org, n):
    model = org[1]
    chat = [{"role": "user", "content": "hi"}]
    needles = ["max_new_tokens", "positive integer", repr(n)]
    raises(ValueError, lambda: model.generate(chat, max_new_tokens=n), *needles)
    batch, _ = model.prepare_chat(chat)
    raises(ValueError, lambda: generate(model.params, model.config, batch, max_new_tokens=n), *needles)
    raises(ValueError, lambda: next(stream(model.params, model.config, batch, max_new_tokens=n)), *needles)


def test_generation_past_max_position_embeddings_warns_as_transformers(org):
    model = org[1]
    chat = [{"role": "user", "content": "hi"}]
    batch, _ = model.prepare_chat(chat)
    s = int(np.asarray(batch.attention_mask).sum())
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = model.generate(chat, max_new_tokens=np.int64(2))  # good: no warning
    assert len(out.text) == 1
    assert not [w for w in rec if "max_position_embeddings" in str(w.message)]
    short = dataclasses.replace(model.config, text=dataclasses.replace(model.config.text, max_position_embeddings=s - 1))
    with pytest.warns(
        UserWarning,
        match=rf"prompt \({s} tokens\) is longer than the model's "
        rf"max_position_embeddings \({s - 1}",
    ):
        generate(model.params, short, batch, max_new_tokens=1)
    edge = dataclasses.replace(short, text=dataclasses.replace(short.text, max_position_embeddings=s + 1))
    with pytest.warns(UserWarning, match=r"max_new_tokens \(2\) exceeds"):
        generate(model.params, edge, batch, max_new_tokens=2)


@pytest.mark.parametrize(
    "kw,needles",
    [
        ({"temperature": -1.0}, ["temperature=-1.0", ">= 0"]),
        ({"temperature": float("nan")}, ["temperature=nan", "finite"]),
        ({"temperature": "hot"}, ["temperature='hot'"]),
        ({"top_p": 0.0}, ["top_p=0.0", "(0, 1]"]),
        ({"top_p": 2.0}, ["top_p=2.0", "(0, 1]"]),
        ({"top_k": -1}, ["top_k=-1", ">= 0"]),
        ({"top_k": 2.5}, ["top_k=2.5", "integer"]),
    ],
)
def test_bad_sampling_is_refused_before_any_work(org, kw, needles):
    """A negative temperature would invert the distribution and top_p 0 keep nothing: both used to
    sample silently."""
    from jaxmm.generate import Sampling

    model = org[1]
    raises(ValueError, lambda: Sampling(**kw), "Sampling:", *needles)
    raises(
        ValueError,
        lambda: model.generate([{"role": "user", "content": "hi"}], max_new_tokens=1, key=jax.random.PRNGKey(0), **kw),
        *needles,
    )
    assert Sampling(temperature=np.float32(0.7), top_k=np.int64(3), top_p=1).top_k == 3  # numpy scalars pass


@pytest.mark.parametrize("stop", [[-5], [10**6], ["eos"], [1.5]])
def test_stop_tokens_outside_the_vocabulary_are_named(org, stop):
    model = org[1]
    batch, _ = model.prepare_chat([{"role": "user", "content": "hi"}])
    vocab = model.config.text.vocab_size
    needles = ["stop_tokens", repr(stop[0]), f"0 … {vocab - 1}"]
    raises(ValueError, lambda: generate(model.params, model.config, batch, max_new_tokens=1, stop_tokens=stop), *needles)
    raises(ValueError, lambda: next(stream(model.params, model.config, batch, max_new_tokens=1, stop_tokens=stop)), *needles)
