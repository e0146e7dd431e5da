"""VAR ``variant="released"`` against a transcription of the authors' code (seilk/VisAttnSink).

The reference is transformers' eager attention patched with the released rule, written here from
``src/model/llava.py`` (lines 139-148, 313-316) and ``src/logic/logic.py`` (DimProspector lines
99-110, HeadFork 115-145, VARProcessor.attn_redist 163-212) in torch/numpy; not from jaxmm. The
sinks of a layer are read from that layer's input in the same (edited) forward, as the release does.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

import jaxmm
import tiny
from jaxmm import interventions as I
from jaxmm.models import qwen2_5_vl
from test_methods import compare, hf_run
from test_qwen2_5_vl_parity import make_batch

ROOT = Path(__file__).parents[1]
DIMS, TAU, START = (0, 1, 2, 3), 1.5, 1  # the tiny model has no massive activations: a low τ
SPEC = {"method": "var", "dims": list(DIMS), "tau": TAU, "start": START}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("released_var")
    hf_model = tiny.save_hf_model("gqa_untied", path, seed=7)
    model = jaxmm.load(path)
    raw = make_batch([["astronaut", "chelsea"], ["coffee"]], "left")  # row 0: two images
    return hf_model, model, raw, model.prepare(**raw)


def rmsnorm(hs, eps=1e-6):  # logic.py:99-102
    hs = hs.to(torch.float32)
    return hs * torch.rsqrt(hs.pow(2).mean(-1, keepdim=True) + eps)


def released_run(hf_model, raw, p=0.6, rho=0.5, summ=0.2, start=START):
    """The released rule, one prompt (batch row) at a time as the release runs it (batch size 1).
    Returns the patched forward's output and the sink indices per layer and row."""
    n = len(hf_model.model.language_model.layers)
    layers = list(range(n))[start:]  # logic.py:52 (layers [2:] there)
    ids = raw["input_ids"]
    im = [int(np.flatnonzero(r == tiny.IMAGE_TOKEN)[0]) for r in ids]  # begin_pos image
    pa = [int(np.flatnonzero(r == tiny.IMAGE_TOKEN)[-1]) + 1 - i for r, i in zip(ids, im)]  # vis_len
    indices = {}

    def prospect(module, args, layer):  # llava.py:313-316 -> logic.py:105-110
        if layer in layers:
            rms = torch.abs(rmsnorm(args[0]))
            vals = torch.stack([rms[:, :, d] for d in DIMS], dim=-1)
            indices[layer] = [torch.nonzero(vals.max(-1)[0][b] > TAU)[:, 0] for b in range(len(ids))]

    hooks = [
        layer.input_layernorm.register_forward_pre_hook(lambda m, a, i=i: prospect(m, a, i))
        for i, layer in enumerate(hf_model.model.language_model.layers)
    ]

    def edit(layer, z, a, allowed):
        if a is None or layer not in indices:
            return None, None
        a = a.clone()
        for b in range(a.shape[0]):
            i0, n_v = im[b], pa[b]
            sink = indices[layer][b]
            # HeadFork.run_logic, logic.py:122-139
            vis_sink = torch.stack([i for i in sink if i0 <= i < i0 + n_v]) if any(i0 <= i < i0 + n_v for i in sink) else None
            if vis_sink is None:
                continue
            image_attn = a[b, :, :, i0 : i0 + n_v]
            portion = image_attn[:, :, vis_sink - i0].sum(-1) / (image_attn + 1e-6).sum(-1)
            summation = image_attn.sum(-1)
            coord = torch.nonzero((portion <= rho) & (summation >= summ))  # [(head, query)]
            # VARProcessor.attn_redist, logic.py:177-211 (prefill: queries from im+pa on)
            for h in range(a.shape[1]):
                q = coord[coord[:, 0] == h][:, 1]
                q = q[i0 + n_v <= q]
                if not q.shape[0]:
                    continue
                sel = a[b, h, q, :].clone()
                vis_idx = sink[(i0 <= sink) & (sink < i0 + n_v)]
                text_idx = sink[~torch.isin(sink, vis_idx)]
                copied = sel.clone()
                sel[:, text_idx] *= p
                sel[:, vis_idx] *= p
                budget_vis = copied[:, vis_idx].sum(1) * (1 - p)
                budget_text = copied[:, text_idx].sum(1) * (1 - p)
                copied[:, vis_idx] *= 0
                ratios = copied[:, i0 : i0 + n_v] / copied[:, i0 : i0 + n_v].sum(1, keepdim=True)
                sel[:, i0 : i0 + n_v] += (budget_vis + budget_text).view(-1, 1) * ratios
                a[b, h, q, :] = sel
        return None, a

    try:
        out = hf_run(hf_model, raw, edit)
    finally:
        for hk in hooks:
            hk.remove()
    return out, indices


