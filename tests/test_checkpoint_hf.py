"""jaxmm.checkpoint.hf: safetensors reading (single, sharded, bf16/fp16), the key-map engine, errors."""

import json
import os
import struct

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as np_save_file
from safetensors.torch import load_file as torch_load_file
from safetensors.torch import save_file as torch_save_file

from jaxmm.checkpoint.hf import (
    CheckpointError,
    Rule,
    SafetensorsCheckpoint,
    convert,
    open_checkpoint,
    save_safetensors,
    unflatten,
)

SDS = jax.ShapeDtypeStruct

# A tiny Qwen2 causal LM: small enough that save_pretrained takes a fraction of a second.
HIDDEN, INTER, VOCAB, LAYERS, HEADS, KV_HEADS = 16, 24, 32, 2, 2, 1
HEAD_DIM = HIDDEN // HEADS

QWEN2_RULES = (
    Rule(r"model\.embed_tokens\.weight", "embed.weight"),
    Rule(r"model\.layers\.(\d+)\.self_attn\.(q|k|v|o)_proj\.weight", r"layers.\1.attn.\2.kernel", "T"),
    Rule(r"model\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.bias", r"layers.\1.attn.\2.bias"),
    Rule(r"model\.layers\.(\d+)\.mlp\.(?P<proj>gate|up|down)_proj\.weight", r"layers.\1.mlp.\g<proj>", "T"),
    Rule(r"model\.layers\.(\d+)\.(input|post_attention)_layernorm\.weight", r"layers.\1.norm_\2"),
    Rule(r"model\.norm\.weight", "norm"),
    Rule(r"lm_head\.weight", "head.kernel", "T"),
)


def qwen2_expected(dtype=np.float32) -> dict:
    e = {("embed", "weight"): (VOCAB, HIDDEN), ("norm",): (HIDDEN,), ("head", "kernel"): (HIDDEN, VOCAB)}
    for i in range(LAYERS):
        e |= {
            ("layers", i, "attn", "q", "kernel"): (HIDDEN, HEADS * HEAD_DIM),
            ("layers", i, "attn", "k", "kernel"): (HIDDEN, KV_HEADS * HEAD_DIM),
            ("layers", i, "attn", "v", "kernel"): (HIDDEN, KV_HEADS * HEAD_DIM),
            ("layers", i, "attn", "o", "kernel"): (HEADS * HEAD_DIM, HIDDEN),
            ("layers", i, "attn", "q", "bias"): (HEADS * HEAD_DIM,),
            ("layers", i, "attn", "k", "bias"): (KV_HEADS * HEAD_DIM,),
            ("layers", i, "attn", "v", "bias"): (KV_HEADS * HEAD_DIM,),
            ("layers", i, "mlp", "gate"): (HIDDEN, INTER),
            ("layers", i, "mlp", "up"): (HIDDEN, INTER),
            ("layers", i, "mlp", "down"): (INTER, HIDDEN),
            ("layers", i, "norm_input"): (HIDDEN,),
            ("layers", i, "norm_post_attention"): (HIDDEN,),
        }
    return {p: SDS(s, dtype) for p, s in e.items()}


