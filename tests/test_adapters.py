"""LoRA and RAVE: exact at initialisation, formulas against numpy, generation with the pre-RoPE key
cache, training with the backbone frozen, checkpoint groups, save/load, TensorBoard events."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

import jaxmm
from jaxmm import organism
from jaxmm.attention import AttentionWeights
from jaxmm.interventions import rave as R
from jaxmm.models.qwen2_5_vl.modeling import forward
from jaxmm.train import lora as L
from jaxmm.train.sft import TrainConfig, final_rave, final_state, flat_params, train


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = organism.build(tmp_path_factory.mktemp("organism") / "org")
    model = jaxmm.load(path)
    from skimage import data
    from PIL import Image

    img = Image.fromarray(data.astronaut()).resize((112, 84))
    msgs = [
        [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "the cat ?"}]}],
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": img.rotate(90, expand=True)},
                    {"type": "text", "text": "what color is the car in the picture ?"},
                ],
            }
        ],
    ]
    batch, info = model.prepare_chat(msgs)
    return model, batch, path, info


def _rave(model, kind, seed=1, gamma=0.7, **kw):
    rv = R.init(model.config, kind=kind, rank=4, seed=seed, **kw)
    g = np.random.default_rng(seed).uniform(-gamma, gamma, rv.gamma.shape).astype(np.float32)
    return type(rv)(**{**rv.__dict__, "gamma": jnp.asarray(g)})


# ----------------------------------------------------------------------------- LoRA
def test_lora_is_exact_at_init_and_merges_as_numpy(setup):
    model, batch = setup[:2]
    cfg = L.LoraConfig(rank=4, alpha=8)
    lora = L.init(model.params, cfg)
    assert len(lora) == 4 * 7 and all(np.all(np.asarray(ab["b"]) == 0) for ab in lora.values())
    base = np.asarray(forward(model.params, model.config, batch).logits)
    same = np.asarray(forward(L.merge(model.params, lora, cfg), model.config, batch).logits)
    assert np.array_equal(base, same)
    rng = np.random.default_rng(0)
    lora = {k: {"a": v["a"], "b": jnp.asarray(rng.standard_normal(v["b"].shape), jnp.float32)} for k, v in lora.items()}
    merged, flat = flat_params(L.merge(model.params, lora, cfg)), flat_params(model.params)
    for name in flat:
        want = flat[name] + (8 / 4) * np.asarray(lora[name]["a"]) @ np.asarray(lora[name]["b"]) if name in lora else flat[name]
        np.testing.assert_allclose(merged[name], want, atol=1e-6, err_msg=name)
    with pytest.raises(ValueError, match="match no parameter"):
        L.init(model.params, L.LoraConfig(targets=["nothing"]))
    with pytest.raises(ValueError, match="only 2-D kernels"):
        L.init(model.params, L.LoraConfig(targets=[r"language_model\.norm\.weight"]))


# ----------------------------------------------------------------------------- RAVE
def test_rave_at_init_leaves_logits_unchanged(setup):
    model, batch = setup[:2]
    for kind in R.KINDS:
        rv = R.init(model.config, kind=kind, rank=4, layers=[1, 3], heads=[0, 2])
        base = np.asarray(forward(model.params, model.config, batch).logits)
        with_rave = np.asarray(forward(model.params, model.config, batch, (rv,)).logits)
        assert np.array_equal(base, with_rave), kind


def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


@pytest.mark.parametrize("kind", R.KINDS)
def test_rave_bias_matches_numpy_formula(setup, kind):
    """The change of layer 0's log attention weights equals methods.md's bias on image keys, with
    q̃, k̃ recomputed in numpy from the layer's input hidden states (pre-RoPE, before softmax)."""
    model, batch = setup[:2]
    t = model.config.text
    rv = _rave(model, kind, layers=[0], heads=[1, 2, 3])
    probe = AttentionWeights(layers=(0,))
    base = forward(model.params, model.config, batch, (), (probe,), output_hidden_states=True)
    out = forward(model.params, model.config, batch, (rv,), (probe,))
    a0 = np.asarray(base.probes[probe.name]["text"].values[0], np.float64)  # [B,H,T,K]
    a1 = np.asarray(out.probes[probe.name]["text"].values[0], np.float64)
    p = flat_params(model.params)
    x = _rms(np.asarray(base.hidden_states[0], np.float64), p["language_model.layers.0.input_layernorm.weight"], t.rms_norm_eps)
    att = "language_model.layers.0.self_attn."
    q = (x @ p[att + "q_proj.kernel"] + p[att + "q_proj.bias"]).reshape(*x.shape[:2], t.num_attention_heads, t.head_dim)
    k = (x @ p[att + "k_proj.kernel"] + p[att + "k_proj.bias"]).reshape(*x.shape[:2], t.num_key_value_heads, t.head_dim)
    u, w = np.asarray(rv.u[0], np.float64), np.asarray(rv.w[0], np.float64)
    rep = t.num_attention_heads // t.num_key_value_heads
    bias = np.zeros(a0.shape)
    for h in (1, 2, 3):
        uq = q[:, :, h] @ u[h].T  # [B,T,r]
        wk = k[:, :, h // rep] @ w[h // rep].T  # [B,K,r]
        if kind == "bilinear":
            b = uq @ wk.transpose(0, 2, 1) / np.sqrt(u.shape[1])
        else:
            c, v = np.asarray(rv.c[0], np.float64)[h], np.asarray(rv.v[0], np.float64)[h]
            pre = uq[:, :, None, :] + wk[:, None, :, :] + c
            b = (pre / (1 + np.exp(-pre))) @ v
        bias[:, h] = np.tanh(float(rv.gamma[0, h])) * b
    image = np.asarray(batch.layout.image_mask, bool)[:, None, None, :]
    bias = bias * image
    valid = (a0 > 0) & (a1 > 0)
    d = np.where(valid, np.log(np.where(valid, a1, 1)) - np.log(np.where(valid, a0, 1)) - bias, 0)
    # what remains is the per-row log-normaliser change: constant over the valid keys of each row
    rows = valid.any(-1)
    mean = d.sum(-1, keepdims=True) / np.maximum(valid.sum(-1, keepdims=True), 1)
    assert np.abs(np.where(valid, d - mean, 0)).max() < 2e-4
    assert np.abs(bias).max() > 0.05 and rows.sum() > 0


def test_rave_generation_with_pre_rope_key_cache_equals_recomputation(setup):
    """Decoding sees every key's k̃ through the pre-RoPE key cache: each step's logits equal a
    teacher-forced forward over prompt + generated tokens (no cache)."""
    model, batch, _, info = setup
    from jaxmm.generate import generate

    rv = _rave(model, "bilinear", gamma=2.0, layers=[0, 2])
    out = generate(model.params, model.config, batch, max_new_tokens=6, interventions=(rv,), output_logits=True)
    plain = generate(model.params, model.config, batch, max_new_tokens=6, output_logits=True)
    assert np.abs(np.asarray(out.logits[:, 0]) - np.asarray(plain.logits[:, 0])).max() > 1e-3
    toks, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    ids = np.concatenate([np.asarray(batch.input_ids), toks], 1)
    am = np.concatenate([np.asarray(batch.attention_mask), np.ones_like(toks)], 1)
    full = model.prepare(ids, am, np.asarray(batch.pixel_values), np.asarray(info["image_grid_thw"]))
    ref = np.asarray(forward(model.params, model.config, full, (rv,)).logits)
    s = batch.input_ids.shape[1]
    for b in range(toks.shape[0]):
        n = max(1, min(int(lengths[b]), 5))
        np.testing.assert_allclose(np.asarray(out.logits)[b, :n], ref[b, s - 1 : s - 1 + n], atol=1e-4)


def test_rave_save_load_roundtrip_and_errors(setup, tmp_path):
    model, batch = setup[:2]
    rv = _rave(model, "mlp", layers=[1], heads=[0])
    back = R.load(R.save(rv, tmp_path / "rave"))
    assert back.layers == rv.layers and back.heads == rv.heads and back.kind == rv.kind
    for f in ("gamma", "u", "w", "c", "v"):
        assert np.array_equal(np.asarray(getattr(back, f)), np.asarray(getattr(rv, f)))
    with pytest.raises(ValueError, match="layers"):
        R.init(model.config, layers=[9])
    with pytest.raises(ValueError, match="kind"):
        R.init(model.config, kind="conv")
    with pytest.raises(FileNotFoundError, match="rave.json"):
        R.load(tmp_path)


# ----------------------------------------------------------------------------- training
def _cfg(tmp_path, name, **kw):
    base = dict(
        out=str(tmp_path / name),
        steps=4,
        batch_size=2,
        lr=3e-2,
        save_every=2,
        keep=2,
        log_every=1,
        seq_len=160,
        data={"name": "grounded", "size": 16, "seed": 1, "image_size": 112},
    )
    base.update(kw)
    return TrainConfig(**base)


def test_rave_trains_with_frozen_backbone_and_is_its_own_checkpoint_group(setup, tmp_path, monkeypatch):
    model, batch, path = setup[:3]
    monkeypatch.setenv("JAXMM_HOME", str(tmp_path / "home"))
    cfg = _cfg(tmp_path, "rave", model=str(path), freeze=[".*"], rave={"layers": [1, 2], "rank": 4})
    out = train(cfg, progress=False)
    groups, step = final_state(out)
    assert step == 4 and set(groups) == {"params", "rave"}
    start, trained = flat_params(model.params), flat_params(groups["params"])
    assert all(np.array_equal(start[k], trained[k]) for k in start)
    rv = final_rave(out, model.config)
    assert rv.layers == (1, 2) and np.abs(np.asarray(rv.gamma)).max() > 0
    # the trained module changes the model; the events file holds the loss
    assert not np.allclose(
        np.asarray(forward(model.params, model.config, batch, (rv,)).logits),
        np.asarray(forward(model.params, model.config, batch).logits),
        atol=1e-6,
    )
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events and b"loss" in events[0].read_bytes()
    # resuming a finished run restores the module's static fields too
    cfg2 = _cfg(tmp_path, "rave", model=str(path), freeze=[".*"], rave={"layers": [1, 2], "rank": 4}, steps=6)
    train(cfg2, progress=False)
    assert final_state(out)[1] == 6


def test_lora_training_moves_only_adapters(setup, tmp_path, monkeypatch):
    model, batch, path = setup[:3]
    monkeypatch.setenv("JAXMM_HOME", str(tmp_path / "home"))
    cfg = _cfg(tmp_path, "lora", model=str(path), lora={"rank": 4, "alpha": 8}, tensorboard=False)
    out = train(cfg, progress=False)
    groups, _ = final_state(out)
    start, trained = flat_params(model.params), flat_params(groups["params"])
    assert all(np.array_equal(start[k], trained[k]) for k in start)
    assert max(np.abs(np.asarray(v["b"])).max() for v in groups["lora"].values()) > 0
    from jaxmm.train.sft import final_params

    merged, _ = final_params(out)
    diff = {k: np.abs(v - start[k]).max() for k, v in flat_params(merged).items()}
    assert all((d > 0) == bool(L.targets_of(model.params, L.LoraConfig()).get(k)) for k, d in diff.items())


def test_agto_from_config_adds_the_avar_losses(setup, tmp_path, monkeypatch):
    """``agto:`` in the config adds α·L_enh + β·L_sup (objectives.avar, tested against numpy there)."""
    model, batch, path = setup[:3]
    monkeypatch.setenv("JAXMM_HOME", str(tmp_path / "home"))
    out = train(
        _cfg(tmp_path, "agto", model=str(path), steps=2, agto={"alpha": 0.15, "beta": 0.15}, tensorboard=False), progress=False
    )
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(abs(r["total"] - r["loss"]) > 1e-4 for r in rows)
    with pytest.raises(ValueError, match="agto: unknown"):
        train(_cfg(tmp_path, "bad", model=str(path), agto={"gamma": 1.0}), progress=False)
