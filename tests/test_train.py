"""SFT: the loss goes down, freezing holds, and a SIGKILLed run resumes to the same parameters."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

from jaxmm.train.sft import TrainConfig, final_params, flat_params, token_loss, train


def cfg_for(tmp_path, name, **kw):
    base = dict(
        model="organism-random",
        out=str(tmp_path / name),
        steps=12,
        batch_size=4,
        lr=3e-3,
        save_every=4,
        keep=3,
        log_every=1,
        seq_len=160,
        data={"name": "grounded", "size": 64, "seed": 1, "image_size": 112},
    )
    base.update(kw)
    return TrainConfig(**base)


def test_token_loss_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 5, 7)).astype(np.float32)
    labels = np.array([[-100, -100, 3, 4, -100], [-100, 1, 2, -100, -100]])
    lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = np.mean([-lp[0, 1, 3], -lp[0, 2, 4], -lp[1, 0, 1], -lp[1, 1, 2]])
    assert abs(float(token_loss(logits, labels)) - want) < 1e-5


def test_loss_goes_down_and_frozen_parameters_stay(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXMM_HOME", str(tmp_path / "home"))
    cfg = cfg_for(tmp_path, "run", steps=20, save_every=20, freeze=[r"^visual\."])
    out = train(cfg, progress=False)
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    first, last = np.mean([r["loss"] for r in rows[:3]]), np.mean([r["loss"] for r in rows[-3:]])
    assert last < 0.7 * first, (first, last)
    import jaxmm
    from jaxmm import organism

    start = flat_params(jaxmm.load(organism.build()).params)
    trained, step = final_params(out)
    trained = flat_params(trained)
    assert step == 20 and set(trained) == set(start)
    for k in start:
        moved = np.abs(trained[k] - start[k]).max() > 0
        assert moved == (not k.startswith("visual.")), k


SCRIPT = """
import sys
from jaxmm.train.sft import TrainConfig, train
cfg = TrainConfig(**__import__("json").loads(sys.argv[1]))
train(cfg, progress=False)
"""


def test_sigkill_and_resume_gives_the_same_parameters(tmp_path):
    env = {**os.environ, "JAXMM_HOME": str(tmp_path / "home"), "XLA_FLAGS": ""}
    a = cfg_for(tmp_path, "interrupted")
    b = cfg_for(tmp_path, "straight")
    arg = lambda c: json.dumps(c.__dict__)
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, arg(a)], env=env)
    ckpt = tmp_path / "interrupted" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not any(p.name == "4" for p in ckpt.glob("*")):
        time.sleep(0.2)
        assert proc.poll() is None, "training ended before the kill"
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps_done = sorted(int(p.name) for p in ckpt.glob("*") if p.name.isdigit())
    assert steps_done and steps_done[-1] < 12, steps_done
    subprocess.run([sys.executable, "-c", SCRIPT, arg(a)], env=env, check=True)
    subprocess.run([sys.executable, "-c", SCRIPT, arg(b)], env=env, check=True)
    pa, sa = final_params(tmp_path / "interrupted")
    pb, sb = final_params(tmp_path / "straight")
    assert sa == sb == 12
    fa, fb = flat_params(pa), flat_params(pb)
    assert max(float(np.abs(fa[k] - fb[k]).max()) for k in fa) <= 1e-6


def test_remat_gives_the_same_loss_and_gradients(tmp_path, monkeypatch):
    """forward(remat=True) (each decoder layer under jax.checkpoint) against the plain forward: the
    same SFT + AGTO loss and the same gradients for the backbone and a RAVE module (open gates)."""
    import dataclasses

    from jaxmm import attention

    import jax
    import jax.numpy as jnp

    import jaxmm
    from jaxmm import organism
    from jaxmm.interventions import rave
    from jaxmm.models.core.model import forward
    from jaxmm.objectives.avar import agto_extra_loss, agto_probes
    from jaxmm.processing.batch import sft_batch
    from jaxmm.train.sft import dataset, sft_example

    monkeypatch.setenv("JAXMM_HOME", str(tmp_path / "home"))
    model = jaxmm.load(organism.resolve(None))
    cfg = cfg_for(tmp_path, "remat")
    ds = dataset(cfg)
    batch, labels = sft_batch(model, [sft_example(model, ds[i], cfg.seq_len) for i in range(3)])
    mod = rave.init(model.config, layers=[1, 3], rank=4)
    mod = dataclasses.replace(mod, gamma=jnp.full_like(mod.gamma, 0.5))
    probes, extra = agto_probes(), agto_extra_loss()

    def loss(params, mod, remat):
        out = forward(params, model.config, batch, (mod,), probes, remat=remat)
        return token_loss(out.logits, labels) + extra(out, batch)

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)
    # query chunks of 64 < 160 tokens: under remat every layer (plain and probed) attends in chunks
    # whose scores the backward recomputes
    with attention.options(query_chunk=64):
        (l0, (gp0, gm0)), (l1, (gp1, gm1)) = grad(model.params, mod, False), grad(model.params, mod, True)
    assert abs(float(l0) - float(l1)) < 1e-5 * abs(float(l0))
    for a, b in zip(jax.tree_util.tree_leaves((gp0, gm0)), jax.tree_util.tree_leaves((gp1, gm1))):
        a, b = np.asarray(a), np.asarray(b)
        assert np.max(np.abs(a - b)) <= 1e-5 * max(np.max(np.abs(a)), 1e-12) + 1e-7
    assert np.max(np.abs(np.asarray(gm1.gamma))) > 0  # the RAVE gates do get a gradient
