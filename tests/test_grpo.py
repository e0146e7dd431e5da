"""GRPO trainer: the attention reward rises on a fixed seed, a SIGKILLed run resumes to the same
parameters, the update's loss and KL equal numpy on a real rollout, LoRA trains only adapters."""

import json
import os
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np

from jaxmm.train.grpo import GRPOConfig, make_score_fn, make_update, rollout, train
from jaxmm.train.sft import final_state, flat_params

GROUNDING = {
    "name": "grounded",
    "size": 4,
    "seed": 3,
    "image_size": 112,
    "shape_scale": 0.35,
    "contrast": 0.5,
    "tasks": ["grounding"],
}


def cfg_for(tmp_path, name, **kw):
    base = dict(
        out=str(tmp_path / name),
        steps=16,
        prompts_per_step=4,
        group_size=4,
        max_new_tokens=8,
        lr=1e-3,
        save_every=100,
        tensorboard=False,
        data=dict(GROUNDING),
        rewards={"r_att": 1.0},
    )
    base.update(kw)
    return GRPOConfig(**base)


def _rows(out):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def test_attention_reward_rises_on_a_fixed_seed(tmp_path):
    """SAYO's r_att alone as the reward, the same 4 grounding prompts every step (seed fixed)."""
    rows = _rows(train(cfg_for(tmp_path, "rise"), progress=False))
    r = np.array([x["reward/r_att"] for x in rows])
    assert len(r) == 16
    first, last = r[:4].mean(), r[-4:].mean()
    assert last > first + 0.15, r.round(3)
    slope = np.polyfit(np.arange(len(r)), r, 1)[0]
    assert slope > 0.01, r.round(3)
    assert all(np.isfinite(x["kl"]) and x["kl"] >= 0 for x in rows)
    assert all(np.isfinite(x[k]) for x in rows for k in ("region_ratio", "vas", "entropy", "length", "loss"))


