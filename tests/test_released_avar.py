"""AVAR ``variant="released"`` against numpy transcriptions of lrlbbzl/Qwen-AVAR: AGTO
(LlamaFactory/src/llamafactory/train/avar_attention.py, sft/trainer.py's spans), VARS in the RL stage
(EasyR1/verl/utils/avar_attention.py, trainer/ray_trainer.py, trainer/core_algos.py) and EasyR1's actor
loss (core_algos.py ``compute_policy_loss``, ``compute_kl``, ``average_loss``); plus the released
GRPO config. (The training-free intervention has no released code: nothing to compare.)"""

from pathlib import Path

import numpy as np
import pytest

from jaxmm.objectives import avar, grpo

ROOT = Path(__file__).resolve().parents[1]
rng = np.random.default_rng(11)


def softmax_rows(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# ----------------------------------------------------------------------------- transcriptions
def released_agto(attn, img, sys, qry, eps=1e-6):
    """attn: list over layers of [B,H,S,S]; masks [B,S] -> (L_enh, L_sup)."""
    enh = sup = 0.0
    for a in attn:
        q = qry[:, None, :, None].astype(float)
        nq = qry.sum(-1, keepdims=True).astype(float)
        s_img = (a * q * img[:, None, None, :]).sum((2, 3))
        s_sys = (a * q * sys[:, None, None, :]).sum((2, 3))
        enh += (-np.log(s_img / (nq * img.sum(-1, keepdims=True) + eps) + eps).mean(1)).mean()
        sup += (np.log(s_sys / (nq * sys.sum(-1, keepdims=True) + eps) + eps).mean(1)).mean()
    return enh / len(attn), sup / len(attn)


def released_spans(decoded, response_start, seq_len, bos=False):
    user_start = min(max(10, response_start // 10), response_start)
    for marker in ["<|im_start|>user", "<|start_header_id|>user", "[INST]", "user\n", "User:", "<|user|>"]:
        idx = decoded.find(marker)
        if idx != -1:
            user_start = min(int(idx * 0.4), response_start)
            break
    sys_m, q_m = np.zeros(seq_len, bool), np.zeros(seq_len, bool)
    if user_start > 0:
        sys_m[(1 if bos else 0) : user_start] = True
    if user_start < response_start:
        q_m[user_start:response_start] = True
    return sys_m, q_m


def released_vars_score(attn, input_ids, image_token_id, layers, lambda_v, response_width, eps=1e-6):
    """The VARS part of EasyR1's GRPO score: labels fall back to input_ids, so the system span is
    max(1, 0 // 5) tokens; summed over heads, rows, keys and layers; added at every response position."""
    b, s = input_ids.shape
    img = input_ids == image_token_id
    labels = input_ids
    sys = np.zeros((b, s), bool)
    for i in range(b):
        non_ignored = np.flatnonzero(labels[i] != -100)
        response_start = non_ignored[0] if len(non_ignored) else s
        sys[i, : max(1, response_start // 5)] = True
    attn = [attn[i] for i in layers if i < len(attn)]
    ti, ts = np.zeros(b), np.zeros(b)
    for a in attn:
        ti += (a * img[:, None, None, :]).sum((1, 2, 3))
        ts += (a * sys[:, None, None, :]).sum((1, 2, 3))
    r_visual = ti / (ts + eps) * lambda_v
    token_level = np.zeros((b, response_width)) + r_visual[:, None]
    return token_level.sum(-1)


def easyr1_loss(logp, old, ref, adv, mask, kl_coef=1e-2, low=0.2, high=0.3, dual=3.0):
    adv = np.broadcast_to(adv[:, None], logp.shape)
    lr = logp - old
    ratio = np.exp(np.clip(lr, -20, 20))
    clipped = np.exp(np.clip(lr, np.log(1 - low), np.log(1 + high)))
    pg1, pg2, pg3 = -adv * ratio, -adv * clipped, -adv * dual
    hi = np.maximum(pg1, pg2)
    lo = np.minimum(hi, pg3)
    final = np.where(adv < 0, lo, hi)
    pg = (final * mask).sum() / (mask.sum() + 1e-8)
    kl = np.clip(ref - logp, -20, 20)
    kld = np.clip(np.exp(kl) - kl - 1, -10, 10)
    return pg + kl_coef * (kld * mask).sum() / (mask.sum() + 1e-8)


# ----------------------------------------------------------------------------- AGTO
QWEN_PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "<|vision_start|><|image_pad|><|image_pad|><|vision_end|>What is this?<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def test_released_spans_match_transcription():
    for text, rs, n, bos in [
        (QWEN_PROMPT, 30, 40, False),
        (QWEN_PROMPT, 12, 40, True),
        ("no marker here", 37, 50, False),
        ("[INST] hi", 5, 8, False),
        ("x" * 90 + "User: q", 60, 64, False),
    ]:
        got = avar.released_agto_spans(text, rs, n, bos)
        want = released_spans(text, rs, n, bos)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
    s, q = avar.released_agto_spans(QWEN_PROMPT, 30, 40)
    # the marker sits at character 58: the release's S is 23 tokens, where the system turn has 11
    assert np.flatnonzero(s).tolist() == list(range(23)) and np.flatnonzero(q).tolist() == list(range(23, 30))


def test_agto_released_matches_transcription_and_spans_differ_from_default():
    L, B, H, S = 3, 2, 2, 30
    attn = [softmax_rows(rng.standard_normal((B, H, S, S)) + np.triu(np.full((S, S), -1e9), 1)) for _ in range(L)]
    img = np.zeros((B, S), bool)
    img[:, 14:18] = True
    sys_r, q_r = map(np.stack, zip(*[avar.released_agto_spans(QWEN_PROMPT, 26, S)] * B))
    m = lambda keys: np.stack([(a * keys[:, None, None, :]).sum(-1) for a in attn])  # [L,B,H,S]
    enh, sup = avar.agto_losses(m(img), m(sys_r), q_r, img.sum(-1), sys_r.sum(-1), variant="released")
    want_enh, want_sup = released_agto(attn, img, sys_r, q_r)
    assert float(enh) == pytest.approx(want_enh, abs=1e-5) and float(sup) == pytest.approx(want_sup, abs=1e-5)
    # jaxmm's default spans: the system turn (11 tokens) and the user turn after its marker
    sys_d = np.zeros((B, S), bool)
    sys_d[:, :11] = True
    q_d = np.zeros((B, S), bool)
    q_d[:, 14:26] = True
    d_enh, d_sup = avar.agto_losses(m(img), m(sys_d), q_d, img.sum(-1), sys_d.sum(-1))
    assert abs(float(d_enh) - float(enh)) > 1e-3 and abs(float(d_sup) - float(sup)) > 1e-3


def test_intervention_has_no_released_variant():
    from types import SimpleNamespace

    from jaxmm import interventions as I

    cfg = SimpleNamespace(text=SimpleNamespace(num_hidden_layers=2, hidden_size=16))
    assert I.build("avar:variant=paper", cfg)[0] == I.build("avar", cfg)[0]
    assert I.build(str(ROOT / "configs/methods/avar.yaml"), cfg)[0] == I.build("avar", cfg)[0]
    for spec in ("avar:variant=released", {"method": "avar", "variant": "released"}):
        with pytest.raises(ValueError, match=r"variant='released'.*\('paper',\).*no code"):
            I.build(spec, cfg)


def test_unknown_variant_raises():
    z = np.zeros((1, 1, 1, 2))
    with pytest.raises(ValueError, match=r"variant='releasd'.*\('paper', 'released'\)"):
        avar.agto_losses(z, z, np.ones((1, 2), bool), np.ones(1), np.ones(1), variant="releasd")
    with pytest.raises(ValueError, match=r"variant='x'.*\('paper', 'easyr1', 'trl'\)"):
        grpo.grpo_loss(z[0, 0], z[0, 0], z[0, 0], np.zeros(1), np.ones((1, 2)), variant="x")


# ----------------------------------------------------------------------------- VARS (RL stage)
def test_vars_released_rows_first_key_and_width_match_transcription():
    L, B, H, S, R = 10, 2, 2, 16, 5
    attn = [softmax_rows(rng.standard_normal((B, H, S, S)) + np.triu(np.full((S, S), -1e9), 1)) for _ in range(L)]
    ids = rng.integers(10, 50, (B, S))
    ids[0, 3:7] = ids[1, 5:11] = 7  # image tokens
    layers = list(range(8))
    want = released_vars_score(attn, ids, 7, layers, 0.3, R)
    # jaxmm: the masses its probes give at every row, the FirstKeysMass probe for the system span
    probe = avar.FirstKeysMass()
    m_v = np.stack([(a * (ids == 7)[:, None, None, :]).sum(-1) for a in attn[:8]])
    m_s = np.stack([np.asarray(probe(a.astype(np.float32), None)) for a in attn[:8]])
    r = np.asarray(avar.vars_reward(m_v, m_s, np.ones((B, S), bool), None, variant="released"))
    np.testing.assert_allclose(0.3 * r * R, want, rtol=1e-5)
    # the paper reading (generated rows only, per-row ratios, the true system span, gated) differs
    gen = np.zeros((B, S), bool)
    gen[:, S - R :] = True
    sys = np.zeros((B, S), bool)
    sys[:, :3] = True
    m_s_paper = np.stack([(a * sys[:, None, None, :]).sum(-1) for a in attn[:8]])
    paper = np.asarray(avar.vars_reward(m_v, m_s_paper, gen, np.ones(B, bool)))
    assert np.all(np.abs(0.3 * paper - want) > 1e-2)


# ----------------------------------------------------------------------------- EasyR1 loss
def test_easyr1_loss_and_advantages_match_transcription():
    B, T = 4, 7
    logp = np.log(rng.uniform(0.05, 0.9, (B, T))).astype(np.float32)
    old = (logp + rng.normal(0, 0.6, (B, T))).astype(np.float32)
    old[1, 0] = logp[1, 0] - 2.0  # ratio e^2 > 3 on a negative advantage: dual clip
    ref = (logp + rng.normal(0, 0.5, (B, T))).astype(np.float32)
    ref[0, 1] = logp[0, 1] + 3.0  # k3 = e^3 - 4 > 10: the KL clamp
    adv = np.array([1.2, -0.8, 0.4, -1.5], np.float32)
    mask = (np.arange(T)[None, :] < np.array([7, 3, 5, 1])[:, None]).astype(np.float32)
    got = float(
        grpo.grpo_loss(logp, old, ref, adv, mask, beta=1e-2, clip_eps=0.2, variant="easyr1", clip_eps_high=0.3, dual_clip=3.0)
    )
    want = easyr1_loss(logp.astype(np.float64), old, ref, adv, mask)
    assert got == pytest.approx(want, abs=1e-5)
    paper = float(grpo.grpo_loss(logp, old, ref, adv, mask, beta=1e-2, clip_eps=0.2))
    assert abs(paper - got) > 1e-2
    scores = np.array([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.2, 0.9, 0.3, 0.3])
    want_adv = np.concatenate([(g - g.mean()) / (g.std(ddof=1) + 1e-6) for g in scores.reshape(2, 5)])
    np.testing.assert_allclose(np.asarray(grpo.group_advantages(scores, 5, eps=1e-6)), want_adv, atol=1e-5)


def test_released_grpo_config_loads():
    from jaxmm.train.grpo import GRPOConfig

    cfg = GRPOConfig.from_yaml(ROOT / "configs/train/grpo_avar_released.yaml")
    assert (cfg.loss_variant, cfg.clip_eps, cfg.clip_eps_high, cfg.dual_clip, cfg.adv_eps, cfg.kl_beta) == (
        "easyr1",
        0.2,
        0.3,
        3.0,
        1e-6,
        0.01,
    )
    assert cfg.vars_variant == "released" and cfg.vars_layers == list(range(8)) and cfg.group_size == 5
    assert cfg.rewards == {"accuracy": 0.9, "vars": 0.3}
    with pytest.raises(ValueError, match=r"loss_variant='easy'.*\('paper', 'easyr1', 'trl'\)"):
        GRPOConfig.from_yaml(ROOT / "configs/train/grpo_avar_released.yaml", ["loss_variant=easy"])


def test_grpo_released_wiring_on_the_organism(tmp_path):
    """vars_variant / loss_variant released through a real rollout and update: VARS from the full
    attention maps of layer 0 (every real row, key 0 as the system span, × the completion width) and
    the EasyR1 loss at the on-policy update, both by hand."""
    import jax.numpy as jnp

    import jaxmm
    from jaxmm import organism
    from jaxmm.attention import AttentionWeights
    from jaxmm.models.qwen2_5_vl.modeling import forward
    from jaxmm.objectives.grpo import group_advantages
    from jaxmm.train.grpo import GRPOConfig, make_score_fn, make_update, rollout
    from jaxmm.train.sft import dataset, initial_state, optimizer, state_mask

    data = {
        "name": "grounded",
        "size": 4,
        "seed": 3,
        "image_size": 112,
        "shape_scale": 0.35,
        "contrast": 0.5,
        "tasks": ["grounding"],
    }
    cfg = GRPOConfig(
        out=str(tmp_path / "rel"),
        group_size=3,
        prompts_per_step=2,
        max_new_tokens=8,
        lr=1e-3,
        tensorboard=False,
        data=data,
        rewards={"accuracy": 0.9, "vars": 0.3},
        vars_variant="released",
        vars_layers=[0, 99],
        loss_variant="easyr1",
        clip_eps_high=0.3,
        adv_eps=1e-6,
        kl_beta=0.01,
    )
    model = jaxmm.load(organism.default())
    state = initial_state(cfg, model.params, model.config)
    ds = dataset(cfg)
    batch, tokens, mask, scored, _, rewards, texts, lengths = rollout(
        model, cfg, state, model.params, [ds[0], ds[1]], 0, make_score_fn(model.config, cfg)
    )
    full = forward(model.params, model.config, batch, probes=(AttentionWeights(layers=(0,)),))
    att = np.asarray(full.probes["attentions"]["text"].values, np.float64)[0]  # [B,H,S,S]
    rows = np.asarray(batch.attention_mask, bool)
    img = np.asarray(batch.layout.image_mask, np.float64)
    t = tokens.shape[1]
    for b in range(len(texts)):
        a = att[b][:, rows[b]]  # real rows only
        want = (a * img[b]).sum() / (a[..., 0].sum() + 1e-6) * t
        np.testing.assert_allclose(rewards["vars"][b], want, rtol=1e-4)
    rng = np.random.default_rng(1)
    lp = np.asarray(scored["logp"], np.float64)
    ref_lp = lp + rng.normal(0, 2.0, lp.shape)
    r = 0.9 * rewards["accuracy"] + 0.3 * rewards["vars"]
    adv = np.asarray(group_advantages(jnp.asarray(r, jnp.float32), 3, eps=1e-6), np.float64)
    tx = optimizer(cfg, state)
    update = make_update(model.config, cfg, tx, state_mask(cfg, state))
    _, _, m = update(
        state,
        tx.init(state),
        batch,
        tokens,
        mask,
        scored["logp"],
        jnp.asarray(ref_lp, jnp.float32),
        jnp.asarray(adv, jnp.float32),
    )
    mk = np.asarray(mask, np.float64)
    d = np.clip(ref_lp - lp, -20, 20)
    k3 = np.clip(np.exp(d) - d - 1, -10, 10)
    assert (k3 * mk).max() == 10.0  # the clamp is exercised
    want = (-adv[:, None] * mk).sum() / (mk.sum() + 1e-8) + 0.01 * (k3 * mk).sum() / (mk.sum() + 1e-8)
    np.testing.assert_allclose(float(m["loss"]), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "text, want",
    [
        ("<think>two cups</think><answer>2</answer>", 1.0),
        ("<think>a\nb</think>\n\n<answer>2\n</answer>", 1.0),  # DOTALL, whitespace between the blocks
        ("<answer>2</answer>", 0.0),  # no reasoning block
        ("<think>x</think><answer>2</answer> extra", 0.0),  # fullmatch: nothing after the answer
        ("so <think>x</think><answer>2</answer>", 0.0),  # nor before the reasoning
        ("<think>x</think>", 0.0),
    ],
)
def test_avar_format_reward_is_the_released_fullmatch(text, want):
    """Qwen-AVAR EasyR1/examples/reward_function/avar.py: re.fullmatch of
    ``<think>.*?</think>\\s*<answer>.*?</answer>`` (DOTALL), independently as a plain string check."""
    from jaxmm.objectives.avar import format_reward

    assert format_reward(text) == want
    t = text
    plain = (
        t.startswith("<think>")
        and "</think>" in t
        and t.endswith("</answer>")
        and t[t.index("</think>") + len("</think>") :].lstrip().startswith("<answer>")
    )
    assert float(plain) == want


def test_grpo_config_format_reward_choices():
    from jaxmm.train.grpo import GRPOConfig

    assert GRPOConfig(format_reward="avar").format_reward == "avar"
    with pytest.raises(ValueError, match=r"format_reward='boxed'; expected one of \('sayo', 'avar'\)"):
        GRPOConfig(format_reward="boxed")
