"""LLaVA-NeXT against transformers' LlavaNextForConditionalGeneration (CLIP tower over any-resolution
tiles, image_newline packing, Llama decoder; float32): logits, hidden states and attention weights on
batches with left or right padding and images of different aspect ratios (different tile grids and
unpadding), every key layout, greedy generation, PAI and VAR against transformers' eager attention
edited by methods.md's formulas; the any-res image processor bit-identical to
LlavaNextImageProcessorPil, and prepare_chat equal to LlavaNextProcessor."""

import dataclasses

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import jaxmm
import jaxmm.processing.regions
import tiny
from jaxmm import interventions as I
from jaxmm.attention import AttentionWeights
from test_llava_parity import compare_edited, edited_forward, hf_forward, var_reference

S = tiny.LLAVA_IMAGE_SIZE
G = S // tiny.LLAVA_PATCH


def photos():
    """The test photos and two portrait ones (landscape, square and portrait images get different tile
    grids and are unpadded along different axes)."""
    p = tiny.photos()
    p["tall"] = p["astronaut"].crop((0, 0, 200, 512))  # 200 x 512: 3x1 tiles
    p["portrait"] = p["chelsea"].transpose(2)  # ROTATE_90: 300 x 451, 2x1 tiles
    return p


def hf_processor():
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    return LlavaNextImageProcessorPil(
        image_grid_pinpoints=tiny.LLAVA_NEXT_PINPOINTS, size={"shortest_edge": S}, crop_size={"height": S, "width": S}
    )


def hf_token_counts(hf_model, pv, sizes):
    """Image tokens per image as transformers packs them (the lengths of get_image_features' output)."""
    with torch.no_grad():
        feats = hf_model.model.get_image_features(torch.from_numpy(pv), torch.from_numpy(sizes)).pooler_output
    return [int(f.shape[0]) for f in feats]


def make_batch(hf_model, images_per_row, side, seed=0):
    """Rows of text with one run of image tokens per image (as many as transformers packs);
    pixel_values [n, max_tiles, 3, S, S] and image_sizes from transformers' processor."""
    ph = photos()
    imgs = [ph[n] for names in images_per_row for n in names]
    ref = hf_processor()(imgs, return_tensors="np")
    pv, sizes = ref["pixel_values"].astype(np.float32), ref["image_sizes"]
    counts = iter(hf_token_counts(hf_model, pv, sizes))
    rng = np.random.default_rng(seed)
    rows = []
    for names in images_per_row:
        toks = [1] + [int(t) for t in rng.integers(3, 280, 3)]
        for _ in names:
            toks += [tiny.IMAGE_TOKEN] * next(counts) + [int(t) for t in rng.integers(3, 280, 2)]
        rows.append(toks + [int(t) for t in rng.integers(3, 280, 3)])
    ids, am = tiny.make_rows(rows, side)
    return {"input_ids": ids, "attention_mask": am, "pixel_values": pv, "image_sizes": sizes}


@pytest.fixture(scope="module", params=[(False, -2), (True, [-3, -1])], ids=["untied", "tied_two_feature_layers"])
def ckpt(request, tmp_path_factory):
    tie, layer = request.param
    path = tmp_path_factory.mktemp("llava_next")
    model = tiny.build_hf_llava_next(seed=3, tie=tie, feature_layer=layer)
    model.save_pretrained(path)
    return path, model


@pytest.mark.parametrize("images,side", [([["chelsea", "tall"], []], "left"), ([["astronaut"], ["portrait", "coffee"]], "right")])
def test_logits_hidden_states_and_attention(ckpt, images, side):
    path, hf_model = ckpt
    batch = make_batch(hf_model, images, side)
    ref = hf_forward(hf_model, batch)
    model = jaxmm.load(path)
    assert model.config.model_type == "llava_next"
    assert model.config.vision.image_grid_pinpoints == tuple(map(tuple, tiny.LLAVA_NEXT_PINPOINTS))
    out = model.forward(**batch, probes=[AttentionWeights()], output_hidden_states=True)
    valid = batch["attention_mask"].astype(bool)
    assert np.abs(ref.logits.numpy()).max() > 1.0
    assert np.abs(np.asarray(out.logits) - ref.logits.numpy())[valid].max() < 1e-4
    assert len(out.hidden_states) == len(ref.hidden_states)
    for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        assert np.abs(np.asarray(a) - b.numpy())[valid].max() < 1e-4, f"hidden state {i}"
    w = np.asarray(out.probes["attentions"]["text"].values)
    for i, r in enumerate(ref.attentions):
        assert np.abs(w[i] - r.numpy()).transpose(0, 2, 1, 3)[valid].max() < 1e-5, f"attention of layer {i}"


