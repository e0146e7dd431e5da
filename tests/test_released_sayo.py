"""SAYO ``variant="released"`` against numpy transcriptions of Cratileo/Sayo: the format reward
(train/reward/format_rewards.py), the high-entropy token selection (train/trainer/grpo_trainer.py,
``_get_entropies_mask`` / ``get_top_entropy_indices_list``) feeding r_att (train/reward/attn_rewards.py),
and TRL 0.25's GRPO loss (``loss_type="dapo"``); plus the released GRPO config."""

import math
import re
from pathlib import Path

import numpy as np
import pytest

from jaxmm.objectives import grpo, sayo

ROOT = Path(__file__).resolve().parents[1]
rng = np.random.default_rng(7)


# ----------------------------------------------------------------------------- transcriptions
def released_format(text, n_tokens):
    m = re.search(r"<answer>(?!.*<answer>)(.*?)</answer>", text, re.DOTALL | re.MULTILINE)
    reward = 1.0 if m else 0.0
    coeff = 1.0 if n_tokens <= 100 else max(0, (100 / n_tokens) * 0.6)
    short = 1.0 if n_tokens >= 60 else max(0, (n_tokens / 60) * 0.6)
    return reward * coeff * short


def released_top_entropy(entropies, lengths):
    """entropies [B, >=C] at the completion positions; completions right-padded to C = max(lengths)."""
    c = max(lengths)
    e = entropies[:, :c][:, :-1]
    k = max(1, int(e.shape[1] * 0.3))
    return [list(np.argsort(-row)[:k]) for row in e]


def released_attn_reward(rows, image_span, focus, ids):
    """rows [B,T,H,K] (one decode row per completion position), image (first, last) key indices,
    focus [(s, e)] offsets into the image, ids the selected positions per sample."""
    out = []
    for b in range(len(rows)):
        toks = [rows[b][i] for i in ids[b]]
        first, last = image_span[b]
        img = np.concatenate([t[..., first : last + 1] for t in toks], -1).mean()
        aim = np.concatenate([t[..., s + first : e + first + 1] for t in toks for s, e in focus[b]], -1).mean()
        out.append(math.tanh(math.log((aim + 1e-8) / (img + 1e-8))))
    return np.array(out)


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize(
    "text",
    [
        "<answer>3</answer>",
        "a <answer>3</answer><answer>4</answer>",
        "<answer>\n3\n</answer> <answer>4",
        "no tags",
        "<answer>3",
        "</answer><answer>x</answer>",
    ],
)
@pytest.mark.parametrize("n", [0, 30, 59, 60, 80, 100, 101, 250])
def test_format_reward_released_matches_transcription(text, n):
    assert sayo.format_reward(text, n, variant="released") == pytest.approx(released_format(text, n), abs=1e-12)


def test_format_reward_released_differs_from_paper():
    two = "<answer>3</answer> so <answer>4</answer>"
    assert sayo.format_reward(two, 80) == 0.0 and sayo.format_reward(two, 80, variant="released") == 1.0
    unclosed = "<answer>3</answer> then <answer>4"  # the release's lookahead skips the closed block
    assert sayo.format_reward(unclosed, 80) == 1.0 and sayo.format_reward(unclosed, 80, variant="released") == 0.0


def test_top_entropy_and_r_att_released_match_transcription():
    B, T, H, K = 3, 12, 2, 20
    lengths = [9, 5, 7]  # padded to 9; jaxmm's width T = 12 (max_new_tokens)
    ent = rng.uniform(0.0, 3.0, (B, T)).astype(np.float32)
    comp = np.arange(T)[None, :] < np.array(lengths)[:, None]
    sel = np.asarray(sayo.select_high_entropy(ent, comp, 0.3, variant="released"))
    ids = released_top_entropy(ent, lengths)
    for b in range(B):
        assert sorted(np.flatnonzero(sel[b])) == sorted(ids[b])
    assert sel.sum(1).tolist() == [2, 2, 2]  # max(1, int(0.3 * 8)) in every row, padding included
    assert sel[1, 5:].any()  # a padded position of the short completion is picked

    w = rng.uniform(0.0, 1.0, (B, H, T, K)).astype(np.float32)
    w /= w.sum(-1, keepdims=True)
    span = [(3, 14), (3, 14), (3, 14)]  # image keys 3..14 (inclusive)
    focus = [[(2, 5)], [(0, 3)], [(6, 11)]]  # region offsets inside the image
    image = np.zeros((B, K), bool)
    image[:, 3:15] = True
    region = np.zeros((B, K), bool)
    for b, ((s, e),) in enumerate(focus):
        region[b, 3 + s : 3 + e + 1] = True
    got = np.asarray(sayo.r_att(w, image, region, sel))
    want = released_attn_reward(np.moveaxis(w, 2, 1), span, focus, ids)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_top_entropy_released_differs_from_paper():
    ent = np.array([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 2.0, 3.0]], np.float32)
    ent = np.concatenate([ent, ent])
    comp = np.zeros((2, 12), bool)
    comp[0, :10] = True
    comp[1, :4] = True
    paper = np.asarray(sayo.select_high_entropy(ent, comp, 0.3))
    rel = np.asarray(sayo.select_high_entropy(ent, comp, 0.3, variant="released"))
    assert np.flatnonzero(paper[0]).tolist() == [7, 8, 9] and np.flatnonzero(rel[0]).tolist() == [7, 8]
    # the short completion: paper keeps its own top 2; the release the width's top 2 (padding)
    assert np.flatnonzero(paper[1]).tolist() == [2, 3] and np.flatnonzero(rel[1]).tolist() == [7, 8]


