"""jaxmm convert -> tensorstore checkpoint -> sharded restore, exactly."""

import flax.nnx as nnx
import jax
import numpy as np
import pytest
import torch
from jax.sharding import Mesh

import jaxmm
import tiny
from jaxmm.checkpoint.hf import CheckpointError
from jaxmm.checkpoint.store import convert
from test_qwen2_5_vl_parity import make_batch


def test_convert_round_trip_onto_a_mesh(tmp_path):
    tiny.save_hf_model("gqa_untied", tmp_path / "hf", dtype=torch.bfloat16)
    out = convert(tmp_path / "hf", tmp_path / "conv")
    assert not (tmp_path / "conv.partial").exists()
    ref = jaxmm.load(tmp_path / "hf")
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("fsdp", "tensor"))
    sharded = jaxmm.load(out, mesh=mesh)
    a = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(ref.params)}
    b = {p: v.get_value() for p, v in nnx.to_flat_state(sharded.params)}
    assert set(a) == set(b)
    for p in a:
        np.testing.assert_array_equal(np.asarray(b[p]), a[p])
    k = sharded.params["language_model"]["layers"][0]["mlp"]["gate_proj"]["kernel"][...]
    assert len(k.addressable_shards) == 8 and k.addressable_shards[0].data.shape != k.shape
    batch = make_batch([["chelsea"]], "left")
    np.testing.assert_allclose(np.asarray(sharded.forward(**batch).logits), np.asarray(ref.forward(**batch).logits), atol=1e-5)


def test_failed_conversion_leaves_nothing(tmp_path):
    from safetensors.numpy import load_file, save_file

    tiny.save_hf_model("mha_tied", tmp_path / "hf")
    t = load_file(tmp_path / "hf" / "model.safetensors")
    del t["model.norm.weight"]
    save_file(t, tmp_path / "hf" / "model.safetensors")
    with pytest.raises(CheckpointError, match="language_model.norm.weight"):
        convert(tmp_path / "hf", tmp_path / "conv")
    assert not (tmp_path / "conv").exists() and not (tmp_path / "conv.partial").exists()
