"""RATION ``variant="released"`` against a transcription of the authors' code (lmms-eval
``entropy_qwen_vl``: task_select.py, controller.py, mixin.py), written here in numpy/torch from the
release: the router on δ, and the edit pass in transformers with the released k_proj hook (τ from
the hooked layer's own q_proj/k_proj of every prompt token, image keys scaled by 1/τ before the
cache, decode steps meeting the scaled keys)."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import jaxmm
import tiny
from jaxmm import interventions as I
from jaxmm.attention import plan
from jaxmm.generate import generate
from jaxmm.interventions.ration import TASKS, route_released
from jaxmm.models import qwen2_5_vl
from test_methods import compare, hf_run
from test_qwen2_5_vl_parity import make_batch

ROOT = Path(__file__).parents[1]
TOP_K = 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("released_ration")
    hf_model = tiny.save_hf_model("gqa_untied", path, seed=7)
    model = jaxmm.load(path)
    raw = make_batch([["astronaut", "chelsea"]], "left")  # the release runs one sample at a time
    return hf_model, model, raw, model.prepare(**raw)


def np_task_select(delta_by_layer):
    """task_select.py, transcribed: {layer id: δ} -> (task, direction)."""
    g = lambda i: delta_by_layer.get(i, 0)
    ocr = g(13) >= 2 and (g(19) >= 1 or g(23) >= 1 or g(24) >= 1)
    position = g(12) >= 4 and (g(11) >= 2 or g(10) >= 3) and g(24) >= 1 and (g(24) >= 2 or g(23) >= 1)
    counting = (
        (
            g(10) >= 6
            or g(12) >= 6
            or g(11) >= 5
            or (g(10) >= 5 and g(12) >= 4)
            or (g(10) >= 5 and g(11) >= 3)
            or (g(11) >= 4 and g(12) >= 4)
        )
        and (g(23) >= 1 or g(24) >= 1)
        and g(12) >= 2
        and g(14) >= 1
    )
    recogn = (
        ((g(9) >= 2 and g(10) >= 2) or (g(10) >= 3 and g(12) >= 3) or (g(12) >= 4 and g(14) >= 1)) and g(24) >= 1 and g(13) <= 2
    )
    task = "ocr" if ocr else "grounding" if position else "counting" if counting else "recogn" if recogn else "counting"
    return task, {"recogn": 0, "counting": 1, "grounding": 0, "ocr": 0}[task]


def np_deltas(scores):
    """mixin.py sorted(..., reverse=True) + task_select.rank_deltas: {layer id: δ}."""
    ranked = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)
    return {lid: (max(ranked) - lid) - pos for pos, lid in enumerate(ranked)}


def test_released_router_matches_task_select():
    rng = np.random.default_rng(0)
    seen = set()
    for n in range(3000):
        # scores that favour middle layers half the time, so every rule fires on some draws
        s = rng.normal(size=28) + (n % 2) * np.where((np.arange(28) >= 9) & (np.arange(28) <= 14), 2.0, 0.0)
        d = np_deltas(s)
        task, direct = np_task_select(d)
        delta = np.array([[d[i] for i in range(28)]])
        got = TASKS[int(route_released(delta)[0])]
        assert got == {"recogn": "recognition"}.get(task, task), (n, d)
        assert (got == "counting") == (direct == 1)
        seen.add(task)
    assert seen == {"ocr", "grounding", "counting", "recogn"}
    # a backbone without layers 9-24 (the tiny model): every rule sees δ = 0 -> counting
    assert TASKS[int(route_released(np.zeros((1, 3)))[0])] == "counting"


def released_oracle(hf_model, raw, top_k=TOP_K, d_a=1.0, d_b=1.0, new_tokens=0):
    """The release on transformers: select pass (residual updates over the image span), route,
    then the edit pass with KVEntropyControllerLite's k_proj hook on the key layers."""
    ids = raw["input_ids"]
    idxs = np.flatnonzero(ids[0] == tiny.IMAGE_TOKEN)
    lo, hi = int(idxs[0]), int(idxs[-1]) + 1
    layers = hf_model.model.language_model.layers
    scores = {}
    hooks = [
        layer.register_forward_hook(
            lambda m, x, y, i=i: scores.__setitem__(
                i, float((y[0] if isinstance(y, tuple) else y)[:, lo:hi].sub(x[0][:, lo:hi]).abs().mean())
            )
        )
        for i, layer in enumerate(layers)
    ]
    hf_run(hf_model, raw)
    for h in hooks:
        h.remove()
    s = [scores[i] for i in range(len(layers))]
    task, direct = np_task_select(np_deltas(s))
    rank = np.argsort(np.argsort(-np.asarray(s), kind="stable"), kind="stable")
    key_layers = [i for i in range(len(layers)) if rank[i] < top_k]
    cfg = hf_model.config.text_config
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    dh = cfg.hidden_size // nh
    taus = {}

    def k_hook(i):
        attn = layers[i].self_attn

        def hook(module, inputs, k):
            b, t, dk = k.shape
            if t <= 1:
                return k
            q = attn.q_proj(inputs[0]).view(b, t, nh, dh).permute(0, 2, 1, 3)
            kh = k.view(b, t, nkv, dh).permute(0, 2, 1, 3)
            kr = kh.repeat_interleave(nh // nkv, dim=1)
            probs = torch.softmax(q.double() @ kr.double().transpose(-1, -2) / math.sqrt(dh), -1)
            vm = torch.zeros(b, 1, 1, t, dtype=torch.bool)
            vm[..., lo:hi] = True
            pv = probs * vm
            pn = pv / pv.sum(-1, keepdim=True).clamp_min(1e-12)
            h_head = (-(pn * pn.clamp_min(1e-12).log()).sum(-1)).mean(-1).mean(0)
            tau = h_head.max() / (h_head.mean() + 1e-6) * d_a if direct == 1 else h_head.min() / (h_head.mean() + 1e-6) * d_b
            taus[i] = float(tau)
            scaled = torch.where(vm.view(1, 1, t, 1).expand(b, nkv, t, 1), kh * (1.0 / float(tau)), kh)
            return scaled.permute(0, 2, 1, 3).reshape(b, t, dk)

        return hook

    hooks = [layers[i].self_attn.k_proj.register_forward_hook(k_hook(i)) for i in key_layers]
    try:
        ref = hf_run(hf_model, raw)
        gen = None
        if new_tokens:
            t = {k: torch.from_numpy(v) for k, v in raw.items()}
            with torch.no_grad():
                gen = hf_model.generate(
                    **t,
                    mm_token_type_ids=torch.from_numpy(tiny.mm_token_type_ids(ids)),
                    max_new_tokens=new_tokens,
                    do_sample=False,
                    eos_token_id=None,
                    pad_token_id=0,
                    output_logits=True,
                    return_dict_in_generate=True,
                )
    finally:
        for h in hooks:
            h.remove()
    return dict(ref=ref, task=task, key_layers=key_layers, taus=taus, gen=gen)


def test_released_edit_pass_matches_the_release(setup):
    hf_model, model, raw, batch = setup
    want = released_oracle(hf_model, raw)
    assert want["task"] == "counting" and len(want["key_layers"]) == TOP_K
    assert max(abs(t - 1) for t in want["taus"].values()) > 1e-2  # the edit is not the identity
    iv = I.build([f"ration:top_k={TOP_K},variant=released"], model.config)[0]
    assert (iv.variant, iv.d_a, iv.d_b) == ("released", 1.0, 1.0)
    planned = plan(model.params, model.config, batch, (iv,), qwen2_5_vl.forward_jit)[0]
    assert TASKS[int(planned.task[0])] == "counting"
    np.testing.assert_array_equal(np.flatnonzero(np.asarray(planned.key[0])), want["key_layers"])
    base = hf_run(hf_model, raw).logits.numpy()
    assert np.abs(want["ref"].logits.numpy() - base).max() > 1e-3
    compare(model, batch, raw, want["ref"], (planned,), range(model.config.text.num_hidden_layers))


def test_released_decode_uses_the_edit_pass_tau(setup):
    hf_model, model, raw, batch = setup
    n = 4
    want = released_oracle(hf_model, raw, new_tokens=n)
    ref_tokens = want["gen"].sequences[:, raw["input_ids"].shape[1] :].numpy()
    ref_logits = torch.stack(want["gen"].logits, 1).numpy()
    ivs = I.build([f"ration:top_k={TOP_K},variant=released"], model.config)
    out = generate(model.params, model.config, batch, max_new_tokens=n, stop_tokens=[], interventions=ivs, output_logits=True)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref_tokens)
    np.testing.assert_allclose(np.asarray(out.logits), ref_logits, atol=1e-4)
    with pytest.raises(ValueError, match="reprefill"):
        generate(model.params, model.config, batch, max_new_tokens=2, stop_tokens=[], interventions=ivs, reprefill=False)


