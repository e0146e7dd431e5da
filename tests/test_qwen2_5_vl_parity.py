"""jaxmm Qwen2.5-VL against transformers' PyTorch implementation (the oracle), float32.

Tiny random checkpoints are built and saved with ``save_pretrained``, loaded with ``jaxmm.load``,
and fed the HF image processor's outputs for real photos from scikit-image.
"""

import json
import re

import numpy as np
import pytest
import torch

import jaxmm
import tiny
from jaxmm.attention import AttentionWeights
from jaxmm.checkpoint.hf import CheckpointError

MAX_PIXELS = 112 * 112 * 2  # keep images small: a few dozen patches each


@pytest.fixture(scope="module", params=sorted(tiny.CONFIGS))
def ckpt(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    model = tiny.save_hf_model(request.param, path)
    return request.param, path, model


def hf_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=MAX_PIXELS)


def make_batch(images_per_row, padding_side):
    """Rows of text with 0, 1 or 2 real photos each; returns HF-style numpy inputs."""
    photos = tiny.photos()
    proc = hf_processor()
    rng = np.random.default_rng(len(images_per_row))
    rows, all_images = [], []
    for names in images_per_row:
        toks = [int(t) for t in rng.integers(3, 280, size=3)]
        for name in names:
            out = proc([photos[name]], return_tensors="np")
            n = int(out["image_grid_thw"][0].prod()) // 4
            toks += tiny.image_span(n) + [int(t) for t in rng.integers(3, 280, size=2)]
            all_images.append(photos[name])
        toks += [int(t) for t in rng.integers(3, 280, size=4)]
        rows.append(toks)
    ids, am = tiny.make_rows(rows, padding_side)
    batch = {"input_ids": ids, "attention_mask": am}
    if all_images:
        out = proc(all_images, return_tensors="np")
        batch["pixel_values"] = out["pixel_values"]
        batch["image_grid_thw"] = out["image_grid_thw"]
    return batch


def hf_forward(model, batch):
    t = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}
    with torch.no_grad():
        return model(
            **t,
            mm_token_type_ids=torch.from_numpy(tiny.mm_token_type_ids(batch["input_ids"])),
            output_hidden_states=True,
            output_attentions=True,
        )


BATCHES = {
    "two_images_and_text_only_left": ([["astronaut", "chelsea"], []], "left"),
    "one_and_two_images_right": ([["coffee"], ["rocket", "camera"]], "right"),
}


@pytest.mark.parametrize("batch_name", sorted(BATCHES))
def test_logits_hidden_states_and_attention_match_transformers(ckpt, batch_name):
    name, path, hf_model = ckpt
    batch = make_batch(*BATCHES[batch_name])
    ref = hf_forward(hf_model, batch)
    model = jaxmm.load(path)
    n_layers = tiny.CONFIGS[name]["text"]["num_hidden_layers"]
    out = model.forward(**batch, probes=[AttentionWeights()], output_hidden_states=True)
    valid = batch["attention_mask"].astype(bool)

    logits = np.asarray(out.logits)
    assert logits.shape == tuple(ref.logits.shape)
    assert np.abs(ref.logits.numpy()).max() > 1.0  # the check below is not vacuous
    np.testing.assert_array_less(np.abs(logits - ref.logits.numpy())[valid].max(), 1e-4)

    assert len(out.hidden_states) == len(ref.hidden_states) == n_layers + 1
    for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        err = np.abs(np.asarray(a) - b.numpy())[valid].max()
        assert err < 1e-4, f"hidden state {i}: max abs error {err}"

    probe = out.probes["attentions"]["text"]
    assert probe.layers == tuple(range(n_layers))
    weights = np.asarray(probe.values)  # [L,B,H,S,S]
    for i, ref_w in enumerate(ref.attentions):
        err = np.abs(weights[i] - ref_w.numpy()).transpose(0, 2, 1, 3)[valid].max()
        assert err < 1e-5, f"attention weights of layer {i}: max abs error {err}"


