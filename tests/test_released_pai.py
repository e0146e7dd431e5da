"""PAI ``variant="released"`` against a transcription of the authors' code (LALBJ/PAI).

The reference is transformers' eager attention patched with the released edit, written here from
``attention.py`` (lines 73-75 and 90-94) and ``model_loader.py`` (lines 121-122), and the released
logits processor ``CFG.py`` (lines 28-58) in numpy; not from jaxmm.
"""

from pathlib import Path

import jax.numpy as jnp
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
ALPHA, START = 0.5, 1


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("released_pai")
    hf_model = tiny.save_hf_model("gqa_untied", path, seed=7)
    model = jaxmm.load(path)
    # right padding: the batch's last column is a padding query of row 1; row 0 holds two images
    raw = make_batch([["astronaut", "chelsea"], ["coffee"]], "right")
    return hf_model, model, raw, model.prepare(**raw)


@pytest.fixture(scope="module")
def left(setup):
    hf_model, model, _, _ = setup
    raw = make_batch([["astronaut", "chelsea"], ["coffee"]], "left")
    return hf_model, model, raw, model.prepare(**raw)


def released_edit(raw, alpha, start, end):
    """attention.py:73-75, 90-94 with model_loader.py:121-122: on layers start..end-1 the logits are
    clamped at the dtype minimum, then row -1 gets z + α|z| on keys img_start_idx:img_end_idx (here
    one span per row, from its first image token to its last)."""
    spans = []
    for row in raw["input_ids"]:
        img = np.flatnonzero(row == tiny.IMAGE_TOKEN)
        spans.append((int(img[0]), int(img[-1]) + 1))

    def edit(layer, z, a, allowed):
        if a is not None or not start <= layer < end:
            return None, None
        z = torch.maximum(z, torch.tensor(torch.finfo(z.dtype).min)).clone()
        for b, (s, e) in enumerate(spans):
            z[b, :, -1, s:e] = z[b, :, -1, s:e].abs() * alpha + z[b, :, -1, s:e]
        return z, None

    return edit


def test_released_pai_matches_the_released_edit(setup):
    hf_model, model, raw, batch = setup
    n = model.config.text.num_hidden_layers
    ref = hf_run(hf_model, raw, released_edit(raw, ALPHA, START, n))
    assert np.abs(ref.logits.numpy()[0] - hf_run(hf_model, raw).logits.numpy()[0]).max() > 1e-3
    compare(model, batch, raw, ref, I.build([f"pai:alpha={ALPHA},start={START},variant=released"], model.config), range(n))


def _logits(model, batch, spec):
    return np.asarray(qwen2_5_vl.forward_jit(model.params, model.config, batch, I.build(spec, model.config), ()).logits)


def test_released_and_paper_readings_differ(setup):
    """Row 0 (two images): the span also lifts the text between the images. Row 1 (right-padded):
    the released edit hits the padding column, so its real tokens are those of the unedited model."""
    _, model, raw, batch = setup
    valid = raw["attention_mask"].astype(bool)
    plain = _logits(model, batch, [])
    paper = _logits(model, batch, [f"pai:alpha={ALPHA},start={START}"])
    released = _logits(model, batch, [f"pai:alpha={ALPHA},start={START},variant=released"])
    assert np.abs(released[0] - paper[0]).max() > 1e-3
    np.testing.assert_allclose(released[1][valid[1]], plain[1][valid[1]], atol=1e-5)
    assert np.abs(paper[1][valid[1]] - plain[1][valid[1]]).max() > 1e-3


def np_cfg_logits(scores, uncond, gamma):
    """CFG.py:28-58 (CFGLogits.__call__) on raw next-token logits of both passes."""
    log_softmax = lambda x: x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)
    scores = log_softmax(scores)
    if gamma == 1:
        return scores
    unconditional = log_softmax(uncond)
    cutoff = np.log(0.1) + scores.max(-1, keepdims=True)
    out = gamma * (scores - unconditional) + unconditional
    return np.where(scores < cutoff, -np.inf, out)