def test_packed_image_features_equal_transformers(ckpt):
    """The tower's output (per image: the base tile's features, then the unpadded grid rows, each
    ending in image_newline) is transformers' pooler_output, concatenated, for four images with
    different tile grids in one batch."""
    import flax.nnx as nnx
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    from jaxmm.models.core.model import graphdef

    path, hf_model = ckpt
    batch = make_batch(hf_model, [["chelsea", "tall", "astronaut", "portrait"]], "left")
    tiles = [image_size_to_num_patches(sz.tolist(), tiny.LLAVA_NEXT_PINPOINTS, S) for sz in batch["image_sizes"]]
    assert len(set(tiles)) > 1
    with torch.no_grad():
        ref = hf_model.model.get_image_features(
            torch.from_numpy(batch["pixel_values"]), torch.from_numpy(batch["image_sizes"])
        ).pooler_output
    model = jaxmm.load(path)
    prepared = model.prepare(**batch)
    assert np.asarray(prepared.pixel_values).shape[0] == sum(tiles)
    feats, _, _ = nnx.merge(graphdef(model.config), model.params).visual(prepared.pixel_values, prepared.vision)
    want = torch.cat(ref).numpy()
    assert feats.shape == want.shape
    err = np.abs(np.asarray(feats) - want).max()
    assert err < 1e-5, err
    newline = hf_model.model.image_newline.detach().numpy()
    n_rows = sum(int(((r.numpy() == newline).all(-1)).sum()) for r in ref)
    assert n_rows > 4 and int((np.asarray(feats) == newline).all(-1).sum()) == n_rows


def test_layout_marks_every_image_token_with_its_grid(ckpt):
    """Image tokens, newlines included, are image tokens; the base image is a GxG grid (t=0), the
    tiles' unpadded grid rows x (cols + 1) (t=1, the newline in the last column)."""
    path, hf_model = ckpt
    batch = make_batch(hf_model, [["chelsea"], ["tall"]], "left")
    counts = hf_token_counts(hf_model, batch["pixel_values"], batch["image_sizes"])
    lay = jaxmm.load(path).prepare(**batch).layout
    mask, index = np.asarray(lay.image_mask), np.asarray(lay.image_index)
    pos, hw = np.asarray(lay.grid_pos), np.asarray(lay.grid_hw)
    np.testing.assert_array_equal(mask, batch["input_ids"] == tiny.IMAGE_TOKEN)
    assert [int((index == k).sum()) for k in range(2)] == counts
    for k in range(2):
        p, h = pos[index == k], hw[index == k]
        assert (p[: G * G, 0] == 0).all() and (h[: G * G] == G).all()
        assert (p[G * G :, 0] == 1).all()
        rows, cols1 = h[G * G]
        assert rows * cols1 == counts[k] - G * G
        np.testing.assert_array_equal(p[G * G :, 1] * cols1 + p[G * G :, 2], np.arange(rows * cols1))
    # chelsea, 451x300: 1x2 tiles, a 4x8 grid unpadded to 4x6 (+ newline); tall, 200x512: 3x1 tiles,
    # a 12x4 grid unpadded to 10x4 (unpad_image's two branches)
    assert tuple(hw[index == 0][-1]) == (4, 7) and tuple(hw[index == 1][-1]) == (10, 5)


