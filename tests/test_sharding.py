"""Parameters carry logical axis names and load onto a mesh of (fake CPU) devices."""

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec

import jaxmm
import tiny
from jaxmm.sharding import logical_to_spec
from test_qwen2_5_vl_parity import make_batch


def test_every_parameter_has_logical_axis_names():
    import flax.nnx as nnx

    from jaxmm.models.qwen2_5_vl import Config, abstract_params

    cfg = Config.from_dict(tiny.hf_config("gqa_untied").to_dict())
    for path, var in nnx.to_flat_state(abstract_params(cfg)):
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == var.get_value().ndim, path
    q = dict(nnx.to_flat_state(abstract_params(cfg)))[("language_model", "layers", 0, "self_attn", "q_proj", "kernel")]
    assert q.get_metadata()["out_sharding"] == ("embed", "heads")


def test_logical_rules_map_to_mesh_axes():
    devs = np.array(jax.devices()[:8]).reshape(2, 4)
    mesh = Mesh(devs, ("fsdp", "tensor"))
    assert logical_to_spec(("embed", "mlp"), mesh) == PartitionSpec("fsdp", "tensor")
    assert logical_to_spec(("vocab", None), mesh) == PartitionSpec("tensor", None)


def test_sharded_load_gives_the_same_logits(tmp_path):
    assert len(jax.devices()) >= 8, "conftest sets XLA_FLAGS=--xla_force_host_platform_device_count=8"
    tiny.save_hf_model("gqa_untied", tmp_path)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("fsdp", "tensor"))
    plain = jaxmm.load(tmp_path)
    sharded = jaxmm.load(tmp_path, mesh=mesh)
    k = sharded.params["language_model"]["layers"][0]["mlp"]["gate_proj"]["kernel"][...]
    assert k.sharding.spec == PartitionSpec("fsdp", "tensor")
    assert len(k.addressable_shards) == 8
    batch = make_batch([["chelsea"], []], "left")
    a = np.asarray(plain.forward(**batch).logits)
    b = np.asarray(sharded.forward(**batch).logits)
    valid = batch["attention_mask"].astype(bool)
    assert np.abs(a - b)[valid].max() < 1e-5


def test_forward_generate_and_sft_step_on_a_data_fsdp_tensor_mesh(tmp_path, monkeypatch):
    """(data=2, fsdp=2, tensor=2) on 8 fake devices equals one device: logits, greedy tokens, one
    SFT step's parameters (1e-5)."""
    import flax.nnx as nnx

    from jaxmm.generate import generate
    from jaxmm.sharding import make_mesh
    from jaxmm.train.sft import TrainConfig, make_step, optimizer

    tiny.save_hf_model("gqa_untied", tmp_path)
    mesh = make_mesh(2, 2, 2)
    one, many = jaxmm.load(tmp_path), jaxmm.load(tmp_path, mesh=mesh)
    k = many.params["language_model"]["layers"][0]["self_attn"]["q_proj"]["kernel"][...]
    assert k.sharding.spec == PartitionSpec("fsdp", "tensor")
    batch = make_batch([["chelsea"], ["coffee"]], "left")
    valid = batch["attention_mask"].astype(bool)
    assert np.abs(np.asarray(one.forward(**batch).logits) - np.asarray(many.forward(**batch).logits))[valid].max() < 1e-5
    b1, bm = one.prepare(**batch), many.prepare(**batch)
    g1 = generate(one.params, one.config, b1, max_new_tokens=8, stop_tokens=[])
    gm = generate(many.params, many.config, bm, max_new_tokens=8, stop_tokens=[])
    np.testing.assert_array_equal(np.asarray(g1.tokens), np.asarray(gm.tokens))
    labels = np.where(batch["attention_mask"] > 0, batch["input_ids"], -100)
    cfg = TrainConfig(steps=10, lr=1e-3)
    outs = []
    for m, b in ((one, b1), (many, bm)):
        tx = optimizer(cfg, m.params)
        step = make_step(m.config, tx, "float32")
        params, _, metrics = step(m.params, tx.init(m.params), b, labels)
        outs.append({p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(params)})
    assert max(float(np.abs(outs[0][p] - outs[1][p]).max()) for p in outs[0]) < 1e-5