@pytest.mark.parametrize("gamma", [1.0, 1.1, 2.0])
def test_released_contrast_matches_the_released_logits_processor(gamma):
    rng = np.random.default_rng(0)
    mm, tx = rng.normal(0, 3, (2, 3, 50)).astype(np.float32), rng.normal(0, 3, (2, 3, 50)).astype(np.float32)
    want = np_cfg_logits(mm.astype(np.float64), tx.astype(np.float64), gamma)
    got = np.asarray(I.pai_contrast(jnp.asarray(mm), jnp.asarray(tx), gamma=gamma, variant="released"))
    assert (np.isinf(got) == np.isinf(want)).all()
    np.testing.assert_allclose(got[np.isfinite(want)], want[np.isfinite(want)], atol=1e-5)
    paper = np.asarray(I.pai_contrast(jnp.asarray(mm), jnp.asarray(tx), gamma=gamma))
    if gamma == 1:  # the paper reading keeps the cutoff at γ = 1, the release skips it
        assert np.isinf(paper).any() and not np.isinf(got).any()
    else:
        np.testing.assert_array_equal(paper, got)


def test_released_with_the_contrast_edits_generated_tokens_only(left):
    """With --use-cfg the release's prefill runs with the edit switched off (attention.py:90,125;
    CFG.py:32-33,48-49): the first step's logits are the plain model's, and the step that feeds token
    0 is the release's forward over prompt + token 0 with row -1 edited."""
    from jaxmm.generate import generate

    hf_model, model, raw, batch = left
    n = model.config.text.num_hidden_layers
    ivs = I.build([f"pai:alpha={ALPHA},start={START},variant=released,use_cfg=true"], model.config)
    valid = raw["attention_mask"].astype(bool)
    np.testing.assert_allclose(_logits(model, batch, ivs)[valid], _logits(model, batch, [])[valid], atol=1e-5)
    run = lambda ivs_: generate(
        model.params, model.config, batch, max_new_tokens=2, stop_tokens=[], interventions=ivs_, output_logits=True
    )
    out, plain = run(ivs), run(())
    np.testing.assert_allclose(np.asarray(out.logits[:, 0]), np.asarray(plain.logits[:, 0]), atol=1e-5)
    tok = np.asarray(out.tokens)[:, :1]
    assert not np.isin(tok, [tiny.IMAGE_TOKEN, tiny.VIDEO_TOKEN, tiny.VISION_START, tiny.VISION_END]).any()
    ext = dict(
        raw,
        input_ids=np.concatenate([raw["input_ids"], tok], 1),
        attention_mask=np.concatenate([raw["attention_mask"], np.ones_like(tok)], 1),
    )
    ref = hf_run(hf_model, ext, released_edit(ext, ALPHA, START, n)).logits.numpy()[:, -1]
    assert np.abs(ref - hf_run(hf_model, ext).logits.numpy()[:, -1]).max() > 1e-3
    np.testing.assert_allclose(np.asarray(out.logits[:, 1]), ref, atol=1e-4)
    with pytest.raises(ValueError, match="use_cfg=True applies to variant='released' only"):
        I.build(["pai:use_cfg=true"], model.config)


def test_unknown_variant_is_refused(setup):
    _, model, _, _ = setup
    with pytest.raises(ValueError, match=r"variant='releasd'.*'paper', 'released'"):
        I.build(["pai:variant=releasd"], model.config)
    with pytest.raises(ValueError, match=r"variant='x'.*'paper', 'released'"):
        I.pai_contrast(jnp.zeros((1, 3)), jnp.zeros((1, 3)), variant="x")


def test_released_config_builds_the_released_variant(setup):
    _, model, _, _ = setup
    (iv,) = I.build(str(ROOT / "configs/methods/pai_released.yaml"), model.config)
    (paper,) = I.build(str(ROOT / "configs/methods/pai.yaml"), model.config)
    assert isinstance(iv, I.PAI) and iv.variant == "released" and paper.variant == "paper" and not iv.use_cfg
    assert iv.layers == paper.layers == tuple(range(2, model.config.text.num_hidden_layers))
    assert float(iv.alpha) == float(paper.alpha) == 0.2
