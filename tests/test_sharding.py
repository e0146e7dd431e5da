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
    mesh = Mesh(devs, ("fsdp", "model"))
    assert logical_to_spec(("embed", "mlp"), mesh) == PartitionSpec("fsdp", "model")
    assert logical_to_spec(("vocab", None), mesh) == PartitionSpec("model", None)


def test_sharded_load_gives_the_same_logits(tmp_path):
    assert len(jax.devices()) >= 8, "conftest sets XLA_FLAGS=--xla_force_host_platform_device_count=8"
    tiny.save_hf_model("gqa_untied", tmp_path)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("fsdp", "model"))
    plain = jaxmm.load(tmp_path)
    sharded = jaxmm.load(tmp_path, mesh=mesh)
    k = sharded.params["language_model"]["layers"][0]["mlp"]["gate_proj"]["kernel"][...]
    assert k.sharding.spec == PartitionSpec("fsdp", "model")
    assert len(k.addressable_shards) == 8
    batch = make_batch([["chelsea"], []], "left")
    a = np.asarray(plain.forward(**batch).logits)
    b = np.asarray(sharded.forward(**batch).logits)
    valid = batch["attention_mask"].astype(bool)
    assert np.abs(a - b)[valid].max() < 1e-5
