"""Generation: greedy parity with transformers, KV cache vs recomputation, sampling, probe traces."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxmm
import jaxmm.attention as A
import tiny
from jaxmm import probes as P
from jaxmm.generate import Sampling, generate
from jaxmm.interventions import KeyLogitShift
from jaxmm.models import qwen2_5_vl
from test_qwen2_5_vl_parity import make_batch

NEW = 32


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen")
    hf_model = tiny.save_hf_model("gqa_untied", path, seed=3)
    model = jaxmm.load(path)
    raw = make_batch([["astronaut", "chelsea"], ["coffee"]], "left")  # padding + images of different sizes
    return hf_model, model, raw


def test_greedy_is_token_identical_to_transformers(setup):
    hf_model, model, raw = setup
    t = {k: torch.from_numpy(v) for k, v in raw.items()}
    with torch.no_grad():
        ref = hf_model.generate(
            **t,
            mm_token_type_ids=torch.from_numpy(tiny.mm_token_type_ids(raw["input_ids"])),
            max_new_tokens=NEW,
            do_sample=False,
            eos_token_id=1,
            pad_token_id=0,
        )
    ref_new = ref[:, raw["input_ids"].shape[1] :].numpy()
    out = generate(model.params, model.config, model.prepare(**raw), max_new_tokens=NEW, stop_tokens=[1], pad_token_id=0)
    tokens = np.asarray(out.tokens)
    assert tokens.shape == (2, NEW)
    np.testing.assert_array_equal(tokens[:, : ref_new.shape[1]], ref_new)
    assert (tokens[:, ref_new.shape[1] :] == 0).all()
    assert len(set(tokens[0].tolist())) > 3  # not a degenerate repetition


def _teacher_forced(model, raw, tokens, probes=()):
    ids = np.concatenate([raw["input_ids"], tokens], 1)
    am = np.concatenate([raw["attention_mask"], np.ones_like(tokens)], 1)
    return model.forward(
        input_ids=ids, attention_mask=am, pixel_values=raw["pixel_values"], image_grid_thw=raw["image_grid_thw"], probes=probes
    )


def test_kv_cache_logits_equal_full_recomputation(setup):
    _, model, raw = setup
    out = generate(model.params, model.config, model.prepare(**raw), max_new_tokens=NEW, stop_tokens=[], output_logits=True)
    tokens = np.asarray(out.tokens)
    full = np.asarray(_teacher_forced(model, raw, tokens).logits)
    s = raw["input_ids"].shape[1]
    # step t's logits predict token t, i.e. come from position s - 1 + t of the full sequence
    np.testing.assert_allclose(np.asarray(out.logits), full[:, s - 1 : s - 1 + NEW], atol=1e-4, rtol=0)


def test_sampling_is_reproducible_per_key(setup):
    _, model, raw = setup
    batch = model.prepare(**raw)
    samp = Sampling(temperature=1.0, top_k=50, top_p=0.9)
    run = lambda seed: np.asarray(
        generate(
            model.params, model.config, batch, max_new_tokens=16, sampling=samp, key=jax.random.PRNGKey(seed), stop_tokens=[]
        ).tokens
    )
    a, b, c = run(0), run(0), run(1)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    with pytest.raises(ValueError, match="PRNG key"):
        generate(model.params, model.config, batch, sampling=samp)


def test_probe_traces_equal_teacher_forced_forward(setup):
    _, model, raw = setup
    probes = (P.VisualMass(), P.VisualEntropy(), P.FocusRatio(layers=(0, 2)))
    iv = (KeyLogitShift(delta=0.5, layers=(1,)),)
    out = generate(
        model.params, model.config, model.prepare(**raw), max_new_tokens=12, stop_tokens=[], probes=probes, interventions=iv
    )
    tokens = np.asarray(out.tokens)
    ids = np.concatenate([raw["input_ids"], tokens], 1)
    am = np.concatenate([raw["attention_mask"], np.ones_like(tokens)], 1)
    s = raw["input_ids"].shape[1]
    batch = model.prepare(
        input_ids=ids, attention_mask=am, pixel_values=raw["pixel_values"], image_grid_thw=raw["image_grid_thw"]
    )
    ref = qwen2_5_vl.forward_jit(model.params, model.config, batch, iv, probes)
    for p in probes:
        got = out.probes[p.name]["text"]  # values [B, T_new, L, H]
        want = np.asarray(ref.probes[p.name]["text"].values)  # [L, B, H, S+T]
        assert got.layers == ref.probes[p.name]["text"].layers
        want = want[..., s : s + 12].transpose(1, 3, 0, 2)  # -> [B, T, L, H]
        np.testing.assert_allclose(np.asarray(got.values), want, rtol=1e-4, atol=1e-5, err_msg=p.name)


def test_generate_rejects_right_padding(setup):
    _, model, _ = setup
    raw = make_batch([["coffee"], []], "right")
    with pytest.raises(ValueError, match="LEFT-padded"):
        generate(model.params, model.config, model.prepare(**raw))


def test_chat_generation_with_tokenizer_beside_the_weights(setup, tmp_path):
    """Messages -> prompt via the saved tokenizer and chat template -> greedy text identical to
    transformers generating from the same prompt; streaming yields the same tokens."""
    from chat_fixtures import build_tokenizer
    from jaxmm.generate import stream
    from jaxmm.processing.chat import build_prompt

    hf_model, model, _ = setup
    tok = build_tokenizer(model.path)  # saved beside the weights
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=112 * 112 * 2).save_pretrained(model.path)
    model = jaxmm.load(model.path)
    photos = tiny.photos()
    convs = [
        [
            {
                "role": "user",
                "content": [{"type": "image", "image": photos["chelsea"]}, {"type": "text", "text": "describe the image ."}],
            }
        ],
        [
            {"role": "system", "content": "you are a helpful assistant ."},
            {
                "role": "user",
                "content": [{"type": "image", "image": photos["rocket"]}, {"type": "text", "text": "what color is the car ?"}],
            },
        ],
    ]
    out = model.generate(convs, max_new_tokens=16)
    assert len(out.text) == 2 and all(isinstance(t, str) for t in out.text)
    for conv, tokens, n, text in zip(convs, np.asarray(out.tokens), np.asarray(out.lengths), out.text):
        pix = model.image_processor([p["image"] for p in conv[-1]["content"] if p["type"] == "image"])
        prompt = build_prompt(conv, tok, [int(pix["image_grid_thw"][0].prod()) // 4])
        ids = torch.from_numpy(prompt["input_ids"][None])
        with torch.no_grad():
            ref = hf_model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                pixel_values=torch.from_numpy(pix["pixel_values"]),
                image_grid_thw=torch.from_numpy(pix["image_grid_thw"]),
                mm_token_type_ids=torch.from_numpy(tiny.mm_token_type_ids(ids.numpy())),
                max_new_tokens=16,
                do_sample=False,
                eos_token_id=1,
                pad_token_id=0,
            )
        ref_new = ref[0, ids.shape[1] :].numpy()
        np.testing.assert_array_equal(tokens[: len(ref_new)], ref_new)
        assert text == tok.decode(ref_new, skip_special_tokens=True)
    batch, _ = model.prepare_chat(convs)
    streamed = np.stack(list(stream(model.params, model.config, batch, max_new_tokens=16, stop_tokens=[1])), 1)
    np.testing.assert_array_equal(streamed, np.asarray(out.tokens)[:, : streamed.shape[1]])


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BoostFromPrefill(jaxmm.Intervention):
    """Two-phase test intervention: at prefill it shifts image logits by ``delta``; after prefill it
    re-plans per sample, delta ← 4 × (mean visual mass of the last prompt token)."""

    delta: jax.Array
    layers: tuple = dataclasses.field(default=None, metadata=dict(static=True))
    towers: tuple = dataclasses.field(default=("text",), metadata=dict(static=True))

    def logits(self, z, site):
        d = jnp.asarray(self.delta).reshape((-1, 1, 1, 1)) if jnp.ndim(self.delta) else self.delta
        return z + d * site.layout.image_mask[:, None, None, :]

    def after_prefill(self, probe_results, layout):
        m = probe_results["visual_mass"]["text"].values[:, :, :, -1]  # [L,B,H]
        return dataclasses.replace(self, delta=4.0 * m.mean(axis=(0, 2)))


def test_after_prefill_replans_inside_one_generate_call(setup):
    """generate() = prefill under the phase-1 intervention, re-plan from its probes, decode every
    step under the plan (checked against the same pieces composed by hand, step by step)."""
    from jaxmm.generate import batch_with, decode_step, extend_for_decoding, prefill

    _, model, raw = setup
    batch = model.prepare(**raw)
    iv = BoostFromPrefill(delta=jnp.float32(0.0))
    probes = (P.VisualMass(),)
    n = 10
    out = generate(
        model.params, model.config, batch, max_new_tokens=n, stop_tokens=[], interventions=(iv,), probes=probes, max_len=128
    )
    full = extend_for_decoding(batch, 128)
    _, cache, next_pos, pre = prefill(model.params, model.config, batch_with(batch, full), 128, (iv,), probes)
    planned = iv.after_prefill(pre.probes, full.layout)
    assert np.asarray(planned.delta).shape == (2,) and np.all(np.asarray(planned.delta) > 0)
    tokens = np.asarray(out.tokens)
    masses = []
    for t in range(n):
        step = decode_step(model.params, model.config, full, cache, jnp.asarray(tokens[:, t]), next_pos + t, (planned,), probes)
        cache = step.cache
        masses.append(np.asarray(step.probes["visual_mass"]["text"].values)[..., 0])  # [L,B,H]
        if t + 1 < n:
            np.testing.assert_array_equal(np.argmax(np.asarray(step.logits[:, 0]), -1), tokens[:, t + 1])
    want = np.stack(masses).transpose(2, 0, 1, 3)  # [B,T,L,H]
    np.testing.assert_allclose(np.asarray(out.probes["visual_mass"]["text"].values), want, rtol=1e-5, atol=1e-6)
    unplanned = generate(model.params, model.config, batch, max_new_tokens=n, stop_tokens=[], probes=probes)
    assert not np.allclose(np.asarray(unplanned.probes["visual_mass"]["text"].values), want)


def _shifted(raw, extra):
    """The same rows with ``extra`` more columns of left padding (a prompt ``extra`` tokens longer)."""
    pad = lambda x: np.concatenate([np.zeros((x.shape[0], extra), x.dtype), x], 1)
    return dict(raw, input_ids=pad(raw["input_ids"]), attention_mask=pad(raw["attention_mask"]))


def test_prompts_and_images_of_similar_size_share_one_program(setup, monkeypatch):
    """Bucketing: prompts of S and S+3 tokens, and a batch whose images have other patch counts,
    run one compiled generate (jit cache grows by one entry), and give the tokens and logits of a
    run without bucketing (prefill rows = S, vision inputs unpadded) at every real step."""
    import jaxmm.generate as G

    _, model, _ = setup
    raw = make_batch([["astronaut"], ["chelsea"]], "left")  # S = 36, 196 patches, 15 windows
    other = make_batch([["chelsea"], ["coffee"]], "left")  # S = 35, 192 patches, 12 windows
    batches = {"raw": raw, "longer": _shifted(raw, 3), "other images": other}
    assert len({G.bucket(b["input_ids"].shape[1], G.PROMPT_BUCKET) for b in batches.values()}) == 1
    assert len({b["input_ids"].shape[1] for b in batches.values()}) == 3
    assert other["pixel_values"].shape != raw["pixel_values"].shape
    kw = dict(max_new_tokens=6, stop_tokens=[], output_logits=True)
    run = lambda b: generate(model.params, model.config, model.prepare(**b), **kw)
    G.run_generation.clear_cache()
    bucketed = {k: run(b) for k, b in batches.items()}
    assert G.run_generation._cache_size() == 1, "prompts of one bucket compiled more than one program"
    monkeypatch.setattr(G, "PROMPT_BUCKET", 1)  # prefill rows = S exactly
    monkeypatch.setattr(G, "_reads_vision", lambda objs: True)  # no vision padding
    for k, b in batches.items():
        exact = run(b)
        np.testing.assert_array_equal(np.asarray(bucketed[k].tokens), np.asarray(exact.tokens), err_msg=k)
        ref = np.asarray(exact.logits)
        np.testing.assert_allclose(np.asarray(bucketed[k].logits), ref, atol=1e-6 * (1 + np.abs(ref).max()), rtol=0, err_msg=k)


def test_decoding_ends_when_every_row_has_stopped(setup):
    """Same tokens as decoding every step (cut at each row's first stop token, pad after), in
    fewer steps; the steps not run hold pad tokens and zero logits."""
    _, model, raw = setup
    batch = model.prepare(**raw)
    full = generate(model.params, model.config, batch, max_new_tokens=NEW, stop_tokens=[], output_logits=True)
    t = np.asarray(full.tokens)
    assert int(full.steps) == NEW
    stop = sorted({int(t[0, 2]), int(t[1, 4])})
    out = generate(model.params, model.config, batch, max_new_tokens=NEW, stop_tokens=stop, pad_token_id=0, output_logits=True)
    want = t.copy()
    for r in range(t.shape[0]):
        first = int(np.flatnonzero(np.isin(t[r], stop))[0])
        want[r, first + 1 :] = 0
    np.testing.assert_array_equal(np.asarray(out.tokens), want)
    steps = int(out.steps)
    assert steps == max(int(np.flatnonzero(np.isin(t[r], stop))[0]) for r in range(2)) + 1 < NEW
    np.testing.assert_allclose(np.asarray(out.logits)[:, :steps], np.asarray(full.logits)[:, :steps], atol=1e-5, rtol=0)
    assert not np.asarray(out.logits)[:, steps:].any()


def test_scanned_layers_equal_unrolled_layers(setup):
    """``layer_loop("scan")`` (one ``lax.scan`` over the stacked decoder layers) and ``"unrolled"``
    give the same logits in a forward and the same tokens and per-step logits in ``generate``
    (fp32: 1e-6 of the logits' scale); a probe makes the probed forward unroll either way; the last
    row's logits of a prefill (``logits_index``) equal that row of the full logits."""
    from jaxmm.models.core import model as M
    from jaxmm.models.core.model import forward

    _, model, raw = setup
    batch = model.prepare(**raw)
    runs = {}
    for mode in ("unrolled", "scan"):
        with M.layer_loop(mode):
            assert M.scans_layers((), (), False) == (mode == "scan")
            assert not M.scans_layers((), (P.VAS(),), False)
            with A.record_paths() as paths:
                jax.eval_shape(lambda: forward(model.params, model.config, batch))
            assert [(t, l) for t, l, _ in paths if t == "text"] == [("text", i) for i in range(3)]
            logits = np.asarray(model.forward(batch=batch).logits)
            last = np.asarray(forward(model.params, model.config, batch, logits_index=logits.shape[1] - 1).logits)
            gen = generate(model.params, model.config, batch, max_new_tokens=NEW, stop_tokens=[], output_logits=True)
            runs[mode] = logits, last, np.asarray(gen.tokens), np.asarray(gen.logits)
    (l_u, last_u, tok_u, gl_u), (l_s, last_s, tok_s, gl_s) = runs["unrolled"], runs["scan"]
    tol = lambda ref: 1e-6 * (1 + np.abs(ref).max())
    np.testing.assert_allclose(l_s, l_u, atol=tol(l_u), rtol=0)
    assert last_u.shape == (l_u.shape[0], 1, l_u.shape[2])
    np.testing.assert_allclose(last_u[:, 0], l_u[:, -1], atol=tol(l_u), rtol=0)
    np.testing.assert_allclose(last_s, last_u, atol=tol(l_u), rtol=0)
    np.testing.assert_array_equal(tok_s, tok_u)
    np.testing.assert_allclose(gl_s, gl_u, atol=tol(gl_u), rtol=0)
    with pytest.raises(ValueError, match="layer_loop"):
        with M.layer_loop("fast"):
            pass
    assert M.LAYER_LOOP == "unrolled" and not M.scans_layers((), (), False)  # the default


def test_suppressed_tokens_are_never_generated(setup):
    """``suppress_tokens``: greedy picks the best token that is not suppressed (the step logits
    returned are the model's, so numpy's masked argmax of them is the token); sampling never draws a
    suppressed id; ids outside the vocabulary are refused, naming the argument."""
    _, model, raw = setup
    batch = model.prepare(**raw)
    plain = generate(model.params, model.config, batch, max_new_tokens=8, stop_tokens=[], output_logits=True)
    banned = sorted({int(t) for t in np.asarray(plain.tokens)[:, :3].ravel()})
    out = generate(
        model.params, model.config, batch, max_new_tokens=8, stop_tokens=[], output_logits=True, suppress_tokens=banned
    )
    tokens, logits = np.asarray(out.tokens), np.asarray(out.logits).copy()
    assert not np.isin(tokens, banned).any()
    logits[..., banned] = -np.inf
    np.testing.assert_array_equal(tokens, logits.argmax(-1))
    sampled = generate(
        model.params,
        model.config,
        batch,
        max_new_tokens=16,
        stop_tokens=[],
        sampling=Sampling(temperature=2.0),
        key=jax.random.PRNGKey(1),
        suppress_tokens=banned,
    )
    assert not np.isin(np.asarray(sampled.tokens), banned).any()
    with pytest.raises(ValueError, match="suppress_tokens"):
        generate(model.params, model.config, batch, max_new_tokens=2, suppress_tokens=[model.config.text.vocab_size])


def test_vision_bucketing_adds_no_frame_attention(setup):
    """``pad_vision``: the patches grow to a multiple of 256 and window tables to a power of two
    segments, but a frame table (full attention over each image) keeps one segment per frame —
    an extra segment would cost a frame's whole attention — and every real patch keeps its slot."""
    from jaxmm.models.core.vision_inputs import pad_vision

    _, model, raw = setup
    batch = model.prepare(**raw)
    vis = batch.vision
    pv, padded = pad_vision(batch.pixel_values, vis, model.config.vision)
    n, n_b = np.shape(batch.pixel_values)[0], pv.shape[0]
    assert n_b % 256 == 0 and n_b > n
    assert padded.frames.index.shape[0] == vis.frames.index.shape[0]
    assert padded.frames.index.shape[1] % 64 == 0
    w = padded.windows.index.shape[0]
    assert w >= vis.windows.index.shape[0] + 1 and w & (w - 1) == 0
    for old, new in ((vis.frames, padded.frames), (vis.windows, padded.windows)):
        flat_old = np.asarray(old.index)[np.asarray(old.valid)]
        flat_new = np.asarray(new.index)[np.asarray(new.valid)][: len(flat_old)]
        np.testing.assert_array_equal(flat_new, flat_old)  # the real slots, in order
    assert not np.asarray(padded.frames.valid)[np.asarray(padded.frames.index) >= n].any()  # padding joins no frame