def test_fused_path_matches_explicit_path(ckpt):
    _, path, _ = ckpt
    batch = make_batch([["chelsea"], ["astronaut"]], "left")
    model = jaxmm.load(path)
    fused = np.asarray(model.forward(**batch).logits)
    explicit = np.asarray(model.forward(**batch, probes=[AttentionWeights()]).logits)
    valid = batch["attention_mask"].astype(bool)
    assert np.abs(fused - explicit)[valid].max() < 1e-5


def _rename_keys(src, dst, fn):
    from safetensors.numpy import load_file, save_file

    dst.mkdir()
    tensors = load_file(src / "model.safetensors")
    save_file({fn(k): v for k, v in tensors.items()}, dst / "model.safetensors")
    (dst / "config.json").write_text((src / "config.json").read_text())


def _to_v5_name(k):
    if k.startswith("visual."):
        return "model." + k
    if k.startswith("model."):
        return "model.language_model." + k[len("model.") :]
    return k


def test_transformers5_key_names_load_identically(ckpt, tmp_path):
    _, path, _ = ckpt
    _rename_keys(path, tmp_path / "v5", _to_v5_name)
    a, b = jaxmm.load(path), jaxmm.load(tmp_path / "v5")
    batch = make_batch([["coffee"]], "left")
    np.testing.assert_array_equal(np.asarray(a.forward(**batch).logits), np.asarray(b.forward(**batch).logits))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoint_loads(tmp_path, dtype):
    from transformers import Qwen2_5_VLForConditionalGeneration

    tiny.save_hf_model("gqa_untied", tmp_path, dtype=dtype)
    ref_model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ref_model.config._attn_implementation = "eager"
    batch = make_batch([["chelsea"], []], "left")
    ref = hf_forward(ref_model, batch)
    out = jaxmm.load(tmp_path, dtype="float32").forward(**batch)
    valid = batch["attention_mask"].astype(bool)
    assert np.abs(np.asarray(out.logits) - ref.logits.numpy())[valid].max() < 1e-4
    # and as a bfloat16 model: runs, and stays near the float32 result
    low = jaxmm.load(tmp_path, dtype="bfloat16")
    assert jaxmm.load(tmp_path, dtype="bfloat16").dtype == np.dtype("bfloat16")
    lo = np.asarray(low.forward(**batch).logits, np.float32)
    assert np.abs(lo - ref.logits.numpy())[valid].max() < 0.25 * np.abs(ref.logits.numpy()).max()


def test_truncated_checkpoint_names_the_file(ckpt, tmp_path):
    _, path, _ = ckpt
    bad = tmp_path / "bad"
    bad.mkdir()
    data = (path / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) - 1000])
    (bad / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(CheckpointError, match="model.safetensors"):
        jaxmm.load(bad)


def test_missing_tensor_is_named(ckpt, tmp_path):
    from safetensors.numpy import load_file, save_file

    _, path, _ = ckpt
    bad = tmp_path / "bad"
    bad.mkdir()
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, bad / "model.safetensors")
    (bad / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"language_model\.layers\.1\.self_attn\.k_proj"):
        jaxmm.load(bad)


def test_config_that_does_not_match_weights_is_reported(ckpt, tmp_path):
    _, path, _ = ckpt
    bad = tmp_path / "bad"
    bad.mkdir()
    cfg = json.loads((path / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] += 8
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "model.safetensors").symlink_to(path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"mlp\.gate_proj"):
        jaxmm.load(bad)


def test_pickle_checkpoints_are_refused(tmp_path):
    tiny.hf_config("gqa_untied").save_pretrained(tmp_path)  # a complete config.json: no 7B defaults now
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="safetensors"):
        jaxmm.load(tmp_path)


