"""The host pipeline (jaxmm.processing.batch) builds, for each kind of input, the Batch the old
separate paths built: (a) chat messages with images (left and right padding, bucketing, several
images per row), (b) HF-processor tensors, (c) SFT examples with labels, (d) prompt + completion
pairs for GRPO scoring, and the eval harness's region weights. The ``old_*`` functions below are
the code those paths ran before the pipeline (Model.prepare_chat, chat.batch_prompts' padding,
sft.sft_example / make_batch, grpo._prompts / full_batch, the harness's region patch), copied
verbatim; every array must be equal, dtype included."""

import dataclasses

import jax
import numpy as np
import pytest

from jaxmm.processing import batch as pipeline
from jaxmm.processing.chat import build_prompt, check_messages, images_of
from jaxmm.processing.image import open_image, pixel_inputs


@pytest.fixture(scope="module")
def model():
    import jaxmm
    from jaxmm import organism

    return jaxmm.load(organism.default())


@pytest.fixture(scope="module")
def samples():
    from jaxmm.data.grounded import make_sample

    return [make_sample(i, 3, (112, 112), "grounding", shape_scale=0.35, contrast=0.5) for i in range(3)] + [
        make_sample(7, 1, (140, 84))
    ]


def assert_same(a, b):
    """Every leaf of two pytrees (Batches, layouts, arrays) equal, with equal dtypes and shapes."""
    la, ta = jax.tree_util.tree_flatten_with_path(a)
    lb, tb = jax.tree_util.tree_flatten_with_path(b)
    assert ta == tb
    for (path, x), (_, y) in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, (jax.tree_util.keystr(path), x.dtype, y.dtype, x.shape, y.shape)
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


# ----------------------------------------------------------------------------- the old paths
def old_batch_prompts(convs, tokenizer, counts, padding_side, add_generation_prompt, chat):
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = 0 if pad is None else int(pad)
    prompts = [
        build_prompt(c, tokenizer, n, add_generation_prompt=add_generation_prompt, chat=chat) for c, n in zip(convs, counts)
    ]
    lengths = [len(p["input_ids"]) for p in prompts]
    s = max(lengths)
    ids = np.full((len(prompts), s), pad, np.int64)
    am = np.zeros((len(prompts), s), np.int64)
    sys_spans, q_spans = [], []
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        off = s - n if padding_side == "left" else 0
        ids[i, off : off + n] = p["input_ids"]
        am[i, off : off + n] = 1
        a, b = p["system_span"]
        sys_spans.append([(a + off, b + off)] if b > a else [])
        q_spans.append([(a + off, b + off) for a, b in p["question_spans"]])
    return {
        "input_ids": ids,
        "attention_mask": am,
        "system_spans": sys_spans,
        "question_spans": q_spans,
        "texts": [p["text"] for p in prompts],
        "lengths": lengths,
    }


def old_prepare_chat(self, conversations, add_generation_prompt=True, pad_to_multiple_of=None, padding_side="left"):
    if conversations and isinstance(conversations[0], dict):
        conversations = [conversations]
    images, counts, patches, grids = [], [], [], []
    for c in conversations:
        check_messages(c)
        counts.append([])
        for j, src in enumerate(images_of(c)):
            im = open_image(src, j)
            x, grid = self.image_processor.preprocess_one(im, j)
            images.append(im)
            patches.append(x)
            grids.append(grid)
            counts[-1].append(self.image_processor.num_image_tokens(grid))
    enc = old_batch_prompts(conversations, self.tokenizer, counts, padding_side, add_generation_prompt, self.family.chat_format)
    if pad_to_multiple_of:
        extra = -enc["input_ids"].shape[1] % int(pad_to_multiple_of)
        pad_id = self.tokenizer.pad_token_id or 0
        enc = {
            **enc,
            "input_ids": np.pad(enc["input_ids"], ((0, 0), (extra, 0)), constant_values=pad_id),
            "attention_mask": np.pad(enc["attention_mask"], ((0, 0), (extra, 0))),
            "system_spans": [[(a + extra, b + extra) for a, b in r] for r in enc["system_spans"]],
            "question_spans": [[(a + extra, b + extra) for a, b in r] for r in enc["question_spans"]],
        }
    pix = pixel_inputs(patches, grids) if images else {}
    batch = self.family.prepare_batch(
        self.config,
        enc["input_ids"],
        enc["attention_mask"],
        pix.get("pixel_values"),
        pix.get("image_grid_thw"),
        None,
        system_spans=enc["system_spans"],
        question_spans=enc["question_spans"],
    )
    return batch, {"texts": enc["texts"], "image_grid_thw": pix.get("image_grid_thw")}


