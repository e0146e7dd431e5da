"""VRGA ``variant="released"`` against a numpy transcription of the authors' code (Ivine11/VRGA
``models/modeling_qwen2_5_vl.py`` phase 1 at prefill, phase 2 in the eager attention of decode steps;
``eval/eval_qwen.py`` for vision_start/vision_end/q_end_pos/grid_w), written from the release, on one
sample with one image (the release's case). Phase 2 runs in transformers' eager attention on the
rows marked as generated, as in tests/test_methods.py."""

import dataclasses
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

import jaxmm
import tiny
from jaxmm import interventions as I
from jaxmm.attention import plan
from jaxmm.models import qwen2_5_vl
from test_methods import compare, hf_run
from test_qwen2_5_vl_parity import make_batch

ROOT = Path(__file__).parents[1]
NQ = 4  # question tokens, right after <|vision_end|>


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("released_vrga")
    hf_model = tiny.save_hf_model("gqa_untied", path, seed=7)
    model = jaxmm.load(path)
    raw = make_batch([["astronaut"]], "left")
    ids = raw["input_ids"][0]
    ve = int(np.flatnonzero(ids == tiny.VISION_END)[0])
    s = len(ids)
    assert s - 1 - ve == 6  # 2 + 4 text tokens after the image (make_batch)
    batch = model.prepare(**raw, question_spans=[[(ve + 1, ve + 1 + NQ)]])
    gen = np.zeros_like(np.asarray(batch.layout.generated_mask))
    gen[:, -2:] = True  # the last two tokens play the generated ones
    batch = dataclasses.replace(batch, layout=dataclasses.replace(batch.layout, generated_mask=gen))
    return hf_model, model, raw, batch


def np_released_focus(att_rows, vision_start, vision_end, grid_w, eps=1e-12):
    """modeling_qwen2_5_vl.py:1595-1763 for one sample: att_rows [L,H,S] (the q_end_pos−1 row over
    the prompt's S keys) -> (absolute focus indices, visual-head flags)."""
    pos, pos_end = vision_start, vision_end
    L, H, _ = att_rows.shape
    ims, efrs, ratios = [], [], []
    for layer in range(L):
        for head in range(H):
            att = att_rows[layer, head].astype(np.float64)
            tot = att.sum()
            att = att / (tot + eps) if tot > 0 else att
            image_att = att[pos:pos_end]
            img_sum = image_att.sum()
            if img_sum > 0:
                p = image_att / (img_sum + eps)
                ent = -(p * np.log(p + eps)).sum()
            else:
                ent = 0.0
            ratio = image_att.mean() / (att.mean() + eps)
            ims.append(image_att)
            efrs.append(ent / (ratio + eps))
            ratios.append(ratio)
    efr, ratio = np.array(efrs), np.array(ratios)
    ok = np.isfinite(efr) & np.isfinite(ratio)
    efr, ratio, ims = efr[ok], ratio[ok], [m for m, o in zip(ims, ok) if o]
    t1, t2 = np.percentile(efr, 5), np.percentile(ratio, 95)
    sel, bg, heads = [], [], np.zeros(len(ims), bool)
    i = 0
    for j, (m, e, r) in enumerate(zip(ims, efr, ratio)):
        i += 1
        if e <= t1 and r >= t2:
            sel.append(m)
            heads[j] = True
        if r < 0.01 and i < 64:
            bg.append(m)
    if not sel:
        for j, (m, r) in enumerate(zip(ims, ratio)):
            if r >= t2:
                sel.append(m)
                heads[j] = True
    need = np.mean(sel, 0)
    if bg:
        b = np.mean(bg, 0)
        need = np.maximum(need / need.sum() - b / b.sum(), 0)
        need = need / need.sum()
    n = pos_end - pos
    t_max = int(n * 0.2)
    grid_h = n // grid_w
    flat = np.arange(grid_h * grid_w).reshape(grid_h, grid_w)
    mask_flat = np.concatenate([flat[:2, :2].flatten(), flat[0, 2:], flat[2:, 0]])[:t_max]
    masked = need.copy()
    masked[mask_flat] = 0
    att_mean = masked.sum() / ((n - mask_flat.size) + eps)
    rho = need / (att_mean + eps)
    rho[mask_flat] = -1e9
    valid = rho[~mask_flat]  # as released: bitwise not of integer indices
    thr = valid.mean() + valid.std(ddof=1) * 0.6
    idx = np.flatnonzero(rho > thr)
    if len(idx) < 10:
        idx = np.argsort(-rho, kind="stable")[:10]
    return np.sort(idx + pos), heads