def test_forward_rejects_inconsistent_inputs(ckpt):
    _, path, _ = ckpt
    model = jaxmm.load(path)
    batch = make_batch([["chelsea"]], "left")
    with pytest.raises(ValueError, match="pixel_values"):
        model.forward(**{**batch, "pixel_values": batch["pixel_values"][:-4]})
    with pytest.raises(ValueError, match="attention_mask"):
        model.forward(**{**batch, "attention_mask": batch["attention_mask"][:, 1:]})
    ids = batch["input_ids"].copy()
    ids[0, np.argmax(ids[0] == tiny.IMAGE_TOKEN)] = 5
    with pytest.raises(ValueError, match="image tokens"):
        model.forward(**{**batch, "input_ids": ids})


def test_sharded_checkpoint_loads(tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration  # noqa: F401

    model = tiny.build_hf_model("mha_tied", seed=5)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    batch = make_batch([["rocket"], ["chelsea"]], "left")
    ref = hf_forward(model, batch)
    out = jaxmm.load(tmp_path).forward(**batch)
    valid = batch["attention_mask"].astype(bool)
    assert np.abs(np.asarray(out.logits) - ref.logits.numpy())[valid].max() < 1e-4
    # an index naming a shard that is gone
    next(tmp_path.glob("model-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="does not exist"):
        jaxmm.load(tmp_path)


def hf_generate_position_ids(model, batch):
    """The position ids HF's ``generate()`` feeds its language model on the prefill: [4,B,S] =
    [text; t; h; w] in transformers 5.x (read with a forward pre-hook on ``model.model.language_model``)."""
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda mod, args, kw: seen.append(kw["position_ids"].clone()), with_kwargs=True
    )
    t = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}
    try:
        with torch.no_grad():
            model.generate(
                **t,
                mm_token_type_ids=torch.from_numpy(tiny.mm_token_type_ids(batch["input_ids"])),
                max_new_tokens=1,
                do_sample=False,
            )
    finally:
        hook.remove()
    return seen[0].numpy()


def test_hf_four_row_position_ids_give_the_same_logits(ckpt):
    _, path, hf_model = ckpt
    batch = make_batch([["chelsea"], []], "left")
    hf_pos = hf_generate_position_ids(hf_model, batch)
    assert hf_pos.shape == (4,) + batch["input_ids"].shape
    valid = batch["attention_mask"].astype(bool)
    assert (hf_pos[0] != hf_pos[1])[valid].any()  # the text row is not an M-RoPE row: dropping it matters
    model = jaxmm.load(path)
    np.testing.assert_array_equal(
        np.asarray(model.prepare(**batch, position_ids=hf_pos).position_ids), np.asarray(model.prepare(**batch).position_ids)
    )
    base = np.asarray(model.forward(**batch).logits)
    for pos in (hf_pos, torch.from_numpy(hf_pos), hf_pos[1:]):
        got = np.asarray(model.forward(**batch, position_ids=pos).logits)
        np.testing.assert_allclose(got[valid], base[valid], rtol=0, atol=1e-6)
    wrong = np.asarray(model.forward(**batch, position_ids=hf_pos[:3]).logits)  # text row taken as t
    assert np.abs(wrong - base)[valid].max() > 1e-3


def test_position_ids_of_the_wrong_shape_are_named(ckpt):
    _, path, _ = ckpt
    model = jaxmm.load(path)
    batch = make_batch([["chelsea"], []], "left")
    b, s = batch["input_ids"].shape
    pos = np.asarray(model.prepare(**batch).position_ids)
    for bad in (
        np.zeros((5, b, s), np.int64),
        np.zeros((3, b, s + 1), np.int64),
        np.zeros((4, b, s - 1), np.int64),
        np.zeros((b, s + 1), np.int64),
    ):
        with pytest.raises(
            ValueError,
            match=rf"position_ids: expected \[3,B,S\]=\(3, {b}, {s}\), HF's "
            rf"\[4,B,S\]=\(4, {b}, {s}\) .*or \[B,S\]=\({b}, {s}\).*"
            rf"got {re.escape(str(bad.shape))}",
        ):
            model.forward(**batch, position_ids=bad)
    with pytest.raises(ValueError, match="position_ids: expected an integer array"):
        model.forward(**batch, position_ids=pos.astype(np.float32))