def test_released_differs_from_default_and_validates(setup):
    hf_model, model, raw, batch = setup
    outs = []
    for variant in ("paper", "released"):
        iv = I.build([{"method": "ration", "top_k": TOP_K, "variant": variant}], model.config)[0]
        planned = plan(model.params, model.config, batch, (iv,), qwen2_5_vl.forward_jit)[0]
        outs.append(np.asarray(qwen2_5_vl.forward_jit(model.params, model.config, batch, (planned,), ()).logits))
    assert np.abs(outs[0] - outs[1]).max() > 1e-3
    with pytest.raises(ValueError, match=r"variant='publshed'.*\['paper', 'released'\]"):
        I.build(["ration:variant=publshed"], model.config)


def test_released_config_builds_the_released_variant(setup):
    _, model, _, _ = setup
    iv = I.build([ROOT / "configs" / "methods" / "ration_released.yaml"], model.config)[0]
    assert (iv.variant, iv.d_a, iv.d_b, iv.top_k) == ("released", 1.0, 1.0, 4)
    assert iv.key_layers is None


def test_released_tau_sees_every_query_under_query_chunking(setup):
    """τ is a statistic over all the prompt's queries: query chunks of 7 rows change nothing."""
    import jaxmm.attention as A

    _, model, raw, batch = setup
    assert batch.input_ids.shape[1] > 4 * 7
    iv = I.build([f"ration:top_k={TOP_K},variant=released"], model.config)[0]
    planned = plan(model.params, model.config, batch, (iv,), qwen2_5_vl.forward_jit)[0]
    ref = np.asarray(model.forward(batch=batch, interventions=(planned,)).logits)
    with A.options(query_chunk=7):
        got = np.asarray(model.forward(batch=batch, interventions=(planned,)).logits)
    np.testing.assert_allclose(got, ref, atol=1e-5)