def old_sft_example(model, sample, seq_len):
    proc, tok = model.image_processor, model.tokenizer
    pix = proc([sample["image"]])
    n_img = proc.num_image_tokens(pix["image_grid_thw"][0])
    conv = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample["question"]}]},
        {"role": "assistant", "content": sample["answer"]},
    ]
    chat = model.family.chat_format
    enc = build_prompt(conv[:1], tok, [n_img], chat=chat)
    prompt = enc["input_ids"]
    full = build_prompt(conv, tok, [n_img], add_generation_prompt=False, chat=chat)["input_ids"]
    labels = np.full(len(full), -100, np.int64)
    answer_end = len(full) - 1 if tok.decode(full[-1:]).strip() == "" else len(full)
    labels[len(prompt) : answer_end] = full[len(prompt) : answer_end]
    pad = seq_len - len(full)
    a, b = enc["system_span"]
    return {
        "input_ids": np.pad(full, (pad, 0)),
        "attention_mask": np.pad(np.ones_like(full), (pad, 0)),
        "labels": np.pad(labels, (pad, 0), constant_values=-100),
        "pixel_values": pix["pixel_values"],
        "image_grid_thw": pix["image_grid_thw"],
        "system_spans": [(a + pad, b + pad)] if b > a else [],
        "question_spans": [(x + pad, y + pad) for x, y in enc["question_spans"]],
    }


def old_make_batch(model, samples, seq_len):
    exs = [old_sft_example(model, s, seq_len) for s in samples]
    stack = lambda k: np.stack([e[k] for e in exs])
    batch = model.family.prepare_batch(
        model.config,
        stack("input_ids"),
        stack("attention_mask"),
        np.concatenate([e["pixel_values"] for e in exs]),
        np.concatenate([e["image_grid_thw"] for e in exs]),
        None,
        system_spans=[e["system_spans"] for e in exs],
        question_spans=[e["question_spans"] for e in exs],
    )
    return batch, stack("labels")


def old_grpo_prompts(model, samples, group_size, system=None):
    sys_turn = [] if system is None else [{"role": "system", "content": system}]
    convs = [
        sys_turn
        + [{"role": "user", "content": [{"type": "image", "image": s["image"]}, {"type": "text", "text": s["question"]}]}]
        for s in samples
        for _ in range(group_size)
    ]
    batch, info = old_prepare_chat(model, convs, pad_to_multiple_of=32)
    lay = batch.layout
    rep = [s for s in samples for _ in range(group_size)]
    boxes = {i: [s["box"]] for i, s in enumerate(rep)}
    sizes = {i: s["image"].size[::-1] for i, s in enumerate(rep)}
    w = model.family.region_weights(
        np.asarray(lay.image_index),
        np.asarray(lay.grid_pos),
        np.asarray(lay.grid_hw),
        boxes,
        sizes,
        np.asarray(info["image_grid_thw"]),
        model.config.vision.patch_size,
        model.config.vision.spatial_merge_size,
    )
    return batch, info, rep, w