def test_explicit_activation_and_kv_cache_shardings(tmp_path):
    """jax.jit with in/out shardings on a (data=2, fsdp=2, tensor=2) mesh: the forward's logits and
    the prefill's KV cache come out split as declared and equal one device (1e-5); generation with
    the cache kept sharded gives the same tokens, generating and streaming."""
    from jaxmm.generate import batch_with, extend_for_decoding, generate, prefill, stream
    from jaxmm.generate import jit_prefill
    from jaxmm.sharding import batch_shardings, cache_shardings, jit_forward, make_mesh

    tiny.save_hf_model("gqa_untied", tmp_path)
    mesh = make_mesh(2, 2, 2)
    one, many = jaxmm.load(tmp_path), jaxmm.load(tmp_path, mesh=mesh)
    raw = make_batch([["chelsea"], ["coffee"], [], ["chelsea"]], "left")
    b1 = one.prepare(**raw)
    valid = raw["attention_mask"].astype(bool)
    sh = batch_shardings(b1, mesh)
    assert sh.input_ids.spec == PartitionSpec(("data", "fsdp"), None)
    assert sh.position_ids.spec == PartitionSpec(None, ("data", "fsdp"), None)
    assert sh.pixel_values.spec == PartitionSpec()
    f = jit_forward(many.config, mesh, many.params, b1)
    logits = f(many.params, b1)
    v = many.config.text.vocab_size
    assert logits.sharding.spec == PartitionSpec(("data", "fsdp"), None, "tensor" if v % 2 == 0 else None)
    want = np.asarray(one.forward(batch=b1).logits)
    assert np.abs(np.asarray(logits) - want)[valid].max() < 1e-5

    max_len = 64
    pb = batch_with(b1, extend_for_decoding(b1, max_len))
    last, cache, pos = jit_prefill(many.config, mesh, many.params, pb, max_len)(many.params, pb)
    g = many.config.text.num_key_value_heads
    assert cache.k.sharding.spec == PartitionSpec(None, ("data", "fsdp"), None, "tensor" if g % 2 == 0 else None, None)
    assert cache.k.sharding == cache_shardings(cache, mesh).k
    l1, c1, p1, _ = prefill(one.params, one.config, pb, max_len)
    np.testing.assert_allclose(np.asarray(last), np.asarray(l1), atol=1e-5)
    np.testing.assert_allclose(np.asarray(cache.k), np.asarray(c1.k), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(pos), np.asarray(p1))
    t1 = generate(one.params, one.config, b1, max_new_tokens=6, stop_tokens=[])
    tm = generate(many.params, many.config, b1, max_new_tokens=6, stop_tokens=[], mesh=mesh)
    np.testing.assert_array_equal(np.asarray(t1.tokens), np.asarray(tm.tokens))
    streamed = np.stack(list(stream(many.params, many.config, b1, max_new_tokens=6, stop_tokens=[], mesh=mesh)), 1)
    np.testing.assert_array_equal(streamed, np.asarray(t1.tokens))  # stream: the same engine on the mesh


def test_jit_generate_with_explicit_shardings(tmp_path):
    """The whole generation as one jax.jit with in/out shardings on a (data=2, fsdp=2, tensor=2) mesh:
    tokens, lengths, logits and decode probes come out split over data×fsdp on B, as declared, and
    equal one device (tokens exactly, logits and attention 1e-5)."""
    from jaxmm.generate import extend_for_decoding, generate
    from jaxmm.generate import jit_generate
    from jaxmm.sharding import make_mesh

    tiny.save_hf_model("gqa_untied", tmp_path)
    mesh = make_mesh(2, 2, 2)
    one, many = jaxmm.load(tmp_path), jaxmm.load(tmp_path, mesh=mesh)
    b1 = one.prepare(**make_batch([["chelsea"], ["coffee"], [], ["chelsea"]], "left"))
    probes = (jaxmm.AttentionWeights(layers=(0,)),)
    want = generate(one.params, one.config, b1, max_new_tokens=5, stop_tokens=[], probes=probes, output_logits=True)
    f = jit_generate(many.config, mesh, many.params, b1, 5, stop_tokens=[], probes=probes, output_logits=True)
    got = f(many.params, b1, extend_for_decoding(b1, f.max_len), jax.random.PRNGKey(0))
    rows = ("data", "fsdp")
    assert got.tokens.sharding.spec == PartitionSpec(rows, None)
    assert got.lengths.sharding.spec == PartitionSpec(rows)
    assert got.logits.sharding.spec == PartitionSpec(rows, None, None)
    att = got.probes["attentions"]["text"].values  # [B,T_new,L,H,K]
    assert att.sharding.spec == PartitionSpec(rows, None, None, None, None)
    assert got.prefill_probes is None
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    np.testing.assert_array_equal(np.asarray(got.lengths), np.asarray(want.lengths))
    np.testing.assert_allclose(np.asarray(got.logits), np.asarray(want.logits), atol=1e-5)
    np.testing.assert_allclose(np.asarray(att), np.asarray(want.probes["attentions"]["text"].values), atol=1e-5)


def test_host_slice_local_rows_and_global_batch(tmp_path, monkeypatch):
    """Per-host data on one process (the two-process case is in test_multihost.py): the row split,
    its errors, and global arrays placed as batch_shardings declares with the same values."""
    import pytest

    from jaxmm.sharding import global_batch, host_samples, host_slice, local_rows, make_mesh

    mesh = make_mesh(2, 2, 2)
    assert host_slice(8) == slice(0, 8) and host_slice(8, mesh) == slice(0, 8)
    with pytest.raises(ValueError, match="not divisible by the 4 batch shards"):
        host_slice(6, mesh)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    assert host_slice(8) == slice(4, 8)
    assert list(host_samples(5)) == [1, 3]
    with pytest.raises(ValueError, match="not divisible by the 2 processes"):
        host_slice(7)
    monkeypatch.undo()

    tiny.save_hf_model("gqa_untied", tmp_path)
    model = jaxmm.load(tmp_path)
    full = model.prepare(**make_batch([["chelsea"], ["coffee"], [], ["chelsea"]], "left"))
    labels = np.where(np.asarray(full.attention_mask) > 0, np.asarray(full.input_ids), -100)
    g = global_batch(local_rows({"batch": full, "labels": labels}, mesh), mesh, 4)
    rows = ("data", "fsdp")
    assert g["batch"].input_ids.sharding.spec == PartitionSpec(rows, None)
    assert g["batch"].position_ids.sharding.spec == PartitionSpec(None, rows, None)
    assert g["batch"].layout.image_mask.sharding.spec == PartitionSpec(rows, None)
    assert g["batch"].pixel_values.sharding.spec == PartitionSpec()
    assert g["labels"].sharding.spec == PartitionSpec(rows, None)
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves({"batch": full, "labels": labels})):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="input_ids has 4 rows"):
        global_batch(full, mesh, 8)