def np_keep(focus, vision_start, vision_end, k):
    """modeling_qwen2_5_vl.py:935-941 (fa=1, k=2) and :970-982 (fa=2, k=3): absolute key indices."""
    keep = set()
    for t in focus:
        idx = t - vision_start
        if 3 <= idx < vision_end - vision_start:
            keep.update(range(max(0, idx - k), min(vision_end - vision_start, idx + k + 1)))
    return np.array(sorted(keep)) + vision_start


def oracle(hf_model, raw, fa):
    ids = raw["input_ids"][0]
    vs0 = int(np.flatnonzero(ids == tiny.VISION_START)[0])
    ve = int(np.flatnonzero(ids == tiny.VISION_END)[0])
    s = len(ids) - 2  # the prompt (before the "generated" two)
    q_end_pos = ve + NQ  # eval_qwen.py:263-264
    ref0 = hf_run(hf_model, raw)
    rows = np.stack([a.numpy()[0, :, q_end_pos - 1, :s] for a in ref0.attentions])  # [L,H,S]
    grid_w = int(raw["image_grid_thw"][0][2]) // 2
    focus, heads = np_released_focus(rows, vs0, ve, grid_w)
    keep = np_keep(focus, vs0, ve, 2 if fa == 1 else 3)
    n = len(ids)

    def edit(layer, z, a, allowed):
        if a is None:
            return None, None
        a = a.clone()
        for q in (n - 2, n - 1):  # the decode steps (q == 1)
            for h in range(a.shape[1]):
                row = a[0, h, q].double()
                att = row / row.sum()
                image_att = att[vs0:ve]
                ent = -(image_att * (image_att + 1e-12).log()).sum()
                ratio = image_att.mean() / (att[: q + 1].mean())  # the q + 1 keys in the cache
                gate = bool(ratio > 0.6 and ratio > 0.2 * ent)
                v = row.clone()
                if fa == 1 and gate:
                    v[keep] *= 1.5
                if fa == 2:
                    m = torch.zeros(ve - vs0, dtype=torch.float64)
                    if gate:
                        m[keep - vs0] = 1.0
                    v[vs0:ve] *= m
                v = v / v.sum()
                v = v / (v.sum() + 1e-8)
                a[0, h, q] = v.float()
        return None, a

    return dict(focus=focus, heads=heads, keep=keep, ref0=ref0, ref=hf_run(hf_model, raw, edit))


@pytest.mark.parametrize("fa", [1, 2])
def test_released_plan_and_decode_edit_match_the_release(setup, fa):
    hf_model, model, raw, batch = setup
    want = oracle(hf_model, raw, fa)
    iv = I.build([f"vrga:variant=released,fa={fa}"], model.config)[0]
    planned = plan(model.params, model.config, batch, (iv,), qwen2_5_vl.forward_jit)[0]
    np.testing.assert_array_equal(np.flatnonzero(np.asarray(planned.focus[0])), want["focus"])
    np.testing.assert_array_equal(np.asarray(planned.visual_heads[0]), want["heads"])
    np.testing.assert_array_equal(np.flatnonzero(np.asarray(planned.boost[0])), want["keep"])
    assert np.abs(want["ref"].logits.numpy() - want["ref0"].logits.numpy()).max() > 1e-4
    compare(model, batch, raw, want["ref"], (planned,), range(model.config.text.num_hidden_layers))


