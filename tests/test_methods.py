"""The training-free methods against independent implementations of methods.md's formulas.

The reference is transformers itself with its eager attention patched to apply each formula,
written here in torch/numpy from methods.md (not from jaxmm): edited weights and the resulting
logits must match. Phase-1 plans (RATION's ranking/route/τ, VRGA's heads and focus tokens) are
recomputed in numpy from transformers' unedited attentions and hidden states.
"""

import contextlib
import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxmm
import tiny
from jaxmm import interventions as I
from jaxmm.attention import AttentionWeights
from jaxmm.models import qwen2_5_vl
from test_qwen2_5_vl_parity import make_batch

MOD = "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("methods")
    hf_model = tiny.save_hf_model("gqa_untied", path, seed=7)
    model = jaxmm.load(path)
    raw = make_batch([["astronaut", "chelsea"], ["coffee"]], "left")
    ids, am = raw["input_ids"], raw["attention_mask"]
    s = ids.shape[1]
    starts = am.argmax(1)
    system = [[(int(b), int(b) + 2)] for b in starts]
    question = [[(s - 6, s - 3)] for _ in starts]
    batch = model.prepare(**raw, system_spans=system, question_spans=question)
    return hf_model, model, raw, batch


@contextlib.contextmanager
def patched_eager(edit, mod=MOD):
    """transformers' eager attention (of module ``mod``) with ``edit(layer, z, a, mask) ->
    (z_or_None, a_or_None)`` applied in the text decoder (modules with a ``layer_idx``)."""
    import importlib

    m = importlib.import_module(mod)
    orig = m.eager_attention_forward

    def eager(module, query, key, value, attention_mask, scaling, dropout=0.0, **kw):
        if getattr(module, "layer_idx", None) is None:
            return orig(module, query, key, value, attention_mask, scaling, dropout, **kw)
        k = m.repeat_kv(key, module.num_key_value_groups)
        v = m.repeat_kv(value, module.num_key_value_groups)
        z = torch.matmul(query, k.transpose(2, 3)) * scaling
        allowed = attention_mask == 0 if attention_mask is not None else torch.ones_like(z, dtype=torch.bool)
        z = z + attention_mask if attention_mask is not None else z
        z2, _ = edit(module.layer_idx, z, None, allowed)
        z = z if z2 is None else z2
        a = torch.softmax(z, dim=-1, dtype=torch.float32)
        _, a2 = edit(module.layer_idx, z, a, allowed)
        a = a if a2 is None else a2
        return torch.matmul(a, v).transpose(1, 2).contiguous(), a

    m.eager_attention_forward = eager
    try:
        yield
    finally:
        m.eager_attention_forward = orig


def hf_run(hf_model, raw, edit=None, hidden=False):
    t = {k: torch.from_numpy(v) for k, v in raw.items() if k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}
    ctx = patched_eager(edit) if edit else contextlib.nullcontext()
    with ctx, torch.no_grad():
        return hf_model(
            **t,
            mm_token_type_ids=torch.from_numpy(tiny.mm_token_type_ids(raw["input_ids"])),
            output_attentions=True,
            output_hidden_states=hidden,
        )


def compare(model, batch, raw, ref, ivs, layers):
    out = qwen2_5_vl.forward_jit(model.params, model.config, batch, tuple(ivs), (AttentionWeights(),))
    valid = raw["attention_mask"].astype(bool)
    err = np.abs(np.asarray(out.logits) - ref.logits.numpy())[valid].max()
    assert err < 1e-4, f"logits differ by {err}"
    w = np.asarray(out.probes["attentions"]["text"].values)
    for l in layers:
        e = np.abs(w[l] - ref.attentions[l].numpy()).transpose(0, 2, 1, 3)[valid].max()
        assert e < 1e-5, f"edited weights of layer {l} differ by {e}"
    return out


def masks(batch):
    lay = batch.layout
    return (
        torch.from_numpy(np.asarray(lay.image_mask)).float()[:, None, None, :],
        torch.from_numpy(np.asarray(lay.system_mask)).float()[:, None, None, :],
    )