def test_region_weights_cover_the_box_in_both_grids(ckpt):
    """A box over the left half of an image covers the left half of the base grid and of the tiles'
    unpadded grid, never a newline; the family's region_weights is the one the eval harness calls."""
    path, hf_model = ckpt
    batch = make_batch(hf_model, [["chelsea"], ["tall"]], "left")
    model = jaxmm.load(path)
    assert model.family.region_weights is not jaxmm.processing.regions.region_weights
    lay = model.prepare(**batch).layout
    index, pos, hw = (np.asarray(x) for x in (lay.image_index, lay.grid_pos, lay.grid_hw))
    sizes = {k: tuple(int(v) for v in batch["image_sizes"][k]) for k in range(2)}
    boxes = {k: [(0, 0, sizes[k][1] / 2 - 1, sizes[k][0] - 1)] for k in range(2)}
    w = model.family.region_weights(index, pos, hw, boxes, sizes)
    for k in range(2):
        sel = index == k
        t, c, cols = pos[sel][:, 0], pos[sel][:, 2], hw[sel][:, 1] - (pos[sel][:, 0] == 1)
        np.testing.assert_array_equal(w[sel] > 0, c < cols / 2)
        assert not (w[sel] > 0)[(t == 1) & (c == cols)].any()
    with pytest.raises(ValueError, match="outside"):
        model.family.region_weights(index, pos, hw, {0: [(1000, 1000, 1200, 1200)]}, sizes)