def test_update_loss_and_kl_equal_numpy_on_a_rollout(tmp_path):
    import jaxmm
    from jaxmm import organism
    from jaxmm.objectives.grpo import group_advantages
    from jaxmm.train.sft import dataset, initial_state, optimizer, state_mask

    cfg = cfg_for(tmp_path, "np", kl_beta=0.05, group_size=3, prompts_per_step=2, rewards={"accuracy": 1.0, "r_att": 0.5})
    model = jaxmm.load(organism.default())
    state = initial_state(cfg, model.params, model.config)
    ds = dataset(cfg)
    score_fn = make_score_fn(model.config, cfg)
    batch, tokens, mask, scored, _, rewards, texts, lengths = rollout(
        model, cfg, state, model.params, [ds[0], ds[1]], 0, score_fn
    )
    # the completion mask: tokens up to and including the stop token, nothing after
    np.testing.assert_array_equal(np.asarray(mask).sum(1), np.asarray(lengths))
    assert not np.asarray(mask)[:, 1:][~np.asarray(mask)[:, :-1]].any()
    # the rollout's log-probs are those of the sampled tokens under the teacher-forced forward
    from jaxmm.attention import AttentionWeights
    from jaxmm.models.qwen2_5_vl.modeling import forward

    full = forward(model.params, model.config, batch, probes=(AttentionWeights(),))
    logits = np.asarray(full.logits, np.float64)
    s = batch.input_ids.shape[1] - tokens.shape[1]
    lg = logits[:, s - 1 : s - 1 + tokens.shape[1]]
    lp_np = lg - np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1, keepdims=True)) - lg.max(-1, keepdims=True)
    want_lp = np.take_along_axis(lp_np, np.asarray(tokens)[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(scored["logp"]), want_lp, atol=1e-4)
    # r_att and the logged region ratio / VAS by hand from the full attention maps [L,B,H,S,S]
    att = np.asarray(full.probes["attentions"]["text"].values, np.float64)[:, :, :, s:]  # completion queries
    lay, mk = batch.layout, np.asarray(mask)
    img, sysm = np.asarray(lay.image_mask, np.float64), np.asarray(lay.system_mask, np.float64)
    w = np.asarray(lay.region_weight, np.float64)
    a_v = (att * img[None, :, None, None]).sum(-1) / img.sum(-1)[None, :, None, None]  # [L,B,H,T]
    a_r = (att * w[None, :, None, None]).sum(-1) / w.sum(-1)[None, :, None, None]
    a_rb = (att * (w > 0)[None, :, None, None]).sum(-1) / (w > 0).sum(-1)[None, :, None, None]
    ent = -(np.exp(lp_np) * lp_np).sum(-1)  # [B,T]
    for b in range(len(texts)):
        n = int(lengths[b])
        assert np.all(w[b] >= 0) and w[b].sum() > 0  # every grounded sample has a box
        top = np.argsort(-ent[b, :n], kind="stable")[: int(np.ceil(0.3 * n))]
        want = np.tanh(np.log((a_rb[-1, b, :, top].mean() + 1e-8) / (a_v[-1, b, :, top].mean() + 1e-8)))
        np.testing.assert_allclose(rewards["r_att"][b], want, atol=1e-5)
        np.testing.assert_allclose(rewards["region_ratio"][b], (a_r[:, b, :, :n] / (a_v[:, b, :, :n] + 1e-12)).mean(), rtol=1e-4)
        m_v = (att[:, b, :, :n] * img[b]).sum(-1)
        m_s = (att[:, b, :, :n] * sysm[b]).sum(-1)
        np.testing.assert_allclose(rewards["vas"][b], (m_v / (m_s + 1e-6)).mean(), rtol=1e-4)
    # a reference that differs from the policy, so the KL term is not zero
    rng = np.random.default_rng(0)
    ref_lp = np.asarray(scored["logp"]) + rng.normal(0, 0.3, tokens.shape)
    r = 1.0 * rewards["accuracy"] + 0.5 * rewards["r_att"]
    adv = np.asarray(group_advantages(jnp.asarray(r, jnp.float32), 3))
    tx = optimizer(cfg, state)
    update = make_update(model.config, cfg, tx, state_mask(cfg, state))
    _, _, m = update(
        state, tx.init(state), batch, tokens, mask, scored["logp"], jnp.asarray(ref_lp, jnp.float32), jnp.asarray(adv)
    )
    # by hand: on-policy ratio 1, so the clipped term is A; k3 with δ = ref − logp
    lp = np.asarray(scored["logp"], np.float64)
    d = np.clip(ref_lp - lp, -20, 20)
    k3 = np.exp(d) - d - 1
    mk = np.asarray(mask, np.float64)
    per_seq = ((adv[:, None] - 0.05 * k3) * mk).sum(1) / np.maximum(mk.sum(1), 1)
    np.testing.assert_allclose(float(m["loss"]), -per_seq.mean(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(float(m["kl"]), (k3 * mk).sum() / mk.sum(), rtol=1e-4)
    r_np = r.reshape(2, 3)
    adv_np = (r_np - r_np.mean(1, keepdims=True)) / (r_np.std(1, ddof=1, keepdims=True) + 1e-4)
    np.testing.assert_allclose(adv, adv_np.reshape(-1), rtol=1e-4, atol=1e-5)
    assert len(texts) == 6 and np.all(np.asarray(lengths) >= 1)


def test_lora_grpo_moves_only_the_adapters(tmp_path):
    import jaxmm
    from jaxmm import organism

    from jaxmm.train import lora
    from jaxmm.train.grpo import _prompts
    from jaxmm.train.sft import assemble, dataset, initial_state
    from jaxmm.models.qwen2_5_vl.modeling import forward

    cfg = cfg_for(tmp_path, "lora", steps=2, lora={"rank": 4, "alpha": 8}, lr=1e-2)
    model = jaxmm.load(organism.default())
    state = initial_state(cfg, model.params, model.config)
    assert set(state) == {"params", "lora"} and len(state["lora"]) > 0
    prompt = _prompts(model, [dataset(cfg)[0]], 2)[0]
    base = np.asarray(forward(model.params, model.config, prompt).logits)
    np.testing.assert_array_equal(np.asarray(forward(assemble(state, cfg)[0], model.config, prompt).logits), base)
    out = train(cfg, progress=False)
    groups, step = final_state(out)
    start, trained = flat_params(model.params), flat_params(groups["params"])
    assert step == 2 and all(np.array_equal(start[k], trained[k]) for k in start)
    assert max(np.abs(np.asarray(v["b"])).max() for v in groups["lora"].values()) > 0
    # and the adapters change the policy: merged logits now differ from the base model's
    moved = forward(
        lora.merge(groups["params"], groups["lora"], lora.LoraConfig.from_dict(cfg.lora)), model.config, prompt
    ).logits
    assert np.abs(np.asarray(moved) - base).max() > 1e-4


SCRIPT = """
import json, sys
from jaxmm.train.grpo import GRPOConfig, train
train(GRPOConfig(**json.loads(sys.argv[1])), progress=False)
"""


def test_sigkill_and_resume_gives_the_same_parameters(tmp_path):
    # one persistent compilation cache for the three processes (the same executables, less compile time)
    env = {
        **os.environ,
        "XLA_FLAGS": "",
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax-cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    kw = dict(steps=6, save_every=2, keep=5, prompts_per_step=2, group_size=4, max_new_tokens=6)
    a, b = cfg_for(tmp_path, "killed", **kw), cfg_for(tmp_path, "whole", **kw)
    args = lambda c: [sys.executable, "-c", SCRIPT, json.dumps(c.__dict__)]
    proc = subprocess.Popen(args(a), env=env)
    ckpt = tmp_path / "killed" / "checkpoints"
    t0 = time.time()
    while not (ckpt / "2").exists() and proc.poll() is None and time.time() - t0 < 300:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
    assert done and done[-1] < 6, done  # killed before the end
    subprocess.run(args(a), env=env, check=True)  # resumes
    subprocess.run(args(b), env=env, check=True)
    pa, sa = final_state(tmp_path / "killed")
    pb, sb = final_state(tmp_path / "whole")
    assert sa == sb == 6
    fa, fb = flat_params(pa["params"]), flat_params(pb["params"])
    assert max(np.abs(fa[k] - fb[k]).max() for k in fa) <= 1e-6
    import jaxmm
    from jaxmm import organism

    start = flat_params(jaxmm.load(organism.default()).params)
    assert max(np.abs(fa[k] - start[k]).max() for k in fa) > 1e-4  # training did move them