def old_full_batch(model, prompt, info, tokens, lengths, region):
    import jax.numpy as jnp

    b, s = prompt.input_ids.shape
    t = tokens.shape[1]
    mask = np.arange(t)[None, :] < np.asarray(lengths)[:, None]
    ids = np.concatenate([np.asarray(prompt.input_ids), np.asarray(tokens)], 1)
    am = np.concatenate([np.asarray(prompt.attention_mask), mask.astype(np.asarray(prompt.attention_mask).dtype)], 1)
    batch = model.prepare(ids, am, np.asarray(prompt.pixel_values), np.asarray(info["image_grid_thw"]))
    pl = prompt.layout
    pad = lambda x, fill: np.concatenate([np.asarray(x), np.full((b, t), fill, np.asarray(x).dtype)], 1)
    lay = dataclasses.replace(
        batch.layout,
        system_mask=jnp.asarray(pad(pl.system_mask, False)),
        question_mask=jnp.asarray(pad(pl.question_mask, False)),
        generated_mask=jnp.asarray(np.concatenate([np.zeros((b, s), bool), mask], 1)),
        region_weight=jnp.asarray(pad(region, 0.0)),
    )
    return dataclasses.replace(batch, layout=lay), mask


def old_eval_batch(model, samples):
    convs = [
        ([] if s.get("_system") is None else [{"role": "system", "content": s["_system"]}])
        + [{"role": "user", "content": [{"type": "image", "image": s["image"]}, {"type": "text", "text": s["question"]}]}]
        for s in samples
    ]
    batch, info = old_prepare_chat(model, convs)
    lay = batch.layout
    grid = np.asarray(info["image_grid_thw"])
    boxes = {i: [s["box"]] for i, s in enumerate(samples) if s.get("box") is not None}
    sizes = {i: s["image"].size[::-1] for i, s in enumerate(samples)}
    if boxes:
        w = model.family.region_weights(
            np.asarray(lay.image_index),
            np.asarray(lay.grid_pos),
            np.asarray(lay.grid_hw),
            boxes,
            sizes,
            grid,
            model.config.vision.patch_size,
            model.config.vision.spatial_merge_size,
        )
        batch = dataclasses.replace(batch, layout=dataclasses.replace(lay, region_weight=w))
    return batch, info


# ----------------------------------------------------------------------------- (a) chat
def conversations(samples):
    a, b, c, d = samples
    return [
        [{"role": "user", "content": "Say something without an image ."}],
        [
            {"role": "system", "content": "be brief ."},
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": a["image"]},
                    {"type": "text", "text": "and"},
                    {"type": "image", "image": d["image"]},
                    {"type": "text", "text": a["question"]},
                ],
            },
        ],
        [
            {"role": "user", "content": [{"type": "image", "image": b["image"]}, {"type": "text", "text": b["question"]}]},
            {"role": "assistant", "content": b["answer"]},
            {"role": "user", "content": [{"type": "text", "text": "again:"}, {"type": "image", "image": c["image"]}]},
        ],
    ]


@pytest.mark.parametrize("side,bucket", [("left", None), ("left", 32), ("right", None)])
def test_chat_batch_equals_prepare_chat(model, samples, side, bucket):
    convs = conversations(samples)
    got, info = pipeline.chat_batch(model, convs, pad_to_multiple_of=bucket, padding_side=side)
    want, winfo = old_prepare_chat(model, convs, pad_to_multiple_of=bucket, padding_side=side)
    assert_same(got, want)
    assert info["texts"] == winfo["texts"]
    assert_same(info["image_grid_thw"], winfo["image_grid_thw"])
    assert len(info["image_grid_thw"]) == 4 and np.asarray(got.layout.system_mask).any(axis=1).all()
    if bucket:
        assert got.input_ids.shape[1] % bucket == 0
    pad_cols = np.asarray(got.attention_mask) == 0
    assert pad_cols.any() and (pad_cols[:, 0].any() if side == "left" else pad_cols[:, -1].any())
    if side == "left":  # Model.prepare_chat is the pipeline's left-padded chat batch
        assert_same(model.prepare_chat(convs, pad_to_multiple_of=bucket), (want, winfo))