def test_bad_inputs_name_the_problem(ckpt):
    path, hf_model = ckpt
    model = jaxmm.load(path)
    batch = make_batch(hf_model, [["chelsea"]], "left")
    with pytest.raises(ValueError, match="image_sizes"):
        model.prepare(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    ids = batch["input_ids"][0]
    short = np.delete(ids, np.flatnonzero(ids == tiny.IMAGE_TOKEN)[:5])[None]  # 5 image tokens too few
    with pytest.raises(ValueError, match="image tokens"):
        model.prepare(short, None, batch["pixel_values"], image_sizes=batch["image_sizes"])
    split = np.concatenate([[tiny.IMAGE_TOKEN] * 5, [7], short[0]])[None]  # the right count, in two runs
    with pytest.raises(ValueError, match="do not match the images"):
        model.prepare(split, None, batch["pixel_values"], image_sizes=batch["image_sizes"])
    with pytest.raises(ValueError, match="tiles"):
        model.prepare(batch["input_ids"], batch["attention_mask"], batch["pixel_values"][0, :2], image_sizes=batch["image_sizes"])
    from jaxmm.config import ConfigError

    cfg = {"model_type": "llava_next", "vision_feature_select_strategy": "full"}
    with pytest.raises(ConfigError, match="vision_feature_select_strategy"):
        model.family.Config.from_dict(cfg)
    with pytest.raises(ConfigError, match="image_grid_pinpoints"):
        model.family.Config.from_dict({"model_type": "llava_next", "image_grid_pinpoints": [[336, 500]]})


def test_every_key_layout_loads_the_same_weights(ckpt, tmp_path):
    """What save_pretrained writes (the legacy layout: ``image_newline``, ``language_model.model.*``),
    transformers 5's in-memory names (``model.image_newline``, ``model.language_model.*``) and the
    published llava-hf names (``vision_tower.vision_model.*``)."""
    path, hf_model = ckpt
    saved = load_file(str(path / "model.safetensors"))
    assert "image_newline" in saved and any(k.startswith("language_model.model.") for k in saved)
    layouts = {
        "memory": {k: v.numpy() for k, v in hf_model.state_dict().items()},
        "published": {k.replace("vision_tower.", "vision_tower.vision_model."): v for k, v in saved.items()},
    }
    assert "model.image_newline" in layouts["memory"]
    assert any(k.startswith("model.language_model.") for k in layouts["memory"])
    batch = make_batch(hf_model, [["chelsea"]], "left")
    want = np.asarray(jaxmm.load(path).forward(**batch).logits)
    for name, tensors in layouts.items():
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text((path / "config.json").read_text())
        save_file(tensors, str(d / "model.safetensors"))
        np.testing.assert_array_equal(np.asarray(jaxmm.load(d).forward(**batch).logits), want, err_msg=name)
    d = tmp_path / "no_newline"
    d.mkdir()
    (d / "config.json").write_text((path / "config.json").read_text())
    save_file({k: v for k, v in saved.items() if k != "image_newline"}, str(d / "model.safetensors"))
    with pytest.raises(Exception, match="image_newline"):
        jaxmm.load(d)


def test_greedy_generation_matches_transformers(ckpt):
    from jaxmm.generate import generate

    path, hf_model = ckpt
    batch = make_batch(hf_model, [["tall"], ["coffee", "chelsea"]], "left", seed=4)
    model = jaxmm.load(path)
    with torch.no_grad():
        ref = hf_model.generate(
            input_ids=torch.from_numpy(batch["input_ids"]),
            attention_mask=torch.from_numpy(batch["attention_mask"]),
            pixel_values=torch.from_numpy(batch["pixel_values"]),
            image_sizes=torch.from_numpy(batch["image_sizes"]),
            max_new_tokens=8,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    got = generate(model.params, model.config, model.prepare(**batch), max_new_tokens=8, stop_tokens=[])
    s = batch["input_ids"].shape[1]
    np.testing.assert_array_equal(np.asarray(got.tokens), ref[:, s:].numpy())


def test_pai_on_llava_next(ckpt):
    """PAI (methods.md): at the last query row of layers >= start, z + α·|z| on image keys (every
    image position, newlines included, as PAI's code treats all image positions)."""
    path, hf_model = ckpt
    model = jaxmm.load(path)
    batch = make_batch(hf_model, [["chelsea", "tall"], ["coffee"]], "left")
    img = torch.from_numpy(batch["input_ids"] == tiny.IMAGE_TOKEN).float()[:, None, None, :]
    s = batch["input_ids"].shape[1]

    def edit(layer, z, a, allowed):
        if a is not None or layer < 1:
            return None, None
        last = torch.zeros(s, dtype=torch.bool)
        last[-1] = True
        return torch.where(allowed & last[None, None, :, None], z + 0.5 * img * z.abs(), z), None

    ref = edited_forward(hf_model, batch, edit)
    assert np.abs(ref.logits.numpy()[:, -1] - hf_forward(hf_model, batch).logits.numpy()[:, -1]).max() > 1e-4
    compare_edited(model, batch, ref, I.build(["pai:alpha=0.5,start=1"], model.config))


def test_var_on_llava_next(ckpt):
    """VAR (methods.md): sink image keys (|h| over the sink dims > τ after input_layernorm) give a
    share p of their mass to the other image keys, in rows whose image mass and sink share allow it."""
    path, hf_model = ckpt
    model = jaxmm.load(path)
    batch = make_batch(hf_model, [["chelsea", "tall"], ["coffee"]], "left")
    dims, tau, min_mass = (0, 1, 2, 3), 2.0, 0.05
    ref, base = var_reference(hf_model, batch, dims, tau, min_mass)
    assert np.abs(ref.logits.numpy() - base.logits.numpy()).max() > 1e-4
    compare_edited(
        model, batch, ref, I.build([{"method": "var", "dims": list(dims), "tau": tau, "min_mass": min_mass}], model.config)
    )


# ----------------------------------------------------------------------------- the processor
@pytest.mark.parametrize(
    "pinpoints,side",
    [
        (None, 336),
        (tiny.LLAVA_NEXT_PINPOINTS, S),
        ([[336, 336], [336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]], 336),
    ],
    ids=["v1.6_default", "tiny", "with_square"],
)
def test_anyres_processor_is_bit_identical(pinpoints, side, tmp_path):
    """jaxmm's processor, read from the saved config, against LlavaNextImageProcessorPil on real photos
    of several sizes and aspect ratios (square, landscape, portrait, greyscale, RGBA)."""
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    from jaxmm.processing.anyres_image import AnyResImageProcessor

    kw = {} if pinpoints is None else {"image_grid_pinpoints": pinpoints}
    hf = LlavaNextImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side}, **kw)
    hf.save_pretrained(tmp_path)
    mine = AnyResImageProcessor.from_pretrained(tmp_path, patch_size=14)
    assert mine.image_grid_pinpoints == tuple(map(tuple, hf.image_grid_pinpoints))
    grids = set()
    ph = photos()
    ph["wide"] = ph["rocket"].crop((0, 0, 640, 150))
    for name, im in ph.items():
        ref = hf(im, return_tensors="np")
        x, grid = mine.preprocess_one(im)
        assert grid == (len(x), *ref["image_sizes"][0].tolist()), name
        np.testing.assert_array_equal(x, ref["pixel_values"][0][: len(x)], err_msg=name)
        assert not ref["pixel_values"][0][len(x) :].any(), name  # HF's padding tiles only
        grids.add(len(x))
    assert len(grids) > 1 or pinpoints is None