def test_unknown_variant_raises():
    with pytest.raises(ValueError, match=r"variant='releasd'.*paper.*released"):
        sayo.format_reward("x", 10, variant="releasd")
    with pytest.raises(ValueError, match=r"variant='x'"):
        sayo.select_high_entropy(np.zeros((1, 3)), np.ones((1, 3), bool), variant="x")


def test_trl_loss_matches_transcription_and_differs_from_paper():
    B, T = 4, 6
    logp = np.log(rng.uniform(0.05, 0.9, (B, T))).astype(np.float32)
    old = (logp + rng.normal(0, 0.4, (B, T))).astype(np.float32)
    ref = (logp + rng.normal(0, 0.5, (B, T))).astype(np.float32)
    adv = np.array([1.5, -0.7, 0.3, -2.0], np.float32)
    lengths = np.array([6, 2, 4, 1])
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.int32)
    # TRL 0.25 GRPOTrainer._compute_loss, loss_type "dapo", one process, beta 1e-3, epsilon 0.2
    coef_1 = np.exp(logp - old)
    coef_2 = np.clip(coef_1, 1 - 0.2, 1 + 0.2)
    kl = np.exp(ref - logp) - (ref - logp) - 1
    per_token = -np.minimum(coef_1 * adv[:, None], coef_2 * adv[:, None]) + 1e-3 * kl
    want = (per_token * mask).sum() / mask.sum()
    got = float(grpo.grpo_loss(logp, old, ref, adv, mask, beta=1e-3, clip_eps=0.2, variant="trl"))
    assert got == pytest.approx(want, abs=1e-5)
    paper = float(grpo.grpo_loss(logp, old, ref, adv, mask, beta=1e-3, clip_eps=0.2))
    assert abs(paper - got) > 1e-2  # per-sequence means vs one token mean


def test_released_grpo_config_loads():
    from jaxmm.train.grpo import GRPOConfig

    cfg = GRPOConfig.from_yaml(ROOT / "configs/train/grpo_sayo_released.yaml")
    got = (cfg.loss_variant, cfg.sayo_variant, cfg.kl_beta, cfg.clip_eps, cfg.clip_eps_high)
    assert got == ("trl", "released", 0.001, 0.2, None)
    assert cfg.rewards == {"r_att": 1.0, "format": 1.0} and cfg.top_p == 0.9 and cfg.clip_norm == 0.8
    assert cfg.system_prompt == "sayo"
    with pytest.raises(ValueError, match=r"sayo_variant='paperr'.*\('paper', 'released'\)"):
        GRPOConfig.from_yaml(ROOT / "configs/train/grpo_sayo_released.yaml", ["sayo_variant=paperr"])


def test_grpo_released_wiring_on_the_organism(tmp_path):
    """sayo_variant / loss_variant / system_prompt through a real rollout and update: r_att on the
    release's top-k entropy positions and TRL's loss at the on-policy update, by hand from the
    teacher-forced forward."""
    import jax.numpy as jnp

    import jaxmm
    from jaxmm import organism
    from jaxmm.attention import AttentionWeights
    from jaxmm.models.qwen2_5_vl.modeling import forward
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
        rewards={"r_att": 1.0, "format": 1.0},
        sayo_variant="released",
        loss_variant="trl",
        kl_beta=0.05,
        system_prompt="sayo",
    )
    model = jaxmm.load(organism.default())
    state = initial_state(cfg, model.params, model.config)
    ds = dataset(cfg)
    batch, tokens, mask, scored, _, rewards, texts, lengths = rollout(
        model, cfg, state, model.params, [ds[0], ds[1]], 0, make_score_fn(model.config, cfg)
    )
    prompt_text = model.tokenizer.decode(np.asarray(batch.input_ids)[0], skip_special_tokens=False)
    assert sayo.SYSTEM_PROMPT[:40] in prompt_text and np.asarray(batch.layout.system_mask).sum(1).min() > 20
    last = model.config.text.num_hidden_layers - 1
    full = forward(model.params, model.config, batch, probes=(AttentionWeights(layers=(last,)),))
    s = batch.input_ids.shape[1] - tokens.shape[1]
    lg = np.asarray(full.logits, np.float64)[:, s - 1 : s - 1 + tokens.shape[1]]
    lp = lg - lg.max(-1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    ent = -(np.exp(lp) * lp).sum(-1)
    att = np.asarray(full.probes["attentions"]["text"].values, np.float64)[0][:, :, s:]  # [B,H,T,K]
    img = np.asarray(batch.layout.image_mask, bool)
    reg = np.asarray(batch.layout.region_weight) > 0
    width = int(max(lengths)) - 1
    k = max(1, int(width * 0.3))
    for b in range(len(texts)):
        top = np.argsort(-ent[b, :width], kind="stable")[:k]
        a_r = att[b][:, top][..., reg[b]].mean()
        a_v = att[b][:, top][..., img[b]].mean()
        np.testing.assert_allclose(rewards["r_att"][b], math.tanh(math.log((a_r + 1e-8) / (a_v + 1e-8))), atol=1e-5)
        assert rewards["format"][b] == released_format(texts[b], int(lengths[b]))
    rng_ = np.random.default_rng(2)
    lp_old = np.asarray(scored["logp"], np.float64)
    ref_lp = lp_old + rng_.normal(0, 0.5, lp_old.shape)
    adv = rng_.normal(0, 1, len(texts))
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
    kl = np.exp(ref_lp - lp_old) - (ref_lp - lp_old) - 1
    want = ((-adv[:, None] + 0.05 * kl) * mk).sum() / mk.sum()  # ratio 1 on-policy
    np.testing.assert_allclose(float(m["loss"]), want, rtol=1e-4, atol=1e-5)