def test_avar_on_logits_and_weights(setup):
    hf_model, model, raw, batch = setup
    img, sys_ = masks(batch)
    base = hf_run(hf_model, raw).logits.numpy()
    for on in ("logits", "weights"):

        def edit(layer, z, a, allowed, on=on):
            if on == "logits" and a is None:
                return torch.where(allowed, z + 0.15 * img * z - 0.4 * sys_ * z, z), None
            if on == "weights" and a is not None:
                return None, a + 0.15 * img * a - 0.4 * sys_ * a
            return None, None

        ref = hf_run(hf_model, raw, edit)
        assert np.abs(ref.logits.numpy() - base).max() > 1e-3
        compare(model, batch, raw, ref, I.build([{"method": "avar", "alpha_sys": 0.4, "on": on}], model.config), range(3))


def test_pai_last_row_on_layer_range(setup):
    hf_model, model, raw, batch = setup
    img, _ = masks(batch)
    s = raw["input_ids"].shape[1]

    def edit(layer, z, a, allowed):
        if a is not None or layer < 1:
            return None, None
        last = torch.zeros(s, dtype=torch.bool)
        last[-1] = True
        return torch.where(allowed & last[None, None, :, None], z + 0.5 * img * z.abs(), z), None

    ref = hf_run(hf_model, raw, edit)
    assert np.abs(ref.logits.numpy()[:, -1] - hf_run(hf_model, raw).logits.numpy()[:, -1]).max() > 1e-4
    compare(model, batch, raw, ref, I.build(["pai:alpha=0.5,start=1"], model.config), range(3))
    out = I.pai_contrast(jnp.array([[2.0, 1.0, -3.0]]), jnp.array([[1.0, 1.0, 1.0]]), gamma=1.1)
    lp_mm, lp_tx = np.log(np.exp([2.0, 1.0, -3.0]) / np.exp([2.0, 1.0, -3.0]).sum()), np.log(np.ones(3) / 3)
    want = np.where(lp_mm >= np.log(0.1) + lp_mm.max(), 1.1 * (lp_mm - lp_tx) + lp_tx, -np.inf)
    np.testing.assert_allclose(np.asarray(out[0]), want, rtol=1e-6)


