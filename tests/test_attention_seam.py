"""The attention seam: probes against numpy on transformers' eager attentions, the two paths,
primitive 7, chunking and gradients."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmm
import jaxmm.attention as A
import tiny
from jaxmm import probes as P
from jaxmm.attention import AttentionWeights, record_paths
from jaxmm.interventions import KeyBias, KeyLogitShift, KeyWeightScale
from jaxmm.models import qwen2_5_vl
from test_qwen2_5_vl_parity import hf_forward, make_batch


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("gqa")
    hf_model = tiny.save_hf_model("gqa_untied", path)
    model = jaxmm.load(path)
    raw = make_batch([["astronaut", "chelsea"], ["coffee"]], "left")
    ids, am = raw["input_ids"], raw["attention_mask"]
    starts = am.argmax(1)
    system = [[(int(s), int(s) + 2)] for s in starts]  # first two real tokens of each row
    question = [[(ids.shape[1] - 4, ids.shape[1])] for _ in starts]
    batch = model.prepare(**raw, system_spans=system, question_spans=question)
    ref = hf_forward(hf_model, raw)
    return model, raw, batch, ref


def np_attn(ref):
    return [a.numpy().astype(np.float64) for a in ref.attentions]  # L x [B,H,S,S]


def _probe_values(out, name):
    return np.asarray(out.probes[name]["text"].values, np.float64)


def test_probes_match_numpy_on_transformers_attentions(setup):
    model, raw, batch, ref = setup
    probes = [
        P.VisualMass(),
        P.VisualEntropy(),
        P.VisualEntropy(name="visual_entropy_norm", normalize=True),
        P.VAS(),
        P.FocusRatio(),
        P.EFR(),
        P.AttentionRows(positions=(-1, -3)),
    ]
    out = model.forward(batch=batch, probes=probes)
    lay = batch.layout
    V = np.asarray(lay.image_mask, bool)  # [B,K]
    S = np.asarray(lay.system_mask, bool)
    am = raw["attention_mask"].astype(bool)
    valid_q = am[:, None, :]  # compare at real query rows
    n_keys = np.cumsum(am, axis=1)[:, None, :]  # causal + padding: keys a query may see
    for layer, A in enumerate(np_attn(ref)):  # noqa: F402 (the weights' A of the papers)
        mV = (A * V[:, None, None]).sum(-1)
        mS = (A * S[:, None, None]).sum(-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            Ahat = np.where(V[:, None, None], A, 0) / mV[..., None]
            HV = -np.nansum(np.where(Ahat > 0, Ahat * np.log(Ahat), 0.0), -1)
            nV = V.sum(-1)[:, None, None]
            R = (mV / nV) / (A.sum(-1) / n_keys)
            expected = {
                "visual_mass": mV,
                "visual_entropy": HV,
                "visual_entropy_norm": HV / np.log(nV),
                "vas": mV / mS,
                "r_img": R,
                "efr": HV / R,
            }
        sees_image = valid_q & (mV > 0)  # queries after the first image token
        assert sees_image.sum() > 10 and (valid_q & (mV == 0)).sum() > 0
        for name, exp in expected.items():
            got = _probe_values(out, name)[layer]
            mask = sees_image if name != "vas" else np.broadcast_to(valid_q, got.shape)
            np.testing.assert_allclose(got[mask], exp[mask], rtol=1e-5, atol=1e-5, err_msg=f"{name} layer {layer}")
        # documented convention: no visible image key -> mass 0, entropy 0
        blind = valid_q & (mV == 0)
        assert np.all(_probe_values(out, "visual_entropy")[layer][blind] == 0)
        assert np.all(_probe_values(out, "visual_mass")[layer][blind] == 0)
        rows = _probe_values(out, "attention_rows")[layer]  # [B,H,2,K]
        last = am.shape[1] - 1
        np.testing.assert_allclose(rows[:, :, 0], A[:, :, last], atol=1e-6)
        np.testing.assert_allclose(rows[:, :, 1], A[:, :, last - 2], atol=1e-6)


def test_region_ratio_and_residual_update_match_numpy(setup):
    model, raw, batch, ref = setup
    from jaxmm.processing.regions import region_weights

    lay = batch.layout
    photos = tiny.photos()
    sizes = {i: photos[n].size[::-1] for i, n in enumerate(["astronaut", "chelsea", "coffee"])}  # (h, w)
    w = region_weights(
        np.asarray(lay.image_index),
        np.asarray(lay.grid_pos),
        np.asarray(lay.grid_hw),
        {0: [(100, 50, 300, 250)], 2: [(0, 0, 200, 150)]},
        sizes,
        raw["image_grid_thw"],
    )
    assert 0 < w.sum() < np.asarray(lay.image_mask).sum()
    batch = dataclasses.replace(batch, layout=dataclasses.replace(lay, region_weight=w))
    out = model.forward(batch=batch, probes=[P.RegionRatio(), P.ResidualUpdate()])
    V = np.asarray(lay.image_mask, bool)
    am = raw["attention_mask"].astype(bool)
    for layer, A in enumerate(np_attn(ref)):  # noqa: F402 (the weights' A of the papers)
        aR = (A * w[:, None, None]).sum(-1) / w.sum(-1)[:, None, None]
        aV = (A * V[:, None, None]).sum(-1) / V.sum(-1)[:, None, None]
        got = _probe_values(out, "region_ratio")[layer]
        mask = am[:, None, :] & (aV > 0)  # queries that see image keys
        assert mask.sum() > 10
        np.testing.assert_allclose(got[mask], (aR / aV)[mask], rtol=1e-5, atol=1e-5)
        h_in, h_out = (
            ref.hidden_states[layer].numpy().astype(np.float64),
            ref.hidden_states[layer + 1].numpy().astype(np.float64),
        )
        if layer + 1 == len(ref.hidden_states) - 1:
            continue  # transformers' last hidden state is after the final norm: not a layer output
        s = (np.abs(h_out - h_in).mean(-1) * V).sum(-1) / V.sum(-1)
        np.testing.assert_allclose(_probe_values(out, "residual_update")[layer], s, rtol=1e-5, atol=1e-6)


def _paths(model, batch, **kw):
    with record_paths() as paths:
        jax.eval_shape(lambda p: qwen2_5_vl.forward(p, model.config, batch, **kw), model.params)
    return [(t, l, p) for t, l, p in paths]


def test_path_choice_is_static_per_layer(setup):
    model, _, batch, _ = setup
    n = model.config.text.num_hidden_layers
    plain = A.plain_path()
    assert plain == ("matmul" if jax.default_backend() == "cpu" else "fused")
    none = _paths(model, batch)
    assert all(p == plain for _, _, p in none) and len(none) == n + model.config.vision.depth
    one = _paths(model, batch, probes=(P.VisualMass(layers=(1,)),))
    assert [(l, p) for t, l, p in one if t == "text"] == [(i, "explicit" if i == 1 else plain) for i in range(n)]
    assert all(p == plain for t, _, p in one if t == "vision")
    bias_only = _paths(model, batch, interventions=(KeyBias(delta=0.5),))
    assert all(p == plain for _, _, p in bias_only)
    logit_stage = _paths(model, batch, interventions=(KeyLogitShift(delta=0.5, layers=(0, 2)),))
    assert [p for t, _, p in logit_stage if t == "text"] == ["explicit", plain, "explicit"]
    for name in ("fused", "matmul"):
        with A.options(plain=name):
            assert {p for _, _, p in _paths(model, batch, interventions=(KeyBias(delta=0.5),))} == {name}
    with pytest.raises(ValueError, match="plain="):
        with A.options(plain="cudnn"):
            pass


def test_fused_function_runs_and_equals_matmul_and_explicit(setup, monkeypatch):
    """The fused path calls ``jax.nn.dot_product_attention`` itself (counted), on CPU too, and its
    logits equal the head-major matmul path and the explicit path (a no-op probe on every layer)."""
    model, _, batch, _ = setup
    calls = []
    real = jax.nn.dot_product_attention
    monkeypatch.setattr(jax.nn, "dot_product_attention", lambda *a, **k: calls.append(k) or real(*a, **k))
    valid = np.asarray(batch.attention_mask, bool)
    bias = (KeyBias(delta=jnp.array([0.3, -0.4])),)  # a bias stage keeps the plain path
    logits = {}
    for name in ("fused", "matmul"):
        with A.options(plain=name), record_paths() as paths:
            logits[name] = np.asarray(
                jax.jit(lambda p, b: qwen2_5_vl.forward(p, model.config, b, bias).logits)(model.params, batch)
            )
        assert {p for _, _, p in paths} == {name}
    n_layers = model.config.text.num_hidden_layers + model.config.vision.depth
    assert len(calls) == n_layers and all(
        k["implementation"] == ("xla" if jax.default_backend() == "cpu" else None) for k in calls
    )
    explicit = np.asarray(
        jax.jit(lambda p, b: qwen2_5_vl.forward(p, model.config, b, bias, (P.VisualMass(name="m"),)).logits)(model.params, batch)
    )
    # fp32: 1e-6 of the logits' scale, the bound of test_seam_invariance.py. XLA's generic attention
    # ([B,T,N,H] contractions, its own softmax) rounds differently from the head-major matmuls:
    # measured 5.7e-6 on logits up to 5.3 after 3 text layers and 4 vision blocks (matmul and
    # explicit agree to the bit); a wrong mask, scale or bias moves logits by 1e-3 and more.
    tol = 1e-6 * (1.0 + np.abs(logits["matmul"][valid]).max())
    np.testing.assert_allclose(logits["fused"][valid], logits["matmul"][valid], atol=tol, rtol=0)
    np.testing.assert_allclose(logits["fused"][valid], explicit[valid], atol=tol, rtol=0)


def test_no_interventions_no_probes_is_bit_identical(setup):
    model, _, batch, _ = setup
    base = np.asarray(model.forward(batch=batch).logits)
    untouched = np.asarray(
        model.forward(batch=batch, interventions=[KeyLogitShift(delta=1.0, layers=())], probes=[P.VisualMass(layers=())]).logits
    )
    np.testing.assert_array_equal(base, untouched)
    # a probe on one layer changes nothing in value either (explicit path, same numbers)
    probed = np.asarray(model.forward(batch=batch, probes=[P.VisualMass(layers=(1,))]).logits)
    valid = np.asarray(batch.attention_mask, bool)
    assert np.abs(probed - base)[valid].max() < 1e-5


def test_weight_scaling_equals_logit_shift_primitive_7(setup):
    model, _, batch, _ = setup
    c = 3.0
    valid = np.asarray(batch.attention_mask, bool)
    w = np.asarray(model.forward(batch=batch, interventions=[KeyWeightScale(scale=c)]).logits)
    z = np.asarray(model.forward(batch=batch, interventions=[KeyLogitShift(delta=np.log(c))]).logits)
    b = np.asarray(model.forward(batch=batch, interventions=[KeyBias(delta=np.log(c))]).logits)
    base = np.asarray(model.forward(batch=batch).logits)
    assert np.abs(w - base)[valid].max() > 1e-2  # the intervention does something
    np.testing.assert_allclose(w[valid], z[valid], atol=2e-5)
    np.testing.assert_allclose(b[valid], z[valid], atol=2e-5)


def test_per_sample_intervention_leaves(setup):
    model, _, batch, _ = setup
    both = np.asarray(model.forward(batch=batch, interventions=[KeyLogitShift(delta=jnp.array([0.0, 2.0]))]).logits)
    none = np.asarray(model.forward(batch=batch).logits)
    full = np.asarray(model.forward(batch=batch, interventions=[KeyLogitShift(delta=2.0)]).logits)
    valid = np.asarray(batch.attention_mask, bool)
    np.testing.assert_allclose(both[0][valid[0]], none[0][valid[0]], atol=2e-5)
    np.testing.assert_allclose(both[1][valid[1]], full[1][valid[1]], atol=2e-5)


def test_chunked_explicit_path_matches_unchunked(setup, monkeypatch):
    model, _, batch, _ = setup
    probes = (P.VisualMass(), P.VisualEntropy(), AttentionWeights(layers=(2,)), P.AttentionRows(positions=(-1, 5)))
    ivs = (KeyLogitShift(delta=0.7),)
    full = qwen2_5_vl.forward(model.params, model.config, batch, ivs, probes)
    import jaxmm.attention as A

    monkeypatch.setattr(A, "QUERY_CHUNK", 7)  # read at trace time
    chunked = qwen2_5_vl.forward(model.params, model.config, batch, ivs, probes)
    np.testing.assert_allclose(np.asarray(chunked.logits), np.asarray(full.logits), atol=1e-5)
    for name in ("visual_mass", "visual_entropy", "attentions", "attention_rows"):
        a, b = chunked.probes[name]["text"].values, full.probes[name]["text"].values
        assert a.shape == b.shape
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5, err_msg=name)


def test_grad_of_probe_loss_matches_finite_differences(setup):
    """d/dα of an AVAR-style loss (−log mean visual mass) through a logit-shift leaf, and along a
    random direction in parameter space."""
    model, _, batch, _ = setup

    def loss(alpha, params):
        out = qwen2_5_vl.forward(params, model.config, batch, (KeyLogitShift(delta=alpha),), (P.VisualMass(),))
        m = out.probes["visual_mass"]["text"].values  # [L,B,H,S]
        valid = batch.attention_mask[None, :, None, :]
        return -jnp.log(jnp.sum(m * valid) / jnp.sum(jnp.broadcast_to(valid, m.shape)))

    f = jax.jit(loss)
    g_alpha, g_params = jax.grad(f, argnums=(0, 1))(jnp.float32(0.3), model.params)
    eps = 1e-2
    fd = (f(0.3 + eps, model.params) - f(0.3 - eps, model.params)) / (2 * eps)
    np.testing.assert_allclose(float(g_alpha), float(fd), rtol=2e-3)
    assert abs(float(g_alpha)) > 1e-3

    key = jax.random.PRNGKey(0)
    leaves, tree = jax.tree_util.tree_flatten(model.params)
    keys = jax.random.split(key, len(leaves))
    direction = jax.tree_util.tree_unflatten(tree, [jax.random.normal(k, l.shape) for k, l in zip(keys, leaves)])
    along = sum(jnp.vdot(a, b) for a, b in zip(jax.tree_util.tree_leaves(g_params), jax.tree_util.tree_leaves(direction)))
    shifted = lambda s: jax.tree_util.tree_map(lambda p, d: p + s * d, model.params, direction)
    h = 1e-3
    fd_dir = (f(0.3, shifted(h)) - f(0.3, shifted(-h))) / (2 * h)
    np.testing.assert_allclose(float(along), float(fd_dir), rtol=2e-2)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LowRankBias(jaxmm.Intervention):
    """A RAVE-style pre-softmax bias on image keys from pre-RoPE q̃, k̃ (test-local)."""

    u: jax.Array  # [H, r, D]
    w: jax.Array  # [G, r, D]
    layers: tuple = dataclasses.field(default=(1,), metadata=dict(static=True))
    towers: tuple = dataclasses.field(default=("text",), metadata=dict(static=True))

    def bias(self, site):
        q, k = site.q_pre, site.k_pre  # [B,T,H,D], [B,K,G,D]
        rep = q.shape[2] // k.shape[2]
        uq = jnp.einsum("bthd,hrd->bhtr", q, self.u)
        wk = jnp.repeat(jnp.einsum("bkgd,grd->bgkr", k, self.w), rep, axis=1)
        b = jnp.einsum("bhtr,bhkr->bhtk", uq, wk) / np.sqrt(self.u.shape[1])
        return b * site.layout.image_mask[:, None, None, :]


def test_pre_rope_bias_keeps_fused_path_and_trains(setup):
    """RAVE's shape of intervention: bias from pre-RoPE q̃, k̃; the plain path (fused or matmul, never
    the explicit weights); grads reach its leaves."""
    model, _, batch, _ = setup
    t = model.config.text
    rng = np.random.default_rng(0)
    iv = LowRankBias(
        u=jnp.asarray(0.3 * rng.standard_normal((t.num_attention_heads, 4, t.head_dim)), jnp.float32),
        w=jnp.asarray(0.3 * rng.standard_normal((t.num_key_value_heads, 4, t.head_dim)), jnp.float32),
    )
    assert all(p == A.plain_path() for _, _, p in _paths(model, batch, interventions=(iv,)))
    valid = np.asarray(batch.attention_mask, bool)
    base = np.asarray(model.forward(batch=batch).logits)
    biased = np.asarray(model.forward(batch=batch, interventions=[iv]).logits)
    assert np.abs(biased - base)[valid].max() > 1e-3

    def loss(iv):
        out = qwen2_5_vl.forward(model.params, model.config, batch, (iv,), (P.VisualMass(layers=(2,)),))
        return jnp.sum(out.probes["visual_mass"]["text"].values * batch.attention_mask[None, :, None, :])

    g = jax.grad(loss)(iv)
    d = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), iv)
    along = float(jnp.vdot(g.u, d.u) + jnp.vdot(g.w, d.w))
    h = 1e-2
    step = lambda s: jax.tree_util.tree_map(lambda a, b: a + s * b, iv, d)
    fd = (loss(step(h)) - loss(step(-h))) / (2 * h)
    assert abs(along) > 1e-3
    np.testing.assert_allclose(along, float(fd), rtol=2e-2)


def test_box_to_token_indices_follows_the_cell_formula():
    from jaxmm.processing.regions import box_to_token_indices

    # a 560x280 (w x h) image resized to grid (1, 20, 40) patches: 28-px cells, 10 rows x 20 cols
    idx = box_to_token_indices((30, 0, 85, 27), (280, 560), (1, 20, 40))
    assert idx.tolist() == [1, 2, 3]  # cols floor(30/28)=1 .. floor(85/28)=3, row 0
    # original 1120x560 scaled by 1/2 onto the same grid: rows floor(60/2/28)=1 .. floor(119/2/28)=2
    idx = box_to_token_indices((0, 60, 56, 119), (560, 1120), (1, 20, 40))
    assert idx.tolist() == [20, 21, 40, 41]
    assert box_to_token_indices((0, 0, 10_000, 10_000), (280, 560), (1, 20, 40)).size == 200  # clamped
    with pytest.raises(ValueError, match="x0 <= x1"):
        box_to_token_indices((50, 0, 10, 10), (280, 560), (1, 20, 40))