def test_released_differs_from_default(setup):
    _, model, _, batch = setup
    got = {}
    for variant in ("paper", "released"):
        iv = I.build([{"method": "vrga", "variant": variant}], model.config)[0]
        planned = plan(model.params, model.config, batch, (iv,), qwen2_5_vl.forward_jit)[0]
        logits = np.asarray(qwen2_5_vl.forward_jit(model.params, model.config, batch, (planned,), ()).logits)
        got[variant] = (np.asarray(planned.focus[0]), logits)
    assert (got["paper"][0] != got["released"][0]).any()
    assert np.abs(got["paper"][1][0, -2:] - got["released"][1][0, -2:]).max() > 1e-4
    with pytest.raises(ValueError, match=r"variant='relased'.*\['paper', 'released'\]"):
        I.build(["vrga:variant=relased"], model.config)


def test_released_config_builds_the_released_variant(setup):
    _, model, _, _ = setup
    iv = I.build([ROOT / "configs" / "methods" / "vrga_released.yaml"], model.config)[0]
    assert (iv.variant, iv.factor, iv.fa, iv.border_frac, iv.min_focus, iv.background_heads) == ("released", 1.5, 1, 0.2, 10, 64)
    assert (iv.head_mask, iv.head_mask_topk, iv.head_mask_after) == (None, 5, 5)


@pytest.mark.parametrize("mask_type", ["R_high_HR_low", "R_low_to_high", "random_choose"])
def test_released_head_masking_ablation_reselects_heads_each_step(setup, mask_type):
    """modeling_qwen2_5_vl.py:1022-1040 with compute_R_H_ratio_three (topk 2 of the tiny model's 4
    heads) and mask_visual_tokens_in_heads, in layers > 0 (the release: > 5), on the decode rows."""
    hf_model, model, raw, batch = setup
    ids = raw["input_ids"][0]
    vs0 = int(np.flatnonzero(ids == tiny.VISION_START)[0])
    ve = int(np.flatnonzero(ids == tiny.VISION_END)[0])
    n, topk, eps = len(ids), 2, 1e-12
    chosen = []

    def edit(layer, z, a, allowed):
        if a is None or layer <= 0:
            return None, None
        a = a.clone()
        for q in (n - 2, n - 1):
            m = a[:, :, q, : q + 1].double().mean(0).numpy()  # [H, keys in the cache]
            r = np.array([m[h, vs0:ve].mean() / (m[h].mean() + eps) for h in range(m.shape[0])])
            p = m[:, vs0:ve] / (m[:, vs0:ve].sum(-1, keepdims=True) + eps)
            hr = -(p * np.log(p + eps)).sum(-1) / (r + eps)
            if mask_type == "R_high_HR_low":
                cand = np.flatnonzero(r > np.median(r))
                heads = cand[np.argsort(hr[cand])[:topk]] if len(cand) >= topk else cand
            elif mask_type == "random_choose":  # the release: np.random.choice; jaxmm: keyed by (seed, layer, q)
                key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(7), layer), q)
                heads = np.asarray(jax.random.permutation(key, m.shape[0]))[:topk]
            else:
                heads = np.argsort(r)[:topk]
            chosen.append((layer, q, tuple(sorted(heads))))
            v = a[0, :, q].double()
            for h in heads:
                v[h, vs0:ve] = 0.0
            v = v / (v.sum(-1, keepdim=True) + 1e-12)
            v = v / v.sum(-1, keepdim=True)
            v = v / (v.sum(-1, keepdim=True) + 1e-8)
            a[0, :, q] = v.float()
        return None, a

    ref = hf_run(hf_model, raw, edit)
    assert len({c[2] for c in chosen}) > 1  # the selection changes across steps/layers
    iv = I.build(
        [
            {
                "method": "vrga",
                "variant": "released",
                "head_mask": mask_type,
                "head_mask_topk": topk,
                "head_mask_after": 0,
                "head_mask_seed": 7,
            }
        ],
        model.config,
    )[0]
    assert iv.prefill_probes() == ()
    compare(model, batch, raw, ref, (iv,), range(model.config.text.num_hidden_layers))
    with pytest.raises(ValueError, match="head_mask"):
        I.build([{"method": "vrga", "head_mask": mask_type}], model.config)
