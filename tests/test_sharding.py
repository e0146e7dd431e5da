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