@pytest.fixture(scope="module")
def chat_ckpt(tmp_path_factory):
    """A tiny LLaVA-NeXT checkpoint with its tokenizer, chat template and any-res processor config."""
    from chat_fixtures import build_llava_tokenizer

    path = tmp_path_factory.mktemp("llava_next_chat")
    tiny.build_hf_llava_next(seed=6).save_pretrained(path)
    build_llava_tokenizer(path)
    hf_processor().save_pretrained(path)
    return path


def test_prepare_chat_equals_the_llava_next_processor(chat_ckpt):
    """Model.prepare_chat's ids (image-token counts) and pixel_values are transformers' LlavaNextProcessor's."""
    from transformers import AutoTokenizer, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    model = jaxmm.load(chat_ckpt)
    ph = photos()
    convs = [
        [
            {"role": "system", "content": "you are a helpful assistant ."},
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": ph["coffee"]},
                    {"type": "text", "text": "is the coffee cup full or empty ?"},
                ],
            },
        ],
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": ph["tall"]},
                    {"type": "image", "image": ph["camera"]},
                    {"type": "text", "text": "describe the image in one sentence ."},
                ],
            }
        ],
    ]
    batch, info = model.prepare_chat(convs)
    proc = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil.from_pretrained(chat_ckpt),
        tokenizer=AutoTokenizer.from_pretrained(chat_ckpt),
        patch_size=tiny.LLAVA_PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=model.tokenizer.chat_template,
    )
    ids, am = np.asarray(batch.input_ids), np.asarray(batch.attention_mask)
    pix = []
    for row, conv in enumerate(convs):
        text = proc.apply_chat_template(conv, add_generation_prompt=True)
        images = [p["image"] for m in conv if not isinstance(m["content"], str) for p in m["content"] if p["type"] == "image"]
        ref = proc(text=text, images=images, return_tensors="np")
        np.testing.assert_array_equal(ids[row][am[row] > 0], ref["input_ids"][0])
        pix += [p[:t] for p, t in zip(ref["pixel_values"], info["image_grid_thw"][len(pix) :, 0])]
    np.testing.assert_array_equal(np.asarray(batch.pixel_values), np.concatenate(pix))
    assert len(set(info["image_grid_thw"][:, 0].tolist())) > 1


def test_jaxmm_eval_runs_baseline_pai_and_var_on_llava_next(chat_ckpt, tmp_path):
    from jaxmm.eval.harness import EvalConfig, run
    from jaxmm.eval.report import load_rows

    cfg = EvalConfig(
        model=str(chat_ckpt),
        out=str(tmp_path / "run"),
        benchmarks=[{"name": "grounded", "limit": 4}],
        methods=["baseline", "pai", {"method": "var", "dims": [0, 1, 2, 3], "tau": 2.0}],
        batch_size=2,
        max_new_tokens=4,
    )
    rows = load_rows(run(cfg, progress=False))
    assert len(rows) == 12 and all("error" not in r for r in rows), [r.get("error") for r in rows]
    by = {(r["id"], r["method"]): r for r in rows}
    assert any(
        by[(i, "pai")]["prediction"] != by[(i, "baseline")]["prediction"] or by[(i, "pai")]["vas"] != by[(i, "baseline")]["vas"]
        for i, _ in by
    )
    assert all(r["vas"] is not None and len(r["visual_entropy_per_layer"]) == 3 for r in rows)
    assert any("heatmap" in r for r in rows)  # drawn over the base image's grid
    assert all(r["region_ratio"] is not None and np.isfinite(r["region_ratio"]) for r in rows)


