"""One invariance test over everything on the seam.

For every intervention and every probe jaxmm ships (from ``jaxmm.attention.REGISTRY``, so a new
one must be added to the examples below or the coverage test fails), how attention is computed
must not change a value: query chunking (``query_chunk=7`` against one chunk), the plain path
(``jax.nn.dot_product_attention`` itself against the head-major matmuls) and the explicit path
(a probe on every layer) leave logits, probe values and generated tokens unchanged (fp32, 1e-6),
in a forward and inside ``generate``, on prompts several chunks long. A forward on the same rows
padded on the right instead of the left gives the same logits at every real token.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmm
import jaxmm.attention as A
import tiny
from jaxmm import interventions as I
from jaxmm import probes as P
from jaxmm.generate import generate
from jaxmm.interventions import rave
from jaxmm.interventions.ration import PreRopeVisualEntropy
from jaxmm.interventions.var import SinkTokens
from jaxmm.interventions.vrga import QuestionRow
from jaxmm.objectives.avar import FirstKeysMass
from test_qwen2_5_vl_parity import make_batch

CHUNK = 7
# fp32: 1e-6 of the tensor's scale (1 + max |value|). XLA's CPU matmuls of other shapes (a chunk of
# 7 query rows against all 64, a 128-key cache against 64 keys) round the last bits differently:
# measured ≤ 3.2e-6 on logits whose largest entry is ~4. The bugs this test guards against move
# logits by 1e-3 and more.
TOL = 1e-6
# A probe value that is a ratio of two attention sums (VAS, EFR, RegionRatio: up to ~1e3 on the tiny
# model) carries the relative rounding of both sums into each element: measured ≤ 1.4e-6 relative.
PROBE_RTOL = 1e-5


def close(got, ref, msg, rtol=0.0):
    scale = np.nanmax(np.abs(ref), initial=0.0)  # NaN where a ratio is 0/0 (must match)
    np.testing.assert_allclose(got, ref, atol=TOL * (1.0 + scale), rtol=rtol, err_msg=msg)


SINK = dict(dims=(0, 1), tau=1.5)  # sink dimensions that fire on the tiny model's hidden states


def _rave(cfg):
    r = rave.init(cfg, seed=3)
    return dataclasses.replace(r, gamma=jnp.full(r.gamma.shape, 0.8, jnp.float32))


INTERVENTIONS = {
    "PAI": lambda cfg: I.pai(cfg.text.num_hidden_layers, alpha=0.5, start=1),
    "AVAR": lambda cfg: I.AVAR(alpha_img=0.5, alpha_sys=0.2),
    "RATION": lambda cfg: I.build(["ration:top_k=2"], cfg)[0],
    "VRGA": lambda cfg: I.build(["vrga:min_focus=3"], cfg)[0],
    "VAR": lambda cfg: I.build([{"method": "var", "dims": list(SINK["dims"]), "tau": SINK["tau"], "start": 0}], cfg)[0],
    "RAVE": _rave,
    "KeyLogitShift": lambda cfg: I.KeyLogitShift(delta=0.7),
    "KeyWeightScale": lambda cfg: I.KeyWeightScale(scale=jnp.array([2.0, 0.5]), keys="question"),
    "KeyBias": lambda cfg: I.KeyBias(delta=jnp.array([-0.5, 0.9])),
    "HeadMask": lambda cfg: I.HeadMask(
        mask=jnp.asarray(np.arange(cfg.text.num_hidden_layers * cfg.text.num_attention_heads) % 3 == 0, jnp.float32),
        num_heads=cfg.text.num_attention_heads,
        layers=(1,),
    ),
}

PROBE_LAYERS = (0, 2)  # layer 1 stays on the plain path unless an intervention edits it
PROBES = {
    "VisualMass": lambda: P.VisualMass(layers=PROBE_LAYERS),
    "KeyMass": lambda: P.KeyMass(keys="question", layers=PROBE_LAYERS),
    "VisualEntropy": lambda: P.VisualEntropy(layers=PROBE_LAYERS, normalize=True),
    "VAS": lambda: P.VAS(eps=1e-6, layers=PROBE_LAYERS),
    "FocusRatio": lambda: P.FocusRatio(layers=PROBE_LAYERS),
    "EFR": lambda: P.EFR(layers=PROBE_LAYERS),
    "RegionRatio": lambda: P.RegionRatio(eps=1e-12, layers=PROBE_LAYERS),
    "AttentionRows": lambda: P.AttentionRows(positions=(-1, 5, 20), layers=PROBE_LAYERS),
    "AttentionWeights": lambda: P.AttentionWeights(layers=(2,)),
    "ResidualUpdate": lambda: P.ResidualUpdate(),
    "PreRopeVisualEntropy": lambda: PreRopeVisualEntropy(name="pre_rope_entropy", layers=PROBE_LAYERS),
    "QuestionRow": lambda: QuestionRow(name="question_row", layers=PROBE_LAYERS),
    "SinkTokens": lambda: SinkTokens(name="sinks", layers=PROBE_LAYERS, **SINK),
    "FirstKeysMass": lambda: FirstKeysMass(n=3, layers=PROBE_LAYERS),
}


def test_examples_cover_every_shipped_intervention_and_probe():
    shipped = lambda kind: {n for n, c in A.REGISTRY[kind].items() if c.__module__.startswith("jaxmm.")}
    assert shipped("interventions") == set(INTERVENTIONS), "add the new intervention to INTERVENTIONS"
    assert shipped("probes") == set(PROBES), "add the new probe to PROBES"


def _with_spans(model, raw):
    ids, am = raw["input_ids"], raw["attention_mask"]
    rows = []
    for r in range(ids.shape[0]):
        real = np.flatnonzero(am[r])
        rows.append((int(real[0]), int(real[-1]) + 1))
    system = [[(a, a + 2)] for a, _ in rows]
    question = [[(b - 5, b - 2)] for _, b in rows]
    batch = model.prepare(**raw, system_spans=system, question_spans=question)
    lay = batch.layout
    region = np.asarray(lay.image_mask) & (np.asarray(lay.grid_pos)[..., 1] < 2)
    return dataclasses.replace(batch, layout=dataclasses.replace(lay, region_weight=region.astype(np.float32)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("invariance")
    tiny.save_hf_model("gqa_untied", path, seed=5)
    model = jaxmm.load(path)
    rows = [["astronaut", "chelsea"], ["coffee"]]
    left = _with_spans(model, make_batch(rows, "left"))
    right = _with_spans(model, make_batch(rows, "right"))
    assert left.input_ids.shape[1] > 4 * CHUNK
    return model, left, right


def _flat(tree):
    return {jax.tree_util.keystr(k): np.asarray(v, np.float64) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def _run(model, batch, ivs, probes, mode):
    """Forward and generate under one way of computing attention: ``ref`` (defaults: one query
    chunk, plain layers on the head-major matmul path on CPU, explicit where a probe or stage
    asks) or ``other`` (query chunk 7, a probe on every text layer puts it on the explicit path,
    the vision tower's plain layers through ``jax.nn.dot_product_attention`` itself). The plain
    text path, fused against matmul, is compared in ``test_attention_seam``."""
    extra = (P.VisualMass(name="force_explicit"),) if mode == "other" else ()
    opts = dict(query_chunk=CHUNK, plain="fused") if mode == "other" else {}
    with A.options(**opts):
        fwd = model.forward(batch=batch, interventions=ivs, probes=tuple(probes) + extra)
        gen = generate(
            model.params,
            model.config,
            batch,
            max_new_tokens=4,
            stop_tokens=[],
            interventions=ivs,
            probes=tuple(probes) + extra,
            output_logits=True,
        )
    drop = lambda tree: {k: v for k, v in tree.items() if k != "force_explicit"}
    return dict(
        logits=np.asarray(fwd.logits, np.float64),
        probes=_flat(drop(fwd.probes)),
        tokens=np.asarray(gen.tokens),
        gen_logits=np.asarray(gen.logits, np.float64),
        gen_probes=_flat(drop(gen.probes)),
        prefill_probes=_flat(drop(gen.prefill_probes)),
    )


def _compare(got, ref, valid, what):
    np.testing.assert_array_equal(got["tokens"], ref["tokens"], err_msg=f"{what}: generated tokens")
    close(got["logits"][valid], ref["logits"][valid], f"{what}: logits")
    close(got["gen_logits"], ref["gen_logits"], f"{what}: generate logits")
    for part in ("probes", "gen_probes", "prefill_probes"):
        assert got[part].keys() == ref[part].keys(), f"{what}: {part} names"
        for k in ref[part]:
            a, b = got[part][k], ref[part][k]
            assert a.shape == b.shape, f"{what}: {part} {k} shape {a.shape} != {b.shape}"
            close(a, b, f"{what}: {part} {k}", rtol=PROBE_RTOL)


CASES = ["every probe"] + sorted(INTERVENTIONS)
DECODE_ONLY = {"VRGA"}  # plans at prefill and edits only generated queries: the forward is unchanged


@pytest.mark.parametrize("case", CASES)
def test_chunking_and_paths_change_nothing(setup, case):
    """Every probe at once without an intervention; each intervention with one probe reading the
    weights it edits (a probe per case would compile every probe eleven times over)."""
    model, batch, _ = setup
    ivs = () if case == "every probe" else (INTERVENTIONS[case](model.config),)
    probes = tuple(make() for make in PROBES.values()) if not ivs else (PROBES["RegionRatio"](),)
    valid = np.asarray(batch.attention_mask, bool)
    ref = _run(model, batch, ivs, probes, "ref")
    if ivs:  # the intervention does something (else the comparison proves nothing about it)
        if case in DECODE_ONLY:
            plain = generate(
                model.params, model.config, batch, max_new_tokens=4, stop_tokens=[], probes=probes, output_logits=True
            )
            moved = np.abs(ref["gen_logits"] - np.asarray(plain.logits)).max()
        else:
            plain = model.forward(batch=batch, probes=probes)
            moved = np.abs(ref["logits"] - np.asarray(plain.logits))[valid].max()
        assert moved > 1e-4, f"{case} changed nothing"
    # generate's prefill is the forward: its first next-token logits are the forward's last ones
    # (RATION's τ governs the prompt in both; VAR's prefill sinks are the forward's)
    close(ref["gen_logits"][:, 0], ref["logits"][:, -1], f"{case}: generate's first step vs the forward")
    _compare(_run(model, batch, ivs, probes, "other"), ref, valid, case)


@pytest.mark.parametrize("case", sorted(INTERVENTIONS))
def test_right_padding_equals_left_padding(setup, case):
    """The same rows padded on the other side: every real token's logits are unchanged."""
    model, left, right = setup
    ivs = (INTERVENTIONS[case](model.config),)
    out = {}
    for side, batch in (("left", left), ("right", right)):
        with A.options(query_chunk=CHUNK):
            out[side] = np.asarray(model.forward(batch=batch, interventions=ivs).logits, np.float64)
    lam, ram = np.asarray(left.attention_mask, bool), np.asarray(right.attention_mask, bool)
    for r in range(lam.shape[0]):
        np.testing.assert_allclose(out["right"][r][ram[r]], out["left"][r][lam[r]], atol=1e-5, rtol=0, err_msg=f"{case}: row {r}")