def _np_entropy(a, img):
    m = (a * img).sum(-1, keepdims=True)
    p = np.where(img, a, 0) / np.where(m > 0, m, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(p > 0, p * np.log(p), 0).sum(-1)


def test_ration_plan_and_temperature(setup):
    hf_model, model, raw, batch = setup
    L = model.config.text.num_hidden_layers
    # numpy phase 1 from transformers: residual updates, pre-RoPE q/k captured by hooks
    cap = {}
    hooks = []
    for i, layer in enumerate(hf_model.model.language_model.layers):
        hooks.append(layer.self_attn.q_proj.register_forward_hook(lambda m, x, y, i=i: cap.__setitem__(("q", i), y)))
        hooks.append(layer.self_attn.k_proj.register_forward_hook(lambda m, x, y, i=i: cap.__setitem__(("k", i), y)))
    last = hf_model.model.language_model.layers[-1]
    hooks.append(last.register_forward_hook(lambda m, x, y: cap.__setitem__("last", y[0] if isinstance(y, tuple) else y)))
    ref0 = hf_run(hf_model, raw, hidden=True)
    for h in hooks:
        h.remove()
    img = np.asarray(batch.layout.image_mask)
    am = raw["attention_mask"].astype(bool)
    hs = [h.numpy().astype(np.float64) for h in ref0.hidden_states[:-1]] + [cap["last"].numpy().astype(np.float64)]
    s_l = np.stack([((np.abs(hs[i + 1] - hs[i]).mean(-1) * img).sum(-1) / img.sum(-1)) for i in range(L)], 1)
    t = model.config.text
    ent = []
    for i in range(L):
        q = cap[("q", i)].numpy().reshape(2, -1, t.num_attention_heads, t.head_dim).transpose(0, 2, 1, 3)
        k = cap[("k", i)].numpy().reshape(2, -1, t.num_key_value_heads, t.head_dim).transpose(0, 2, 1, 3)
        k = np.repeat(k, t.num_attention_heads // t.num_key_value_heads, axis=1)
        z = q @ k.transpose(0, 1, 3, 2) / np.sqrt(t.head_dim)
        a = np.exp(z - z.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        h = _np_entropy(a, img[:, None, None, :])  # [B,H,S]
        ent.append((h * am[:, None]).sum(-1) / am.sum(-1)[:, None])  # mean over real queries
    ent = np.stack(ent, 1)  # [B,L,H]
    # jaxmm's plan, with the same last-layer convention (its own residual probe on every layer)
    iv = I.build(["ration:top_k=2"], model.config)[0]
    out = qwen2_5_vl.forward_jit(model.params, model.config, batch, (iv,), iv.prefill_probes())
    s_jax = np.asarray(out.probes["ration_update"]["text"].values).T
    np.testing.assert_allclose(s_jax, s_l, rtol=1e-5)
    planned = iv.after_prefill(out.probes, batch.layout)
    rank = np.argsort(np.argsort(-s_l, axis=1, kind="stable"), axis=1)
    delta = (L - 1 - np.arange(L))[None] - rank
    groups = [delta[:, sorted({round(l * (L - 1) / 27) for l in g})].mean(1) for g in ((9, 10, 11, 12, 13, 14), (19,), (23, 24))]
    task = np.where(groups[0] >= 0, 0, np.where(groups[1] >= 0, 1, np.where(groups[2] >= 0, 2, 3)))
    np.testing.assert_array_equal(np.asarray(planned.task), task)
    hbar, hmax, hmin = ent.mean(-1), ent.max(-1), ent.min(-1)
    tau = np.where((task == 3)[:, None], 0.8 * hmax / (hbar + 1e-6), 1.2 * hmin / (hbar + 1e-6))
    np.testing.assert_allclose(np.asarray(planned.tau), tau, rtol=1e-5)
    key = rank < 2
    np.testing.assert_array_equal(np.asarray(planned.key).astype(bool), key)
    # phase 2 in transformers: z / τ on image keys at each sample's key layers
    imgt = torch.from_numpy(img).float()[:, None, None, :]

    def edit(layer, z, a, allowed):
        if a is not None:
            return None, None
        f = torch.from_numpy(np.where(key[:, layer], 1.0 / tau[:, layer], 1.0)).float()[:, None, None, None]
        return torch.where(allowed, z * (1 + (f - 1) * imgt), z), None

    assert np.abs(tau[key] - 1).max() > 1e-2
    ref = hf_run(hf_model, raw, edit)
    assert np.abs(ref.logits.numpy() - ref0.logits.numpy()).max() > 1e-4
    compare(model, batch, raw, ref, (planned,), range(L))


def np_vrga_plan(rows, img, grid_pos, grid_hw, image_index, n_keys, min_focus=10):
    """methods.md VRGA phase 1 in numpy. rows [L,B,H,K] (float64)."""
    L, B, H, K = rows.shape
    out = []
    for b in range(B):
        v = img[b]
        a = rows[:, b][:, :, v].reshape(L * H, -1)  # [LH, |V|]
        m = a.sum(-1)
        r = (m / v.sum()) / (rows[:, b].sum(-1).reshape(-1) / n_keys[b])
        p = a / m[:, None]
        h = -np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0).sum(-1)
        efr = h / r
        t1, t2 = np.percentile(efr, 5), np.percentile(r, 95)
        hv = (efr <= t1) & (r >= t2)
        if not hv.any():
            hv = r >= t2
        hb = (np.arange(L * H) < 64) & (r < 0.01)
        norm = lambda x: (x - x.min()) / max(x.max() - x.min(), 1e-12)
        mv = a[hv].mean(0)
        mb = a[hb].mean(0) if hb.any() else np.zeros_like(mv)
        ref = norm(np.maximum(0, norm(mv) - (norm(mb) if hb.any() else 0)))
        rr, cc, ii = grid_pos[b][v, 1], grid_pos[b][v, 2], image_index[b][v]
        prio = np.where((rr < 2) & (cc < 2), 0, np.where(rr == 0, 1, np.where(cc == 0, 2, 3)))
        order = sorted([j for j in range(v.sum()) if prio[j] < 3], key=lambda j: (prio[j], ii[j], j))
        masked = np.zeros(v.sum(), bool)
        masked[order[: int(np.floor(0.2 * v.sum()))]] = True
        kept = ~masked
        rho = ref / ref[kept].mean()
        focus = kept & (rho > rho[kept].mean() + 0.6 * rho[kept].std())
        if focus.sum() < min_focus:
            idx = [j for j in np.argsort(-np.where(kept, rho, -np.inf), kind="stable") if kept[j]][:min_focus]
            focus = np.zeros_like(kept)
            focus[idx] = True
        out.append((hv, focus))
    return out


def test_vrga_plan_and_decode_boost(setup):
    hf_model, model, raw, batch = setup
    # mark the last two positions as generated tokens (the queries phase 2 edits)
    lay = batch.layout
    gen = np.zeros_like(np.asarray(lay.generated_mask))
    gen[:, -2:] = True
    batch = dataclasses.replace(batch, layout=dataclasses.replace(lay, generated_mask=gen))
    iv = I.build(["vrga"], model.config)[0]
    planned = jaxmm.attention.plan(model.params, model.config, batch, (iv,), qwen2_5_vl.forward_jit)[0]
    ref0 = hf_run(hf_model, raw)
    rows = np.stack([a.numpy().astype(np.float64) for a in ref0.attentions])  # [L,B,H,S,S]
    qpos = [max(j for j in range(rows.shape[-1]) if np.asarray(lay.question_mask)[b, j]) for b in range(2)]
    row = np.stack([rows[:, b, :, qpos[b]] for b in range(2)], 1)  # [L,B,H,K]
    am = raw["attention_mask"]
    n_keys = np.array([am[b, : qpos[b] + 1].sum() for b in range(2)], np.float64)
    img = np.asarray(lay.image_mask)
    plan_np = np_vrga_plan(row, img, np.asarray(lay.grid_pos), np.asarray(lay.grid_hw), np.asarray(lay.image_index), n_keys)
    for b, (hv, focus) in enumerate(plan_np):
        assert 0 < hv.sum() < hv.size and 10 <= focus.sum() < focus.size
        np.testing.assert_array_equal(np.asarray(planned.visual_heads[b]), hv)
        np.testing.assert_array_equal(np.asarray(planned.focus[b])[img[b]], focus)
    # phase 2 in transformers: gate, x1.5 on focus tokens and +-2 raster neighbours (in-image pos >= 3)
    boost = np.zeros_like(img)
    for b, (_, focus) in enumerate(plan_np):
        keys = np.flatnonzero(img[b])
        ii = np.asarray(lay.image_index)[b][keys]
        raster = np.asarray(lay.grid_pos)[b][keys, 1] * np.asarray(lay.grid_hw)[b][keys, 1] + np.asarray(lay.grid_pos)[b][keys, 2]
        for j in range(len(keys)):
            near = [f for f in np.flatnonzero(focus) if ii[f] == ii[j] and abs(f - j) <= 2]
            boost[b, keys[j]] = bool(near) and raster[j] >= 3
    np.testing.assert_array_equal(np.asarray(planned.boost), boost)
    imgt = torch.from_numpy(img).float()[:, None, None, :]
    bt = torch.from_numpy(boost).float()[:, None, None, :]
    gen_rows = torch.from_numpy(gen)[:, None, :, None]

    def edit(layer, z, a, allowed):
        if a is None:
            return None, None
        m = (a * imgt).sum(-1, keepdim=True)
        r = m / imgt.sum(-1, keepdim=True) * allowed.sum(-1, keepdim=True) / a.sum(-1, keepdim=True)
        hraw = -(torch.where(a > 0, a * torch.log(a.clamp_min(1e-45)), torch.zeros_like(a)) * imgt).sum(-1, keepdim=True)
        gate = (r > 0.6) & (r > 0.2 * hraw) & gen_rows
        e = a * (1 + 0.5 * bt)
        return None, torch.where(gate, e / e.sum(-1, keepdim=True), a)

    ref = hf_run(hf_model, raw, edit)
    assert np.abs(ref.logits.numpy() - ref0.logits.numpy()).max() > 1e-4
    compare(model, batch, raw, ref, (planned,), range(3))


def test_var_redistributes_sink_mass(setup):
    hf_model, model, raw, batch = setup
    dims, tau = (0, 1, 2, 3), 1.5
    cap = {}
    hooks = [
        layer.input_layernorm.register_forward_hook(lambda m, x, y, i=i: cap.__setitem__(i, y))
        for i, layer in enumerate(hf_model.model.language_model.layers)
    ]
    hf_run(hf_model, raw)
    for h in hooks:
        h.remove()
    img = np.asarray(batch.layout.image_mask)
    sinks = {i: torch.from_numpy((np.abs(cap[i].numpy()[..., list(dims)]).max(-1) > tau) & img) for i in cap}
    assert 0 < int(sinks[2].sum()) < img.sum()
    imgt = torch.from_numpy(img).float()[:, None, None, :]

    def edit(layer, z, a, allowed):
        if a is None or layer < 2:
            return None, None
        s = sinks[layer].float()[:, None, None, :]
        mv, ms = (a * imgt).sum(-1, keepdim=True), (a * s).sum(-1, keepdim=True)
        rest = (a * imgt * (1 - s)).sum(-1, keepdim=True)
        ok = (mv >= 0.2) & (ms <= 0.5 * mv) & (ms > 0) & (rest > 0)
        e = a * (1 - 0.4 * s) + 0.4 * ms * a * imgt * (1 - s) / rest.clamp_min(1e-30)
        return None, torch.where(ok, e, a)

    ref = hf_run(hf_model, raw, edit)
    assert np.abs(ref.logits.numpy() - hf_run(hf_model, raw).logits.numpy()).max() > 1e-4
    ivs = I.build([{"method": "var", "dims": list(dims), "tau": tau}], model.config)
    compare(model, batch, raw, ref, ivs, range(3))


def test_methods_compose_and_batch_per_sample(setup):
    """RATION, VRGA and AVAR composed in one call; a batch of two equals each sample run alone."""
    hf_model, model, raw, batch = setup
    ivs = I.build(["ration:top_k=2", "vrga", "avar"], model.config)

    def run(raw_b, spans_q, spans_s):
        bt = model.prepare(**raw_b, system_spans=spans_s, question_spans=spans_q)
        gen = np.zeros_like(np.asarray(bt.layout.generated_mask))
        gen[:, -2:] = True
        bt = dataclasses.replace(bt, layout=dataclasses.replace(bt.layout, generated_mask=gen))
        planned = jaxmm.attention.plan(model.params, model.config, bt, ivs, qwen2_5_vl.forward_jit)
        return np.asarray(qwen2_5_vl.forward_jit(model.params, model.config, bt, planned, ()).logits), bt

    ids, am = raw["input_ids"], raw["attention_mask"]
    s = ids.shape[1]
    sys_spans = [[(int(b), int(b) + 2)] for b in am.argmax(1)]
    q_spans = [[(s - 6, s - 3)] for _ in range(2)]
    both, bt = run(raw, q_spans, sys_spans)
    assert np.abs(both - np.asarray(model.forward(batch=bt).logits)).max() > 1e-3
    grid = raw["image_grid_thw"]
    patches = np.cumsum([0] + [int(g.prod()) for g in grid])
    per_row_images = [[0, 1], [2]]
    for b in range(2):
        keep = am[b] == 1
        off = int(np.argmax(keep))
        imgs = per_row_images[b]
        raw_b = {
            "input_ids": ids[b : b + 1, keep],
            "attention_mask": am[b : b + 1, keep],
            "pixel_values": raw["pixel_values"][patches[imgs[0]] : patches[imgs[-1] + 1]],
            "image_grid_thw": grid[imgs],
        }
        alone, _ = run(
            raw_b, [[(q0 - off, q1 - off) for q0, q1 in q_spans[b]]], [[(s0 - off, s1 - off) for s0, s1 in sys_spans[b]]]
        )
        np.testing.assert_allclose(alone[0], both[b][keep], atol=5e-5)


def test_methods_run_inside_generate_and_stream_alike(setup):
    """Every method by name in one generate call (plans made at prefill, per sample), and the
    step-by-step stream gives the same tokens."""
    from jaxmm.generate import generate, stream

    _, model, raw, batch = setup
    ivs = model.interventions(["ration:top_k=2", "vrga", "avar", "pai", {"method": "var", "dims": [0, 1], "tau": 1.5}])
    out = generate(model.params, model.config, batch, max_new_tokens=8, stop_tokens=[], interventions=ivs)
    plain = generate(model.params, model.config, batch, max_new_tokens=8, stop_tokens=[])
    streamed = np.stack(list(stream(model.params, model.config, batch, max_new_tokens=8, stop_tokens=[], interventions=ivs)), 1)
    np.testing.assert_array_equal(streamed, np.asarray(out.tokens))
    assert np.asarray(out.tokens).shape == (2, 8)
    again = generate(
        model.params, model.config, batch, max_new_tokens=8, stop_tokens=[], interventions=ivs, reprefill=True, output_logits=True
    )
    base = generate(model.params, model.config, batch, max_new_tokens=8, stop_tokens=[], output_logits=True)
    assert np.abs(np.asarray(again.logits[:, 0]) - np.asarray(base.logits[:, 0])).max() > 1e-4  # plan reached the prompt
    assert plain.tokens.shape == out.tokens.shape


def test_stream_is_generate_with_probes_and_an_after_prefill_plan(setup):
    """stream runs generate's engine (the same prefill-and-plan, choose and advance): with probes
    and VRGA (planned from the prefill's probes, then editing every decode step) it yields
    generate's tokens exactly, and its per-step records carry generate's step logits, decode probe
    values and prefill probes; with stop tokens both end at the same step."""
    from jaxmm import probes as P
    from jaxmm.generate import generate, stream

    _, model, _, batch = setup
    ivs = model.interventions(["vrga"])
    probes = (P.VisualMass(), P.FocusRatio(layers=(0, 2)))
    kw = dict(max_new_tokens=8, stop_tokens=[], interventions=ivs, probes=probes)
    out = generate(model.params, model.config, batch, output_logits=True, **kw)
    unplanned = generate(model.params, model.config, batch, output_logits=True, max_new_tokens=8, stop_tokens=[], probes=probes)
    assert np.abs(np.asarray(out.logits) - np.asarray(unplanned.logits)).max() > 1e-4  # the plan edits decoding
    steps = []
    streamed = np.stack(list(stream(model.params, model.config, batch, on_step=steps.append, **kw)), 1)
    np.testing.assert_array_equal(streamed, np.asarray(out.tokens))
    assert [s.index for s in steps] == list(range(8))
    np.testing.assert_array_equal(np.stack([s.tokens for s in steps], 1), streamed)
    np.testing.assert_allclose(np.stack([np.asarray(s.logits) for s in steps], 1), np.asarray(out.logits), atol=1e-5, rtol=0)
    for p in probes:
        want = out.probes[p.name]["text"]  # values [B, T_new, L, H]
        assert steps[0].probes[p.name]["text"].layers == want.layers
        got = np.stack([np.asarray(s.probes[p.name]["text"].values) for s in steps], 1)
        np.testing.assert_allclose(got, np.asarray(want.values), rtol=1e-5, atol=1e-6, err_msg=p.name)
        np.testing.assert_allclose(
            np.asarray(steps[0].prefill_probes[p.name]["text"].values),
            np.asarray(out.prefill_probes[p.name]["text"].values),
            rtol=1e-5,
            atol=1e-6,
            err_msg=p.name,
        )
    assert all(s.prefill_probes is None for s in steps[1:])
    t = np.asarray(out.tokens)
    stop = sorted({int(t[0, 2]), int(t[1, 4])})
    kw["stop_tokens"] = stop
    stopped = generate(model.params, model.config, batch, **kw)
    records = []
    streamed = np.stack(list(stream(model.params, model.config, batch, on_step=records.append, **kw)), 1)
    n = int(stopped.steps)
    assert n < 8 and streamed.shape == (2, n) and len(records) == n
    np.testing.assert_array_equal(streamed, np.asarray(stopped.tokens)[:, :n])
    assert not np.asarray(stopped.tokens)[:, n:].any()  # pad (0) after the last step


def test_efr_head_mask_zeroes_the_visual_heads(setup):
    _, model, raw, batch = setup
    iv = I.build(["vrga"], model.config)[0]
    planned = jaxmm.attention.plan(model.params, model.config, batch, (iv,), qwen2_5_vl.forward_jit)[0]
    h = model.config.text.num_attention_heads
    mask = I.efr_head_mask(planned, h)
    out = qwen2_5_vl.forward_jit(model.params, model.config, batch, (mask,), (AttentionWeights(),))
    w = np.asarray(out.probes["attentions"]["text"].values)  # [L,B,H,S,S]
    hv = np.asarray(planned.visual_heads).reshape(2, -1, h)  # [B,L,H]
    assert hv.any()
    for l in range(w.shape[0]):
        for b in range(2):
            for head in range(h):
                assert (np.abs(w[l, b, head]).max() == 0) == bool(hv[b, l, head])


def test_pai_contrast_in_generation_matches_a_manual_two_stream_decode(setup):
    """Each step's token = argmax of γ(log p_mm − log p_text) + log p_text (γ = 3, cut-off 0.1), the text
    stream being the same prompt without its images, fed the same tokens; ``stream`` with the same
    contrast yields the same tokens."""
    from jaxmm.generate import Contrast, generate, stream, text_only

    _, model, raw, batch = setup
    tb = text_only(batch, model.config)
    assert (np.asarray(tb.input_ids) != tiny.IMAGE_TOKEN).all() and tb.input_ids.shape[1] < batch.input_ids.shape[1]
    ivs = I.build(["pai"], model.config)
    out = generate(
        model.params,
        model.config,
        batch,
        max_new_tokens=6,
        stop_tokens=[],
        interventions=ivs,
        contrast=Contrast(tb, gamma=3.0, cutoff=0.1),
    )
    tokens = np.asarray(out.tokens)
    plain = np.asarray(generate(model.params, model.config, batch, max_new_tokens=6, stop_tokens=[], interventions=ivs).tokens)
    assert (tokens != plain).any()
    # the same contrast asked for by the method (pai:gamma=3), through Model.generate
    asked = model.generate(batch, max_new_tokens=6, stop_tokens=[], interventions=["pai:gamma=3.0"])
    np.testing.assert_array_equal(np.asarray(asked.tokens), tokens)
    streamed = np.stack(
        list(
            stream(
                model.params,
                model.config,
                batch,
                max_new_tokens=6,
                stop_tokens=[],
                interventions=ivs,
                contrast=Contrast(tb, gamma=3.0, cutoff=0.1),
            )
        ),
        1,
    )
    np.testing.assert_array_equal(streamed, tokens)  # stream decodes the contrast alike

    # manual reference with full recomputation (no cache) of both streams
    def next_logits(b, pix, grid, extra, ivs_):
        # generated tokens are random ids (special ones too): give their M-RoPE positions explicitly
        pos = np.asarray(b.position_ids)
        nxt = pos.max(axis=(0, 2))[None, :, None] + 1 + np.arange(extra.shape[1])[None, None, :]
        ids = np.concatenate([np.asarray(b.input_ids), extra], 1)
        am = np.concatenate([np.asarray(b.attention_mask), np.ones_like(extra)], 1)
        full = dataclasses.replace(
            b,
            input_ids=ids,
            attention_mask=am,
            position_ids=np.concatenate([pos, np.broadcast_to(nxt, (3,) + extra.shape)], 2),
            layout=b.layout.extend(extra.shape[1]),
        )
        o = qwen2_5_vl.forward_jit(model.params, model.config, full, ivs_, ())
        return np.asarray(o.logits[:, -1], np.float64)

    for t in range(6):
        lm = next_logits(batch, raw["pixel_values"], raw["image_grid_thw"], tokens[:, :t], ivs)
        lt = next_logits(tb, None, None, tokens[:, :t], ())
        lp_mm = lm - np.log(np.exp(lm - lm.max(-1, keepdims=True)).sum(-1, keepdims=True)) - lm.max(-1, keepdims=True)
        lp_tx = lt - np.log(np.exp(lt - lt.max(-1, keepdims=True)).sum(-1, keepdims=True)) - lt.max(-1, keepdims=True)
        score = np.where(lp_mm >= np.log(0.1) + lp_mm.max(-1, keepdims=True), 3.0 * (lp_mm - lp_tx) + lp_tx, -np.inf)
        np.testing.assert_array_equal(score.argmax(-1), tokens[:, t])