def test_every_shipped_intervention_and_probe_runs_on_llava_next(tmp_path):
    """Every intervention and probe of the seam test (``test_seam_invariance``, which lists all that
    jaxmm ships) runs through the same seam on LLaVA-NeXT: every probe gives finite text-tower values
    and every intervention changes the logits (two-phase ones planned from their first pass)."""
    import jax

    from jaxmm.generate import generate
    from test_seam_invariance import INTERVENTIONS, PROBES

    hf_model = tiny.build_hf_llava_next(seed=3)
    hf_model.save_pretrained(tmp_path)
    model = jaxmm.load(tmp_path)
    raw = make_batch(hf_model, [["chelsea", "tall"], ["coffee"]], "left")
    am = raw["attention_mask"]
    spans = [(int(np.flatnonzero(r)[0]), int(np.flatnonzero(r)[-1]) + 1) for r in am]
    batch = model.prepare(
        **raw, system_spans=[[(a, a + 2)] for a, _ in spans], question_spans=[[(b - 5, b - 2)] for _, b in spans]
    )
    lay = batch.layout
    region = np.asarray(lay.image_mask) & (np.asarray(lay.grid_pos)[..., 1] < 2)
    batch = dataclasses.replace(batch, layout=dataclasses.replace(lay, region_weight=region.astype(np.float32)))
    base = model.forward(batch=batch, probes=[make() for make in PROBES.values()])
    for name in PROBES:
        got = base.probes.get(PROBES[name]().name, {}).get("text")
        assert got is not None, name
        leaves = [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(got)]
        assert leaves and all(np.isfinite(x[~np.isnan(x)]).all() for x in leaves), name
    valid = am.astype(bool)
    for name, make in INTERVENTIONS.items():
        if name == "VRGA":  # phase 2 edits the decode steps only
            run = lambda ivs: np.asarray(
                generate(
                    model.params, model.config, batch, max_new_tokens=3, stop_tokens=[], interventions=ivs, output_logits=True
                ).logits
            )
            out, ref = run(model.interventions([make(model.config)])), run(())
            assert np.isfinite(out).all() and np.abs(out - ref).max() > 1e-5, f"{name} changed nothing"
            continue
        out = np.asarray(model.forward(batch=batch, interventions=[make(model.config)]).logits)
        assert np.isfinite(out[valid]).all(), name
        assert np.abs(out - np.asarray(base.logits))[valid].max() > 1e-5, f"{name} changed nothing"


def test_absent_fields_take_transformers_defaults():
    """A config.json with only model_type reads as transformers' LlavaNextConfig() (CLIP ViT-L/14-336,
    Llama-7B sizes, the default image_grid_pinpoints)."""
    from transformers import LlavaNextConfig

    from jaxmm.models.llava_next import Config

    hf, cfg = LlavaNextConfig(), Config.from_dict({"model_type": "llava_next"})
    v, t, hv, ht = cfg.vision, cfg.text, hf.vision_config, hf.text_config
    assert (v.depth, v.hidden_size, v.intermediate_size, v.num_heads, v.image_size, v.patch_size, v.in_channels) == (
        hv.num_hidden_layers,
        hv.hidden_size,
        hv.intermediate_size,
        hv.num_attention_heads,
        hv.image_size,
        hv.patch_size,
        hv.num_channels,
    )
    assert (v.hidden_act, v.layer_norm_eps) == (hv.hidden_act, hv.layer_norm_eps)
    assert (
        t.vocab_size,
        t.hidden_size,
        t.intermediate_size,
        t.num_hidden_layers,
        t.num_attention_heads,
        t.num_key_value_heads,
        t.rms_norm_eps,
    ) == (
        ht.vocab_size,
        ht.hidden_size,
        ht.intermediate_size,
        ht.num_hidden_layers,
        ht.num_attention_heads,
        ht.num_key_value_heads,
        ht.rms_norm_eps,
    )
    assert v.image_grid_pinpoints == tuple(map(tuple, hf.image_grid_pinpoints))
    assert (cfg.image_token_id, v.vision_feature_layer, v.vision_feature_select_strategy) == (
        hf.image_token_id,
        hf.vision_feature_layer,
        hf.vision_feature_select_strategy,
    )
