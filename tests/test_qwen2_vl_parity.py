"""Qwen2-VL against transformers' Qwen2VLForConditionalGeneration (float32), through the same seam."""

import numpy as np
import pytest
import torch

import jaxmm
import tiny
from jaxmm import probes as P
from jaxmm.attention import AttentionWeights
from test_qwen2_5_vl_parity import _rename_keys, _to_v5_name, hf_forward, make_batch


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def ckpt(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2vl")
    model = tiny.build_hf_qwen2_vl(seed=4, tie=request.param)
    model.save_pretrained(path)
    return path, model


@pytest.mark.parametrize("images,side", [([["astronaut", "chelsea"], []], "left"), ([["coffee"], ["rocket", "camera"]], "right")])
def test_logits_hidden_states_attention_and_positions(ckpt, images, side):
    path, hf_model = ckpt
    batch = make_batch(images, side)
    ref = hf_forward(hf_model, batch)
    model = jaxmm.load(path)
    assert model.config.model_type == "qwen2_vl" and not hasattr(model.config.vision, "window_size")
    out = model.forward(**batch, probes=[AttentionWeights()], output_hidden_states=True)
    valid = batch["attention_mask"].astype(bool)
    assert np.abs(ref.logits.numpy()).max() > 1.0
    assert np.abs(np.asarray(out.logits) - ref.logits.numpy())[valid].max() < 1e-4
    for a, b in zip(out.hidden_states, ref.hidden_states):
        assert np.abs(np.asarray(a) - b.numpy())[valid].max() < 1e-4
    w = np.asarray(out.probes["attentions"]["text"].values)
    for i, r in enumerate(ref.attentions):
        assert np.abs(w[i] - r.numpy()).transpose(0, 2, 1, 3)[valid].max() < 1e-5
    ids = torch.from_numpy(batch["input_ids"])
    mm_types = torch.from_numpy(tiny.mm_token_type_ids(batch["input_ids"]))
    pos, deltas = hf_model.model.get_rope_index(
        ids,
        mm_token_type_ids=mm_types,
        image_grid_thw=torch.from_numpy(batch["image_grid_thw"]),
        attention_mask=torch.from_numpy(batch["attention_mask"]),
    )
    np.testing.assert_array_equal(np.asarray(model.prepare(**batch).position_ids), pos.numpy())


def test_v5_key_names_probes_and_methods(ckpt, tmp_path):
    path, _ = ckpt
    _rename_keys(path, tmp_path / "v5", _to_v5_name)
    a, b = jaxmm.load(path), jaxmm.load(tmp_path / "v5")
    batch = make_batch([["coffee"], ["chelsea"]], "left")
    np.testing.assert_array_equal(np.asarray(a.forward(**batch).logits), np.asarray(b.forward(**batch).logits))
    out = a.forward(**batch, probes=[P.VisualMass(), P.VAS(eps=1e-6)], interventions=["avar", "pai"])
    assert out.probes["visual_mass"]["text"].values.shape[0] == 2


def test_greedy_generation_matches_transformers(ckpt):
    from jaxmm.generate import generate

    path, hf_model = ckpt
    raw = make_batch([["astronaut"], ["coffee", "chelsea"]], "left")
    t = {k: torch.from_numpy(v) for k, v in raw.items()}
    with torch.no_grad():
        ref = hf_model.generate(
            **t,
            mm_token_type_ids=torch.from_numpy(tiny.mm_token_type_ids(raw["input_ids"])),
            max_new_tokens=16,
            do_sample=False,
            eos_token_id=1,
            pad_token_id=0,
        )
    model = jaxmm.load(path)
    out = generate(model.params, model.config, model.prepare(**raw), max_new_tokens=16, stop_tokens=[1])
    ref_new = ref[:, raw["input_ids"].shape[1] :].numpy()
    np.testing.assert_array_equal(np.asarray(out.tokens)[:, : ref_new.shape[1]], ref_new)
