"""AVAR / SAYO losses and rewards and the GRPO pieces against independent numpy computations and a
hand-computed example; AGTO through the model matches numpy on transformers' attentions."""

import numpy as np
import pytest

from jaxmm.objectives import avar, grpo, sayo

rng = np.random.default_rng(0)


def softmax_rows(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_agto_losses_match_numpy_on_attention_blocks():
    L, B, H, T = 2, 2, 3, 6
    A = softmax_rows(rng.standard_normal((L, B, H, T, T)))
    V = np.array([[0, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 0]], bool)
    S = np.array([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]], bool)
    Q = np.array([[0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 1, 1]], bool)
    m_v = (A * V[None, :, None, None]).sum(-1)
    m_s = (A * S[None, :, None, None]).sum(-1)
    enh, sup = avar.agto_losses(m_v, m_s, Q, V.sum(-1), S.sum(-1))
    want_enh = want_sup = 0.0
    for l in range(L):
        for b in range(B):
            for h in range(H):
                want_enh += -np.log(A[l, b, h][np.ix_(Q[b], V[b])].mean() + 1e-6)
                want_sup += np.log(A[l, b, h][np.ix_(Q[b], S[b])].mean() + 1e-6)
    np.testing.assert_allclose(float(enh), want_enh / (L * B * H), rtol=1e-5)
    np.testing.assert_allclose(float(sup), want_sup / (L * B * H), rtol=1e-5)
    assert float(avar.agto_total(2.0, m_v, m_s, Q, V.sum(-1), S.sum(-1))) == pytest.approx(
        2.0 + 0.15 * want_enh / 12 + 0.15 * want_sup / 12, rel=1e-5
    )


def test_vars_reward_paper_and_released():
    L, B, H, T = 2, 2, 2, 5
    m_v, m_s = rng.uniform(0.1, 0.9, (L, B, H, T)), rng.uniform(0.05, 0.5, (L, B, H, T))
    gen = np.array([[0, 0, 1, 1, 1], [0, 0, 0, 1, 1]], bool)
    correct = np.array([True, False])
    r = np.asarray(avar.vars_reward(m_v, m_s, gen, correct))
    want0 = np.mean([(m_v[l, 0, h, gen[0]] / (m_s[l, 0, h, gen[0]] + 1e-6)).mean() for l in range(L) for h in range(H)])
    np.testing.assert_allclose(r, [want0, 0.0], rtol=1e-5)
    rel = np.asarray(avar.vars_reward(m_v, m_s, gen, correct, variant="released"))
    want = [(m_v[:, b][..., gen[b]]).sum() / ((m_s[:, b][..., gen[b]]).sum() + 1e-6) for b in range(B)]
    np.testing.assert_allclose(rel, want, rtol=1e-5)
    assert float(avar.total_reward(1.0, 2.0, 1.0)) == pytest.approx(1.0 + 0.6 + 0.1)


def test_sayo_token_selection_reward_and_format():
    logits = rng.standard_normal((2, 10, 7)) * np.linspace(0.1, 3, 10)[None, :, None]
    ent = np.asarray(sayo.token_entropy(logits, temperature=1.0))
    p = softmax_rows(logits)
    np.testing.assert_allclose(ent, -(p * np.log(p)).sum(-1), rtol=1e-5)
    comp = np.zeros((2, 10), bool)
    comp[0, 2:] = True
    comp[1, 5:] = True
    sel = np.asarray(sayo.select_high_entropy(ent, comp, 0.3))
    for b in range(2):
        idx = np.flatnonzero(comp[b])
        k = int(np.ceil(0.3 * len(idx)))
        assert set(np.flatnonzero(sel[b])) == set(idx[np.argsort(-ent[b, idx], kind="stable")[:k]])
    W = softmax_rows(rng.standard_normal((2, 3, 10, 12)))
    image = np.zeros((2, 12), bool)
    image[:, 2:10] = True
    region = np.zeros((2, 12), bool)
    region[:, 4:6] = True
    r = np.asarray(sayo.r_att(W, image, region, sel))
    for b in range(2):
        t = sel[b]
        a_r = W[b][:, t][..., region[b]].mean()
        a_v = W[b][:, t][..., image[b]].mean()
        assert r[b] == pytest.approx(np.tanh(np.log((a_r + 1e-8) / (a_v + 1e-8))), rel=1e-5)
    assert sayo.format_reward("<answer>3</answer>", 80) == 1.0
    assert sayo.format_reward("<answer>3</answer>", 200) == pytest.approx(0.3)
    assert sayo.format_reward("<answer>3</answer>", 30) == pytest.approx(0.3)
    assert sayo.format_reward("<answer>3</answer><answer>4</answer>", 80) == 0.0 == sayo.format_reward("3", 80)