def test_one_conversation_and_text_only(model):
    conv = [{"role": "user", "content": "hello there"}]
    got, info = model.prepare_chat(conv)
    want, winfo = old_prepare_chat(model, conv)
    assert_same(got, want)
    assert info["image_grid_thw"] is None and got.pixel_values is None


# ----------------------------------------------------------------------------- (b) tensors
@pytest.mark.parametrize("side", ["left", "right"])
def test_tensor_batch_equals_the_family_prepare_batch(model, samples, side):
    convs = conversations(samples)
    counts, patches, grids = pipeline.encode_images(model, convs)
    enc = old_batch_prompts(convs, model.tokenizer, counts, side, True, model.family.chat_format)
    pix = pixel_inputs(patches, grids)
    args = (enc["input_ids"], enc["attention_mask"], pix["pixel_values"], pix["image_grid_thw"])
    want = model.family.prepare_batch(model.config, *args, None, question_spans=enc["question_spans"])
    assert_same(pipeline.tensor_batch(model, *args, question_spans=enc["question_spans"]), want)
    assert_same(model.prepare(*args, question_spans=enc["question_spans"]), want)


# ----------------------------------------------------------------------------- (c) SFT
def test_sft_batch_equals_the_old_make_batch(model, samples):
    from jaxmm.train.sft import make_batch, sft_example

    want, wlabels = old_make_batch(model, samples, 160)
    exs = [
        pipeline.sft_example(model, pipeline.vqa_messages(s["question"], [s["image"]], answer=s["answer"]), 160) for s in samples
    ]
    got, labels = pipeline.sft_batch(model, exs)
    assert_same((got, labels), (want, wlabels))
    for s, e in zip(samples, exs):  # the per-example dicts too
        w = old_sft_example(model, s, 160)
        assert e["system_spans"] == w["system_spans"] and e["question_spans"] == w["question_spans"]
        assert_same(
            {k: e[k] for k in ("input_ids", "attention_mask", "labels", "pixel_values", "image_grid_thw")},
            {k: w[k] for k in ("input_ids", "attention_mask", "labels", "pixel_values", "image_grid_thw")},
        )
        assert_same(sft_example(model, s, 160)["labels"], w["labels"])
    ds = {i: s for i, s in enumerate(samples)}
    assert_same(make_batch(model, ds, 0, len(samples), 160), (want, wlabels))
    assert (labels != -100).any(axis=1).all()
    with pytest.raises(ValueError, match="exceed seq_len=20"):
        pipeline.sft_example(model, pipeline.vqa_messages("q", [samples[0]["image"]], answer="a"), 20)


# ----------------------------------------------------------------------------- (d) completions
def test_completion_batch_equals_the_old_full_batch(model, samples):
    from jaxmm.train.grpo import _prompts

    want_p, winfo, wrep, wregion = old_grpo_prompts(model, samples[:2], 2, system="be brief .")
    prompt, info, rep, region = _prompts(model, samples[:2], 2, "be brief .")
    assert_same((prompt, info["image_grid_thw"], region), (want_p, winfo["image_grid_thw"], wregion))
    assert rep == wrep and region.any()
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 50, (4, 6)).astype(np.int32)
    lengths = np.array([6, 1, 3, 4])
    got, mask = pipeline.completion_batch(model, prompt, info["image_grid_thw"], tokens, lengths, region)
    want, wmask = old_full_batch(model, want_p, winfo, tokens, lengths, wregion)
    assert_same((got, mask), (want, wmask))
    assert np.asarray(got.layout.generated_mask).sum() == lengths.sum()


