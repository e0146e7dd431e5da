"""Qwen3-VL (dense) against transformers' Qwen3VLForConditionalGeneration (float32)."""

import numpy as np
import pytest
import torch

import jaxmm
import tiny
from jaxmm import probes as P
from jaxmm.attention import AttentionWeights
from jaxmm.processing.image import ImageProcessor
from test_qwen2_5_vl_parity import hf_forward


def qwen3_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    kw = dict(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return (
        Qwen2VLImageProcessorPil(min_pixels=32 * 32 * 4, max_pixels=128 * 128 * 2, **kw),
        ImageProcessor(
            min_pixels=32 * 32 * 4, max_pixels=128 * 128 * 2, patch_size=16, image_mean=(0.5,) * 3, image_std=(0.5,) * 3
        ),
    )


def make_batch(images_per_row, side):
    hf_proc, proc = qwen3_processor()
    photos = tiny.photos()
    rng = np.random.default_rng(7)
    rows, imgs = [], []
    for names in images_per_row:
        toks = [int(t) for t in rng.integers(3, 280, 3)]
        for n in names:
            g = proc([photos[n]])["image_grid_thw"][0]
            toks += tiny.image_span(int(g.prod()) // 4) + [int(t) for t in rng.integers(3, 280, 2)]
            imgs.append(photos[n])
        rows.append(toks + [int(t) for t in rng.integers(3, 280, 3)])
    ids, am = tiny.make_rows(rows, side)
    ref = hf_proc(imgs, return_tensors="np")
    mine = proc(imgs)
    np.testing.assert_array_equal(mine["pixel_values"], ref["pixel_values"])  # processor parity, patch 16
    return {"input_ids": ids, "attention_mask": am, "pixel_values": ref["pixel_values"], "image_grid_thw": ref["image_grid_thw"]}


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def ckpt(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3vl")
    model = tiny.build_hf_qwen3_vl(seed=5, tie=request.param)
    model.save_pretrained(path)
    return path, model


@pytest.mark.parametrize("images,side", [([["astronaut", "chelsea"], []], "left"), ([["coffee"], ["rocket", "camera"]], "right")])
def test_logits_hidden_states_attention_positions(ckpt, images, side):
    path, hf_model = ckpt
    batch = make_batch(images, side)
    ref = hf_forward(hf_model, batch)
    model = jaxmm.load(path)
    cfg = model.config
    assert cfg.model_type == "qwen3_vl" and cfg.text.qk_norm and cfg.text.mrope_interleaved
    assert cfg.vision.deepstack_visual_indexes == (0, 1)
    out = model.forward(**batch, probes=[AttentionWeights()], output_hidden_states=True)
    valid = batch["attention_mask"].astype(bool)
    assert np.abs(ref.logits.numpy()).max() > 1.0
    assert np.abs(np.asarray(out.logits) - ref.logits.numpy())[valid].max() < 1e-4
    for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        assert np.abs(np.asarray(a) - b.numpy())[valid].max() < 1e-4, f"hidden state {i}"
    w = np.asarray(out.probes["attentions"]["text"].values)
    for i, r in enumerate(ref.attentions):
        assert np.abs(w[i] - r.numpy()).transpose(0, 2, 1, 3)[valid].max() < 1e-5
    ids = torch.from_numpy(batch["input_ids"])
    pos, _ = hf_model.model.get_rope_index(
        ids,
        mm_token_type_ids=torch.from_numpy(tiny.mm_token_type_ids(batch["input_ids"])),
        image_grid_thw=torch.from_numpy(batch["image_grid_thw"]),
        attention_mask=torch.from_numpy(batch["attention_mask"]),
    )
    np.testing.assert_array_equal(np.asarray(model.prepare(**batch).position_ids), pos.numpy())


def test_methods_and_generation(ckpt):
    from jaxmm.generate import generate

    path, hf_model = ckpt
    raw = make_batch([["astronaut"], ["coffee", "chelsea"]], "left")
    model = jaxmm.load(path)
    out = model.forward(**raw, probes=[P.VisualEntropy()], interventions=["ration", "avar"])
    assert np.isfinite(np.asarray(out.logits)).all()
    t = {k: torch.from_numpy(v) for k, v in raw.items()}
    with torch.no_grad():
        ref = hf_model.generate(
            **t,
            mm_token_type_ids=torch.from_numpy(tiny.mm_token_type_ids(raw["input_ids"])),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=1,
            pad_token_id=0,
        )
    gen = generate(model.params, model.config, model.prepare(**raw), max_new_tokens=12, stop_tokens=[1])
    ref_new = ref[:, raw["input_ids"].shape[1] :].numpy()
    np.testing.assert_array_equal(np.asarray(gen.tokens)[:, : ref_new.shape[1]], ref_new)


def test_legacy_key_names_and_published_configs(ckpt, tmp_path):
    import json

    import yaml

    from jaxmm.models.qwen3_vl import Config
    from test_qwen2_5_vl_parity import _rename_keys

    path, _ = ckpt

    def legacy(k):
        if k.startswith("model.visual."):
            return k[len("model.") :]
        if k.startswith("model.language_model."):
            return "model." + k[len("model.language_model.") :]
        return k

    _rename_keys(path, tmp_path / "legacy", legacy)
    (tmp_path / "legacy" / "config.json").write_text((path / "config.json").read_text())
    batch = make_batch([["coffee"]], "left")
    a, b = jaxmm.load(path), jaxmm.load(tmp_path / "legacy")
    np.testing.assert_array_equal(np.asarray(a.forward(**batch).logits), np.asarray(b.forward(**batch).logits))
    from pathlib import Path

    for f in sorted(Path(__file__).parents[1].glob("configs/models/qwen3_vl_*.yaml")):
        cfg = Config.from_dict(yaml.safe_load(f.read_text()), source=str(f))
        assert cfg.text.qk_norm and cfg.vision.deepstack_visual_indexes, f
    assert len(list(Path(__file__).parents[1].glob("configs/models/qwen3_vl_*.yaml"))) == 4
    json.dumps(a.config.text.mrope_section)
