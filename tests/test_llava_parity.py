"""LLaVA-1.5 against transformers' LlavaForConditionalGeneration (CLIP tower, Llama decoder; float32):
logits, hidden states and attention weights on batches with left or right padding and several
images, every key layout, greedy generation, and PAI and VAR against transformers' eager attention
edited by methods.md's formulas."""

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import jaxmm
import tiny
from jaxmm import interventions as I
from jaxmm.attention import AttentionWeights
from test_methods import patched_eager

LLAMA = "transformers.models.llama.modeling_llama"
N_TOK = (tiny.LLAVA_IMAGE_SIZE // tiny.LLAVA_PATCH) ** 2


def make_batch(images_per_row, side, seed=0):
    """Rows of text with ``<image>`` runs of N_TOK tokens; pixel_values from transformers' CLIP
    processor on real photos."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    proc = CLIPImageProcessorPil(
        size={"shortest_edge": tiny.LLAVA_IMAGE_SIZE}, crop_size={"height": tiny.LLAVA_IMAGE_SIZE, "width": tiny.LLAVA_IMAGE_SIZE}
    )
    photos = tiny.photos()
    rng = np.random.default_rng(seed)
    rows, imgs = [], []
    for names in images_per_row:
        toks = [1] + [int(t) for t in rng.integers(3, 280, 3)]
        for n in names:
            toks += [tiny.IMAGE_TOKEN] * N_TOK + [int(t) for t in rng.integers(3, 280, 2)]
            imgs.append(photos[n])
        rows.append(toks + [int(t) for t in rng.integers(3, 280, 3)])
    ids, am = tiny.make_rows(rows, side)
    pv = proc(imgs, return_tensors="np")["pixel_values"].astype(np.float32)
    return {"input_ids": ids, "attention_mask": am, "pixel_values": pv}


def hf_forward(hf_model, batch, **kw):
    """The HF model on a batch of numpy inputs (every key as the model's argument: input_ids,
    attention_mask, pixel_values and, for LLaVA-NeXT, image_sizes) with generate's positions."""
    am = batch["attention_mask"]
    pos = np.where(am > 0, np.cumsum(am, -1) - 1, 1)  # what generate gives a padded batch
    with torch.no_grad():
        return hf_model(
            **{k: torch.from_numpy(v) for k, v in batch.items()},
            position_ids=torch.from_numpy(pos),
            output_attentions=True,
            output_hidden_states=True,
            **kw,
        )


@pytest.fixture(scope="module", params=[(False, -2), (True, [-3, -1])], ids=["untied", "tied_two_feature_layers"])
def ckpt(request, tmp_path_factory):
    tie, layer = request.param
    path = tmp_path_factory.mktemp("llava")
    model = tiny.build_hf_llava(seed=3, tie=tie, feature_layer=layer)
    model.save_pretrained(path)
    return path, model


@pytest.mark.parametrize("images,side", [([["astronaut", "chelsea"], []], "left"), ([["coffee"], ["rocket", "camera"]], "right")])
def test_logits_hidden_states_and_attention(ckpt, images, side):
    path, hf_model = ckpt
    batch = make_batch(images, side)
    ref = hf_forward(hf_model, batch)
    model = jaxmm.load(path)
    assert model.config.model_type == "llava" and model.config.vision.tokens_per_image == N_TOK
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
    lay = model.prepare(**batch).layout  # the layout sees each image as its patch grid
    assert int(np.asarray(lay.image_mask).sum()) == N_TOK * sum(map(len, images))
    assert np.asarray(lay.grid_hw)[np.asarray(lay.image_mask)].max() == tiny.LLAVA_IMAGE_SIZE // tiny.LLAVA_PATCH


def test_every_key_layout_loads_the_same_weights(ckpt, tmp_path):
    """What save_pretrained writes, transformers 5's in-memory names and the published llava-hf names."""
    path, hf_model = ckpt
    saved = load_file(str(path / "model.safetensors"))
    assert any(k.startswith("language_model.model.") for k in saved)
    layouts = {
        "memory": {k: v.numpy() for k, v in hf_model.state_dict().items()},
        "published": {k.replace("vision_tower.", "vision_tower.vision_model."): v for k, v in saved.items()},
    }
    assert any(k.startswith("model.language_model.") for k in layouts["memory"])
    batch = make_batch([["chelsea"]], "left")
    want = np.asarray(jaxmm.load(path).forward(**batch).logits)
    for name, tensors in layouts.items():
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text((path / "config.json").read_text())
        save_file(tensors, str(d / "model.safetensors"))
        np.testing.assert_array_equal(np.asarray(jaxmm.load(d).forward(**batch).logits), want, err_msg=name)


def test_greedy_generation_matches_transformers(ckpt):
    from jaxmm.generate import generate

    path, hf_model = ckpt
    batch = make_batch([["astronaut"], ["coffee", "chelsea"]], "left", seed=4)
    model = jaxmm.load(path)
    with torch.no_grad():
        ref = hf_model.generate(
            input_ids=torch.from_numpy(batch["input_ids"]),
            attention_mask=torch.from_numpy(batch["attention_mask"]),
            pixel_values=torch.from_numpy(batch["pixel_values"]),
            max_new_tokens=8,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    got = generate(model.params, model.config, model.prepare(**batch), max_new_tokens=8, stop_tokens=[])
    s = batch["input_ids"].shape[1]
    np.testing.assert_array_equal(np.asarray(got.tokens), ref[:, s:].numpy())


def edited_forward(hf_model, batch, edit):
    """:func:`hf_forward` with transformers' Llama eager attention patched by ``edit``."""
    with patched_eager(edit, LLAMA):
        return hf_forward(hf_model, batch)


def compare_edited(model, batch, ref, ivs):
    """jaxmm under ``ivs`` equals the edited reference: logits (1e-4) and every layer's weights (1e-5)."""
    out = model.forward(**batch, interventions=ivs, probes=[AttentionWeights()])
    valid = batch["attention_mask"].astype(bool)
    assert np.abs(np.asarray(out.logits) - ref.logits.numpy())[valid].max() < 1e-4
    w = np.asarray(out.probes["attentions"]["text"].values)
    for i, r in enumerate(ref.attentions):
        assert np.abs(w[i] - r.numpy()).transpose(0, 2, 1, 3)[valid].max() < 1e-5, f"edited weights of layer {i}"


def test_pai_on_llava(ckpt):
    """PAI (methods.md): at the last query row of layers >= start, z + α·|z| on image keys."""
    path, hf_model = ckpt
    model = jaxmm.load(path)
    batch = make_batch([["astronaut", "chelsea"], ["coffee"]], "left")
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


def var_reference(hf_model, batch, dims, tau, min_mass):
    """transformers with VAR's edit patched into its eager attention (methods.md): sink image keys
    (|h| over ``dims`` > ``tau`` after input_layernorm) give a share p = 0.4 of their mass to the
    other image keys, from layer 2 on, in rows whose image mass and sink share allow it. Returns
    (edited output, plain output)."""
    cap = {}
    hooks = [
        layer.input_layernorm.register_forward_hook(lambda m, x, y, i=i: cap.__setitem__(i, y))
        for i, layer in enumerate(hf_model.model.language_model.layers)
    ]
    base = hf_forward(hf_model, batch)
    for h in hooks:
        h.remove()
    img = batch["input_ids"] == tiny.IMAGE_TOKEN
    sinks = {i: torch.from_numpy((np.abs(cap[i].numpy()[..., list(dims)]).max(-1) > tau) & img) for i in cap}
    assert 0 < int(sinks[2].sum()) < img.sum()
    imgt = torch.from_numpy(img).float()[:, None, None, :]

    def edit(layer, z, a, allowed):
        if a is None or layer < 2:
            return None, None
        sk = sinks[layer].float()[:, None, None, :]
        mv, ms = (a * imgt).sum(-1, keepdim=True), (a * sk).sum(-1, keepdim=True)
        rest = (a * imgt * (1 - sk)).sum(-1, keepdim=True)
        ok = (mv >= min_mass) & (ms <= 0.5 * mv) & (ms > 0) & (rest > 0)
        e = a * (1 - 0.4 * sk) + 0.4 * ms * a * imgt * (1 - sk) / rest.clamp_min(1e-30)
        return None, torch.where(ok, e, a)

    return edited_forward(hf_model, batch, edit), base


def test_var_on_llava(ckpt):
    """VAR (methods.md): sink image keys (|h| over the sink dims > τ after input_layernorm) give a
    share p of their mass to the other image keys, in rows whose image mass and sink share allow it."""
    path, hf_model = ckpt
    model = jaxmm.load(path)
    batch = make_batch([["astronaut", "chelsea"], ["coffee"]], "left")
    dims, tau, min_mass = (0, 1, 2, 3), 2.0, 0.05
    ref, base = var_reference(hf_model, batch, dims, tau, min_mass)
    assert np.abs(ref.logits.numpy() - base.logits.numpy()).max() > 1e-4
    compare_edited(
        model, batch, ref, I.build([{"method": "var", "dims": list(dims), "tau": tau, "min_mass": min_mass}], model.config)
    )


@pytest.fixture(scope="module")
def chat_ckpt(tmp_path_factory):
    """A tiny LLaVA checkpoint with its tokenizer, chat template and CLIP processor config."""
    from chat_fixtures import save_llava_chat_checkpoint

    return save_llava_chat_checkpoint(tmp_path_factory.mktemp("llava_chat"))


def test_prepare_chat_equals_the_llava_processor(chat_ckpt):
    """Model.prepare_chat's ids and pixel_values are transformers' LlavaProcessor's; the spans name the
    system text and the question."""
    from transformers import AutoTokenizer, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    model = jaxmm.load(chat_ckpt)
    photos = tiny.photos()
    convs = [
        [
            {"role": "system", "content": "you are a helpful assistant ."},
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": photos["coffee"]},
                    {"type": "text", "text": "is the coffee cup full or empty ?"},
                ],
            },
        ],
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": photos["astronaut"]},
                    {"type": "image", "image": photos["camera"]},
                    {"type": "text", "text": "describe the image in one sentence ."},
                ],
            }
        ],
    ]
    batch, info = model.prepare_chat(convs)
    proc = LlavaProcessor(
        image_processor=CLIPImageProcessorPil.from_pretrained(chat_ckpt),
        tokenizer=AutoTokenizer.from_pretrained(chat_ckpt),
        patch_size=tiny.LLAVA_PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=model.tokenizer.chat_template,
    )
    ids = np.asarray(batch.input_ids)
    am = np.asarray(batch.attention_mask)
    for row, conv in enumerate(convs):
        text = proc.apply_chat_template(conv, add_generation_prompt=True)
        images = [p["image"] for m in conv if not isinstance(m["content"], str) for p in m["content"] if p["type"] == "image"]
        ref = proc(text=text, images=images, return_tensors="np")
        np.testing.assert_array_equal(ids[row][am[row] > 0], ref["input_ids"][0])
    ref_pix = CLIPImageProcessorPil.from_pretrained(chat_ckpt)(
        [photos["coffee"], photos["astronaut"], photos["camera"]], return_tensors="np"
    )["pixel_values"]
    np.testing.assert_array_equal(np.asarray(batch.pixel_values), ref_pix)
    lay = batch.layout
    system, question = np.asarray(lay.system_mask), np.asarray(lay.question_mask)
    tok = model.tokenizer
    assert tok.decode(ids[0][system[0]]).strip() == "<s>you are a helpful assistant ."  # from token 0 (BOS)
    assert tok.decode(ids[1][question[1]]).strip() == "describe the image in one sentence ."
    assert ids[1][system[1]].tolist() == [1]  # no system message: the span is the BOS
    assert not (question & np.asarray(lay.image_mask)).any()


def test_jaxmm_eval_runs_baseline_pai_and_var_on_llava(chat_ckpt, tmp_path):
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
    assert {r["method"] for r in rows} == {"baseline", "pai", "var:dims=[0, 1, 2, 3],tau=2.0"}
    by = {(r["id"], r["method"]): r for r in rows}
    assert any(
        by[(i, "pai")]["prediction"] != by[(i, "baseline")]["prediction"] or by[(i, "pai")]["vas"] != by[(i, "baseline")]["vas"]
        for i, _ in by
    )
    assert all(r["vas"] is not None and len(r["visual_entropy_per_layer"]) == 3 for r in rows)