def test_released_var_matches_the_released_rule(setup):
    hf_model, model, raw, batch = setup
    ref, indices = released_run(hf_model, raw)
    img = raw["input_ids"] == tiny.IMAGE_TOKEN
    for layer in indices:  # the case the release differs on: image and text sinks in each row
        for b, s in enumerate(indices[layer]):
            s = s.numpy()
            assert img[b, s].any() and (~img[b, s] & raw["attention_mask"][b, s].astype(bool)).any()
    assert np.abs(ref.logits.numpy() - hf_run(hf_model, raw).logits.numpy()).max() > 1e-3
    ivs = I.build([dict(SPEC, variant="released")], model.config)
    compare(model, batch, raw, ref, ivs, range(3))
    # the stored sink sets (what decoding uses) are the release's, and give the same forward
    planned = jaxmm.attention.plan(model.params, model.config, batch, ivs, qwen2_5_vl.forward_jit)
    sinks = np.asarray(planned[0].sinks)
    am = raw["attention_mask"].astype(bool)
    for layer in indices:
        for b, s in enumerate(indices[layer]):
            want = np.zeros(am.shape[1], bool)
            want[s.numpy()] = True
            np.testing.assert_array_equal(sinks[layer, b] & am[b], want & am[b])
    compare(model, batch, raw, ref, planned, range(3))


def test_released_and_paper_readings_differ(setup):
    _, model, raw, batch = setup
    run = lambda spec: np.asarray(
        qwen2_5_vl.forward_jit(model.params, model.config, batch, I.build([spec], model.config), ()).logits
    )
    valid = raw["attention_mask"].astype(bool)
    paper, released = run(SPEC), run(dict(SPEC, variant="released"))
    plain = run({"method": "var"})  # no dims: no sinks, the model unchanged
    assert np.abs(paper - plain)[valid].max() > 1e-4 and np.abs(released - plain)[valid].max() > 1e-4
    assert np.abs(released - paper)[valid].max() > 1e-4
    # the release edits no query row before the span's end: the image rows keep the plain logits
    ends = [int(np.flatnonzero(r == tiny.IMAGE_TOKEN)[-1]) for r in raw["input_ids"]]
    for b, e in enumerate(ends):
        np.testing.assert_allclose(released[b, : e + 1][valid[b, : e + 1]], plain[b, : e + 1][valid[b, : e + 1]], atol=1e-5)
    assert max(np.abs(paper[b, : e + 1] - plain[b, : e + 1])[valid[b, : e + 1]].max() for b, e in enumerate(ends)) > 1e-4


def test_unknown_variant_is_refused(setup):
    _, model, _, _ = setup
    with pytest.raises(ValueError, match=r"variant='releasd'.*'paper', 'released'"):
        I.build(["var:variant=releasd"], model.config)


def test_released_config_builds_the_released_variant(setup):
    _, model, _, _ = setup
    (iv,) = I.build(str(ROOT / "configs/methods/var_released.yaml"), model.config)
    (paper,) = I.build(str(ROOT / "configs/methods/var.yaml"), model.config)
    assert isinstance(iv, I.VAR) and iv.variant == "released" and paper.variant == "paper"
    assert iv.layers == paper.layers == tuple(range(2, model.config.text.num_hidden_layers))
    knobs = lambda x: (x.tau, x.p, x.min_mass, x.max_share)
    assert knobs(iv) == knobs(paper) == (20.0, 0.6, 0.2, 0.5)
    (probe,) = iv.prefill_probes()
    assert probe.variant == "released"


def test_released_var_is_unchanged_by_query_chunks(setup):
    """The sink test reads the layer input of every key of the call, also when the explicit path
    runs in query chunks: chunked and unchunked forwards, stored sinks and generations agree."""
    import jaxmm.attention as A
    from jaxmm.generate import generate

    _, model, raw, batch = setup
    ivs = I.build([dict(SPEC, variant="released")], model.config)
    out = {}
    for chunk in (None, 7):
        with A.options(query_chunk=chunk):
            fwd = qwen2_5_vl.forward_jit(model.params, model.config, batch, ivs, ivs[0].prefill_probes())
            gen = generate(
                model.params, model.config, batch, max_new_tokens=3, stop_tokens=[], interventions=ivs, output_logits=True
            )
        out[chunk] = (
            np.asarray(fwd.logits),
            np.asarray(fwd.probes["var_sinks"]["text"].values),
            np.asarray(gen.tokens),
            np.asarray(gen.logits),
        )
    valid = raw["attention_mask"].astype(bool)
    assert out[None][1].any()
    np.testing.assert_allclose(out[7][0][valid], out[None][0][valid], atol=1e-5)
    np.testing.assert_array_equal(out[7][1], out[None][1])
    np.testing.assert_array_equal(out[7][2], out[None][2])
    np.testing.assert_allclose(out[7][3], out[None][3], atol=1e-5)