def save_qwen2(path, dtype=torch.float32, **kw):
    """save_pretrained of a random tiny Qwen2ForCausalLM; returns its state dict in float32."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    model = model.to(dtype)
    model.save_pretrained(path, **kw)
    return {k: v.float().numpy() for k, v in model.state_dict().items()}


def check_against_torch(out: dict, state: dict, rtol=0.0):
    """Every converted tensor equals the torch state dict entry (transposed for kernels)."""
    for key, want in state.items():
        path = next(r.match(key) for r in QWEN2_RULES if r.match(key) is not None)
        got = np.asarray(out[path], np.float32)
        np.testing.assert_allclose(got, want.T if path[-1] in ("kernel", "gate", "up", "down") else want, rtol=rtol, atol=0)


# ----------------------------------------------------------------------------- reading
def test_single_file_every_float_dtype_matches_torch(tmp_path):
    f = tmp_path / "model.safetensors"
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.f32": torch.randn(3, 5, generator=g),
        "b.bf16": torch.randn(4, 6, generator=g).bfloat16(),
        "c.f16": torch.randn(7, generator=g).half(),
        "d.i64": torch.arange(6).reshape(2, 3),
        "e.empty": torch.zeros(0, 4),
        "f.scalar": torch.tensor(2.5).bfloat16(),
    }
    torch_save_file(tensors, f, metadata={"format": "pt"})
    for ckpt in (open_checkpoint(tmp_path), open_checkpoint(f)):
        assert isinstance(ckpt, SafetensorsCheckpoint)
        assert sorted(ckpt.keys()) == sorted(tensors)
        assert [ckpt.dtype(k) for k in ("a.f32", "b.bf16", "c.f16", "d.i64")] == ["F32", "BF16", "F16", "I64"]
        assert ckpt.shape("b.bf16") == (4, 6) and ckpt.shape("f.scalar") == () and ckpt.file("a.f32") == f
        assert ckpt.get("b.bf16").dtype == ml_dtypes.bfloat16 and ckpt.get("c.f16").dtype == np.float16
        ref = torch_load_file(f)
        for k in tensors:
            got = ckpt.get(k)
            assert got.shape == tuple(ref[k].shape)
            np.testing.assert_array_equal(got.astype(np.float32), ref[k].float().numpy())


def test_sharded_bf16_save_pretrained_converts_like_torch(tmp_path):
    state = save_qwen2(tmp_path, torch.bfloat16, max_shard_size="4KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (tmp_path / "model.safetensors").exists()
    ckpt = open_checkpoint(tmp_path)
    assert sorted(ckpt.keys()) == sorted(state)
    assert {ckpt.file(k).name for k in ckpt.keys()} == set(shards)
    assert all(ckpt.dtype(k) == "BF16" for k in ckpt.keys())
    out = convert(ckpt, QWEN2_RULES, qwen2_expected(np.float32))
    assert set(out) == set(qwen2_expected())
    assert all(a.dtype == np.float32 and a.flags.c_contiguous for a in out.values())
    check_against_torch(out, state)  # bf16 -> f32 is exact
    out16 = convert(ckpt, QWEN2_RULES, qwen2_expected(np.float32), dtype=ml_dtypes.bfloat16)
    assert all(a.dtype == ml_dtypes.bfloat16 for a in out16.values())
    check_against_torch(out16, state)


@pytest.mark.parametrize(
    "src,dst",
    [
        (torch.float16, np.float32),
        (torch.float32, np.float32),
        (torch.float32, ml_dtypes.bfloat16),
        (torch.float16, ml_dtypes.bfloat16),
    ],
)
def test_single_file_save_pretrained_dtypes(tmp_path, src, dst):
    state = save_qwen2(tmp_path, src)
    assert (tmp_path / "model.safetensors").exists()
    out = convert(open_checkpoint(tmp_path), QWEN2_RULES, qwen2_expected(dst))
    assert all(a.dtype == np.dtype(dst) for a in out.values())
    if dst is np.float32:
        check_against_torch(out, state)
    else:  # rounded once to bf16, as torch would
        for k, v in state.items():
            state[k] = torch.from_numpy(v).bfloat16().float().numpy()
        check_against_torch(out, state)


def test_expected_from_nnx_eval_shape(tmp_path):
    import flax.nnx as nnx

    class Tiny(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([nnx.Linear(3, 4, rngs=rngs) for _ in range(2)])

    abstract = nnx.eval_shape(lambda: Tiny(nnx.Rngs(0)))
    expected = dict(nnx.to_flat_state(nnx.state(abstract, nnx.Param)))  # leaves are nnx.Param
    assert ("layers", 1, "kernel") in expected
    w = {f"l.{i}.weight": np.random.default_rng(i).normal(size=(4, 3)).astype(np.float16) for i in range(2)}
    w |= {f"l.{i}.bias": np.full(4, i, np.float16) for i in range(2)}
    np_save_file(w, tmp_path / "model.safetensors")
    rules = [Rule(r"l\.(\d+)\.weight", r"layers.\1.kernel", "T"), Rule(r"l\.(\d+)\.bias", r"layers.\1.bias")]
    out = convert(open_checkpoint(tmp_path), rules, expected)
    np.testing.assert_array_equal(out[("layers", 1, "kernel")], w["l.1.weight"].T.astype(np.float32))
    assert out[("layers", 1, "bias")].dtype == np.float32
    # and the state can be rebuilt from the converted arrays
    state = nnx.from_flat_state([(p, v.replace(out[p])) for p, v in expected.items()])
    nnx.update(abstract, state)
    np.testing.assert_array_equal(np.asarray(abstract.layers[0].bias[...]), np.zeros(4))


# ----------------------------------------------------------------------------- file errors
def test_truncated_file_names_the_file_and_sizes(tmp_path):
    np_save_file({"a": np.ones((8, 8), np.float32), "b": np.ones(16, np.float32)}, tmp_path / "model.safetensors")
    f = tmp_path / "model.safetensors"
    full = f.stat().st_size
    with open(f, "r+b") as fh:
        fh.truncate(full - 5)
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(tmp_path)
    msg = str(e.value)
    assert str(f) in msg and "truncated" in msg and str(full) in msg and str(full - 5) in msg
    with open(f, "r+b") as fh:  # cut inside the header
        fh.truncate(20)
    with pytest.raises(CheckpointError, match="truncated.*header"):
        open_checkpoint(f)
    f.write_bytes(b"\x01")
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated"):
        open_checkpoint(f)


def test_truncated_shard_of_a_sharded_checkpoint(tmp_path):
    save_qwen2(tmp_path, torch.float16, max_shard_size="4KB")
    shard = sorted(tmp_path.glob("*.safetensors"))[-1]
    with open(shard, "r+b") as fh:
        fh.truncate(shard.stat().st_size - 1)
    with pytest.raises(CheckpointError, match=shard.name):
        open_checkpoint(tmp_path)


@pytest.mark.parametrize(
    "header",
    [
        b"not json at all",
        b"[1, 2, 3]",
        b'{"a": {"dtype": "F32"}}',
        b'{"a": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 4]}}',
        b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}',
        b'{"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}',
    ],
)
def test_corrupt_header(tmp_path, header):
    f = tmp_path / "x.safetensors"
    f.write_bytes(struct.pack("<Q", len(header)) + header + bytes(64))
    with pytest.raises(CheckpointError, match="x.safetensors"):
        open_checkpoint(f)


def test_huge_header_length_is_not_read(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(struct.pack("<Q", 1 << 60) + b"{}")
    with pytest.raises(CheckpointError, match="over safetensors' limit of 100000000"):
        open_checkpoint(tmp_path)


def test_pickle_checkpoints_are_refused(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(tmp_path)
    msg = str(e.value)
    assert "safetensors" in msg and "never unpickles" in msg and "pytorch_model.bin" in msg
    assert "save_pretrained" in msg and "weights_only=True" in msg
    with pytest.raises(CheckpointError, match="safetensors"):
        open_checkpoint(tmp_path / "pytorch_model.bin")
    for name in ("weights.pt", "weights.pth"):
        d = tmp_path / name.replace(".", "_")
        d.mkdir()
        torch.save({"w": torch.ones(2)}, d / name)
        with pytest.raises(CheckpointError, match="safetensors"):
            open_checkpoint(d)


def test_safetensors_preferred_over_bin(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    np_save_file({"w": np.ones(2, np.float32)}, tmp_path / "model.safetensors")
    assert open_checkpoint(tmp_path).keys() == ["w"]


def test_no_weights(tmp_path):
    with pytest.raises(FileNotFoundError):
        open_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError):
        open_checkpoint(tmp_path / "nope")


def _hand_sharded(tmp_path, weight_map):
    np_save_file({"a": np.ones(2, np.float32)}, tmp_path / "s1.safetensors")
    np_save_file({"b": np.ones(3, np.float32)}, tmp_path / "s2.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_hand_made_index(tmp_path):
    _hand_sharded(tmp_path, {"a": "s1.safetensors", "b": "s2.safetensors"})
    ckpt = open_checkpoint(tmp_path)
    assert sorted(ckpt.keys()) == ["a", "b"] and ckpt.file("b").name == "s2.safetensors"
    np.testing.assert_array_equal(ckpt.get("b"), np.ones(3, np.float32))


def test_index_naming_a_missing_shard(tmp_path):
    _hand_sharded(tmp_path, {"a": "s1.safetensors", "b": "s3.safetensors"})
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(tmp_path)
    assert "s3.safetensors" in str(e.value) and "'b'" in str(e.value) and "does not exist" in str(e.value)


def test_index_naming_a_tensor_its_shard_lacks(tmp_path):
    _hand_sharded(tmp_path, {"a": "s1.safetensors", "b": "s1.safetensors"})
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(tmp_path)
    assert "s1.safetensors" in str(e.value) and "'b'" in str(e.value)


def test_same_tensor_in_two_loose_files(tmp_path):
    np_save_file({"a": np.ones(2, np.float32)}, tmp_path / "x.safetensors")
    np_save_file({"a": np.ones(2, np.float32)}, tmp_path / "y.safetensors")
    with pytest.raises(CheckpointError, match="x.safetensors.*y.safetensors"):
        open_checkpoint(tmp_path)


# ----------------------------------------------------------------------------- key map
def test_rule_target_syntax():
    r = Rule(r"model\.layers\.(\d+)\.mlp\.(up|down)_proj\.weight", r"lm.layers.\1.mlp.\2.kernel", "T")
    assert r.match("model.layers.12.mlp.up_proj.weight") == ("lm", "layers", 12, "mlp", "up", "kernel")
    assert r.match("model.layers.12.mlp.up_proj.weight.x") is None  # fullmatch
    assert r.match("xmodel.layers.1.mlp.up_proj.weight") is None
    named = Rule(r"(?P<tower>visual|model)\.(?P<i>\d+)", r"\g<tower>.\g<i>")
    assert named.match("visual.7") == ("visual", 7)
    with pytest.raises(ValueError, match="transform"):
        Rule("a", "b", "transpose")
    with pytest.raises(Exception):
        Rule("(", "b")


def _small(tmp_path, tensors):
    np_save_file(tensors, tmp_path / "model.safetensors")
    return open_checkpoint(tmp_path)


SMALL_RULES = (Rule(r"(?:model\.)?l\.(\d+)\.w", r"l.\1.kernel", "T"), Rule(r"(?:model\.)?l\.(\d+)\.b", r"l.\1.bias"))


def small_expected(n=2):
    return {
        **{("l", i, "kernel"): SDS((3, 4), np.float32) for i in range(n)},
        **{("l", i, "bias"): SDS((4,), np.float32) for i in range(n)},
    }


def small_tensors(n=2, prefix=""):
    return {
        **{f"{prefix}l.{i}.w": np.full((4, 3), i, np.float32) for i in range(n)},
        **{f"{prefix}l.{i}.b": np.full(4, i, np.float32) for i in range(n)},
    }


def test_alternative_names_both_work(tmp_path):
    for prefix in ("", "model."):
        (tmp_path / prefix).mkdir(exist_ok=True)
        out = convert(_small(tmp_path / prefix, small_tensors(prefix=prefix)), SMALL_RULES, small_expected())
        assert out[("l", 1, "kernel")].shape == (3, 4) and out[("l", 1, "kernel")][0, 0] == 1


def test_missing_tensor_names_the_target_path(tmp_path):
    t = small_tensors()
    del t["l.1.b"]
    with pytest.raises(CheckpointError) as e:
        convert(_small(tmp_path, t), SMALL_RULES, small_expected())
    msg = str(e.value)
    assert "missing parameters (1)" in msg and "l.1.bias [4]" in msg


def test_many_missing_are_counted_and_the_list_is_capped(tmp_path):
    with pytest.raises(CheckpointError) as e:
        convert(_small(tmp_path, small_tensors(1)), SMALL_RULES, small_expected(15))
    msg = str(e.value)
    assert "missing parameters (28)" in msg and "(and 18 more)" in msg


def test_unexpected_tensor_and_ignore(tmp_path):
    t = small_tensors() | {"rotary.inv_freq": np.ones(2, np.float32), "l.9.w": np.ones((4, 3), np.float32)}
    ckpt = _small(tmp_path, t)
    with pytest.raises(CheckpointError) as e:
        convert(ckpt, SMALL_RULES, small_expected())
    msg = str(e.value)
    assert "unexpected tensor 'rotary.inv_freq' in model.safetensors: no rule" in msg
    assert "unexpected tensor 'l.9.w' in model.safetensors: maps to l.9.kernel" in msg
    out = convert(ckpt, SMALL_RULES, small_expected(), ignore=[r"rotary\..*", r"l\.9\..*"])
    assert set(out) == set(small_expected())


def test_mis_shaped_tensor(tmp_path):
    t = small_tensors() | {"l.0.w": np.ones((3, 4), np.float32)}  # already transposed: wrong after "T"
    with pytest.raises(CheckpointError) as e:
        convert(_small(tmp_path, t), SMALL_RULES, small_expected())
    msg = str(e.value)
    assert "mis-shaped tensor 'l.0.w' in model.safetensors (shape [3, 4])" in msg
    assert "l.0.kernel expects [3, 4], got [4, 3]" in msg
    assert "missing parameters (1)" in msg  # and what it left unfilled


def test_transform_errors_are_reported(tmp_path):
    t = small_tensors() | {"l.0.w": np.ones((4, 3, 1), np.float32)}
    with pytest.raises(CheckpointError, match=r"'l.0.w' in model.safetensors: transform 'T' needs a 2-D"):
        convert(_small(tmp_path, t), SMALL_RULES, small_expected())


def test_callable_transform_gets_the_expected_shape(tmp_path):
    seen = []

    def flatten(w, shape):
        seen.append(shape)
        return w.reshape(w.shape[0], -1).T

    ckpt = _small(tmp_path, {"conv": np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)})
    out = convert(ckpt, [Rule("conv", "patch.kernel", flatten)], {("patch", "kernel"): SDS((12, 2), np.float32)})
    assert seen == [(12, 2)]
    np.testing.assert_array_equal(out[("patch", "kernel")], np.arange(24, dtype=np.float32).reshape(2, 12).T)


def test_target_filled_twice_names_both_keys(tmp_path):
    t = small_tensors() | {"model.l.0.b": np.ones(4, np.float32)}
    with pytest.raises(CheckpointError) as e:
        convert(_small(tmp_path, t), SMALL_RULES, small_expected())
    msg = str(e.value)
    assert "l.0.bias filled twice" in msg and "'l.0.b'" in msg and "'model.l.0.b'" in msg


def test_all_problems_reported_together(tmp_path):
    t = small_tensors() | {"junk": np.ones(1, np.float32), "l.0.b": np.ones(5, np.float32)}
    del t["l.1.w"]
    with pytest.raises(CheckpointError) as e:
        convert(_small(tmp_path, t), SMALL_RULES, small_expected())
    msg = str(e.value)
    assert "'junk'" in msg and "mis-shaped tensor 'l.0.b'" in msg and "l.1.kernel [3, 4]" in msg


def test_first_matching_rule_wins(tmp_path):
    rules = [Rule(r"l\.0\.b", "special"), *SMALL_RULES]
    expected = small_expected() | {("special",): SDS((4,), np.float16)}
    del expected[("l", 0, "bias")]
    out = convert(_small(tmp_path, small_tensors()), rules, expected)
    assert out[("special",)].dtype == np.float16


# ----------------------------------------------------------------------------- writing
def test_save_safetensors_round_trip_and_atomic(tmp_path):
    t = {
        "w": np.arange(6, dtype=np.float32).reshape(2, 3).astype(ml_dtypes.bfloat16),
        "h": np.linspace(0, 1, 5, dtype=np.float16),
        "i": np.arange(3, dtype=np.int32),
        "s": np.array(1.5, np.float32),
    }
    f = save_safetensors(t, tmp_path / "out" / "model.safetensors", metadata={"format": "pt", "step": 3})
    assert f == tmp_path / "out" / "model.safetensors"
    assert os.listdir(f.parent) == ["model.safetensors"]  # no temp file left
    (n,) = struct.unpack("<Q", f.read_bytes()[:8])
    assert n % 8 == 0 and json.loads(f.read_bytes()[8 : 8 + n])["__metadata__"] == {"format": "pt", "step": "3"}
    ref = torch_load_file(f)
    ckpt = open_checkpoint(f)
    for k, v in t.items():
        assert ckpt.get(k).dtype == v.dtype and ckpt.get(k).shape == v.shape
        np.testing.assert_array_equal(ckpt.get(k), v)
        np.testing.assert_array_equal(ref[k].float().numpy(), v.astype(np.float32))
    assert ref["w"].dtype == torch.bfloat16
    before = f.read_bytes()
    with pytest.raises(CheckpointError, match="complex64"):
        save_safetensors({"c": np.ones(2, np.complex64)}, f)
    assert f.read_bytes() == before and os.listdir(f.parent) == ["model.safetensors"]


def test_unflatten():
    tree = unflatten({("a", 0, "k"): 1, ("a", 1, "k"): 2, ("b",): 3})
    assert tree == {"a": {0: {"k": 1}, 1: {"k": 2}}, "b": 3}
    with pytest.raises(ValueError):
        unflatten({("a",): 1, ("a", "b"): 2})
    with pytest.raises(ValueError):
        unflatten({("a", "b"): 1, ("a",): 2})


def test_scalar_parameter_stays_0d(tmp_path):
    ckpt = _small(tmp_path, {"scale": np.array(2.0, np.float16)})
    out = convert(ckpt, [Rule("scale", "scale")], {("scale",): SDS((), np.float32)})
    assert out[("scale",)].shape == () and out[("scale",)] == 2.0


def test_iter_converted_streams_in_file_order_and_can_keep_dtype(tmp_path):
    from jaxmm.checkpoint.hf import iter_converted

    save_qwen2(tmp_path, torch.float16, max_shard_size="4KB")
    ckpt = open_checkpoint(tmp_path)
    it = iter_converted(ckpt, QWEN2_RULES, qwen2_expected(), keep_dtype=True)
    first = next(it)
    assert first[1].dtype == np.float16
    rest = dict(it)
    assert len(rest) + 1 == len(qwen2_expected())


def test_get_slice_reads_the_part_of_each_dtype(tmp_path):
    rng = np.random.default_rng(0)
    full = {
        "f32": rng.normal(size=(6, 5)).astype(np.float32),
        "bf16": rng.normal(size=(4, 6)).astype(ml_dtypes.bfloat16),
        "f8": rng.normal(size=(4, 3)).astype(ml_dtypes.float8_e4m3fn),
        "i64": np.arange(24, dtype=np.int64).reshape(2, 3, 4),
        "scalar": np.float32(2.5),
    }
    save_safetensors(full, tmp_path / "model.safetensors")
    ckpt = open_checkpoint(tmp_path)
    for key, want in full.items():
        got = ckpt.get(key)
        assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want), key
        index = tuple(slice(1, None, None) if n > 1 else slice(None) for n in np.shape(want))
        part = ckpt.get_slice(key, index)
        assert part.dtype == want.dtype and np.array_equal(part, np.asarray(want)[index]), key


def test_lazy_conversion_equals_eager_and_checks_shapes(tmp_path):
    """lazy=True (what jaxmm.load uses on a mesh) yields LazyTensors whose slices are the eager
    conversion's slices: transposed for "T" rules, cast, and mis-shaped tensors reported alike."""
    from jaxmm.checkpoint.hf import LazyTensor, iter_converted

    save_qwen2(tmp_path, torch.bfloat16)
    ckpt = open_checkpoint(tmp_path)
    eager = convert(ckpt, QWEN2_RULES, qwen2_expected())
    lazy = dict(iter_converted(ckpt, QWEN2_RULES, qwen2_expected(), lazy=True))
    assert lazy.keys() == eager.keys() and all(isinstance(v, LazyTensor) for v in lazy.values())
    for path, want in eager.items():
        t = lazy[path]
        assert t.shape == want.shape and t.dtype == np.float32
        index = tuple(slice(n // 2, n) for n in want.shape)
        np.testing.assert_array_equal(t[index], want[index])
        np.testing.assert_array_equal(t[()], want)
    bad = dict(qwen2_expected())
    bad[("layers", 0, "attn", "q", "kernel")] = SDS((HIDDEN + 1, HEADS * HEAD_DIM), np.float32)
    with pytest.raises(
        CheckpointError,
        match=r"mis-shaped tensor 'model.layers.0.self_attn.q_proj.weight'.*"
        r"expects \[17, 16\], got \[16, 16\]",
    ):
        dict(iter_converted(ckpt, QWEN2_RULES, bad, lazy=True))