def test_grpo_hand_computed_example():
    rewards = np.array([1.0, 0.0, 0.0, 1.0, 0.5, 0.5])  # two prompts, G = 3
    adv = np.asarray(grpo.group_advantages(rewards, 3))
    # group 1: mean 1/3, sample std sqrt(1/3) = 0.57735
    sd = 0.57735027 + 1e-4
    np.testing.assert_allclose(adv[:3], [(2 / 3) / sd, (-1 / 3) / sd, (-1 / 3) / sd], rtol=1e-5)
    # group 2: mean 2/3, std sqrt(1/12)
    s = np.sqrt(1 / 12)
    np.testing.assert_allclose(adv[3:], [(1 / 3) / (s + 1e-4), (-1 / 6) / (s + 1e-4), (-1 / 6) / (s + 1e-4)], rtol=1e-5)
    # k3 at delta = log 2: 2 - log 2 - 1
    assert float(grpo.k3_kl(np.log(0.25), np.log(0.5))) == pytest.approx(1 - np.log(2), rel=1e-6)
    logp = np.log(np.array([[0.5, 0.2], [0.3, 0.3]]))
    old = np.log(np.array([[0.4, 0.2], [0.3, 0.6]]))
    ref = np.log(np.array([[0.5, 0.1], [0.3, 0.3]]))
    a = np.array([1.0, -2.0])
    mask = np.array([[1, 1], [1, 0]])
    loss = float(grpo.grpo_loss(logp, old, ref, a, mask, beta=0.1, clip_eps=0.2))
    # token (0,0): ratio 1.25 -> min(1.25, 1.2)*1 = 1.2; kl 0 ; token (0,1): ratio 1 -> 1; kl = 0.5 - log .5 - 1
    kl01 = 0.5 - np.log(0.5) - 1
    seq0 = (1.2 + (1.0 - 0.1 * kl01)) / 2
    seq1 = -2.0  # ratio 1, A = -2, kl 0
    assert loss == pytest.approx(-(seq0 + seq1) / 2, rel=1e-5)


def _spanned_batch(tmp_path):
    """A tiny checkpoint, its transformers model, and a two-row batch with system/question spans."""
    import jaxmm
    import tiny
    from test_qwen2_5_vl_parity import make_batch

    hf = tiny.save_hf_model("gqa_untied", tmp_path)
    model = jaxmm.load(tmp_path)
    raw = make_batch([["coffee"], ["chelsea"]], "left")
    s = raw["input_ids"].shape[1]
    starts = raw["attention_mask"].argmax(1)
    batch = model.prepare(
        **raw, system_spans=[[(int(b), int(b) + 3)] for b in starts], question_spans=[[(s - 5, s)] for _ in starts]
    )
    return hf, model, raw, batch


def test_agto_through_the_model_matches_numpy_on_transformers_attentions(tmp_path):
    from jaxmm import probes as P
    from test_qwen2_5_vl_parity import hf_forward

    hf, model, raw, batch = _spanned_batch(tmp_path)
    out = model.forward(batch=batch, probes=[P.VisualMass(), P.KeyMass()])
    lay = batch.layout
    V, S, Q = (np.asarray(x) for x in (lay.image_mask, lay.system_mask, lay.question_mask))
    enh, sup = avar.agto_losses(
        out.probes["visual_mass"]["text"].values, out.probes["system_mass"]["text"].values, Q, V.sum(-1), S.sum(-1)
    )
    A = np.stack([a.numpy() for a in hf_forward(hf, raw).attentions]).astype(np.float64)
    want_enh = np.mean(
        [
            -np.log(A[l, b, h][np.ix_(Q[b], V[b])].mean() + 1e-6)
            for l in range(A.shape[0])
            for b in range(2)
            for h in range(A.shape[2])
        ]
    )
    want_sup = np.mean(
        [
            np.log(A[l, b, h][np.ix_(Q[b], S[b])].mean() + 1e-6)
            for l in range(A.shape[0])
            for b in range(2)
            for h in range(A.shape[2])
        ]
    )
    np.testing.assert_allclose([float(enh), float(sup)], [want_enh, want_sup], rtol=1e-5)


def test_agto_plugs_into_the_sft_step(tmp_path):
    from jaxmm.train.sft import TrainConfig, make_step, optimizer

    _, model, raw, batch = _spanned_batch(tmp_path)
    labels = np.where(raw["attention_mask"] > 0, raw["input_ids"], -100)
    tx = optimizer(TrainConfig(steps=5), model.params)
    step = make_step(model.config, tx, "float32", [avar.agto_extra_loss()], avar.agto_probes())
    _, _, m = step(model.params, tx.init(model.params), batch, labels)
    out = model.forward(batch=batch, probes=list(avar.agto_probes()))
    extra = float(avar.agto_extra_loss()(out, batch))
    assert abs(extra) > 1e-3
    np.testing.assert_allclose(float(m["total"]), float(m["loss"]) + extra, rtol=1e-5)
    assert np.isfinite(float(m["grad_norm"]))