# ----------------------------------------------------------------------------- eval's batches
def test_eval_batches_and_region_weights(model, samples):
    rows = [dict(s, _system=None) for s in samples[:3]] + [dict(samples[3], box=None, _system="be brief .")]
    want, winfo = old_eval_batch(model, rows)
    got, info = pipeline.chat_batch(model, [pipeline.vqa_messages(s["question"], [s["image"]], s["_system"]) for s in rows])
    boxes, sizes = pipeline.sample_boxes(rows)
    assert sorted(boxes) == [0, 1, 2]
    got = pipeline.with_region_weights(got, pipeline.region_weights(model, got.layout, info["image_grid_thw"], boxes, sizes))
    assert_same(got, want)
    w = np.asarray(got.layout.region_weight)
    assert w[:3].any(axis=1).all() and not w[3].any()


def test_stop_and_pad_ids(model):
    from jaxmm.stopping import stop_token_ids

    assert pipeline.stop_tokens(model) == stop_token_ids(model.config, model.tokenizer)
    assert pipeline.stop_tokens(model, chat=False) == stop_token_ids(model.config)
    assert pipeline.pad_token_id(model) == (model.tokenizer.pad_token_id or 0)


def test_padding_primitives():
    from jaxmm.processing.padding import pad_rows, padded_length, shift_spans

    v, m, off = pad_rows([[1, 2, 3], [4]], "left", 9, multiple_of=4)
    np.testing.assert_array_equal(v, [[9, 1, 2, 3], [9, 9, 9, 4]])
    np.testing.assert_array_equal(m, [[0, 1, 1, 1], [0, 0, 0, 1]])
    assert off == [1, 3] and v.dtype == np.int64 and m.dtype == np.int64
    v, m, off = pad_rows([[1, 2, 3], [4]], "right", 0, length=5)
    np.testing.assert_array_equal(v, [[1, 2, 3, 0, 0], [4, 0, 0, 0, 0]])
    assert off == [0, 0]
    assert shift_spans([[(0, 2)], []], [3, 1]) == [[(3, 5)], []]
    assert padded_length([5, 7], multiple_of=8) == 8 and padded_length([5], 6) == 6
    with pytest.raises(ValueError, match="exceeds the padded length 2"):
        pad_rows([[1, 2, 3]], length=2)
    with pytest.raises(ValueError, match="padding_side='middle'"):
        pad_rows([[1]], "middle")


# ----------------------------------------------------------------------------- another family
@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    """A tiny LLaVA checkpoint with its tokenizer, chat template and CLIP processor config."""
    import jaxmm
    from chat_fixtures import save_llava_chat_checkpoint

    return jaxmm.load(save_llava_chat_checkpoint(tmp_path_factory.mktemp("llava_chat")))


@pytest.mark.parametrize("side,bucket", [("left", None), ("left", 16), ("right", None)])
def test_llava_chat_batch_equals_prepare_chat(llava, samples, side, bucket):
    convs = conversations(samples)
    got, info = pipeline.chat_batch(llava, convs, pad_to_multiple_of=bucket, padding_side=side)
    want, winfo = old_prepare_chat(llava, convs, pad_to_multiple_of=bucket, padding_side=side)
    assert_same(got, want)
    assert info["texts"] == winfo["texts"] and np.asarray(got.pixel_values).shape[0] == 4
    if side == "left":
        assert_same(llava.prepare_chat(convs, pad_to_multiple_of=bucket), (want, winfo))
    rows = [dict(s, _system=None) for s in samples]
    boxes, sizes = pipeline.sample_boxes(rows)
    want, winfo = old_eval_batch(llava, rows)
    got, info = pipeline.chat_batch(llava, [pipeline.vqa_messages(s["question"], [s["image"]]) for s in rows])
    got = pipeline.with_region_weights(got, pipeline.region_weights(llava, got.layout, info["image_grid_thw"], boxes, sizes))
    assert_same(got, want)
    assert np.asarray(got.layout.region_weight).any(axis=1).all()
