"""``jaxmm plan``: per-device memory of a model on a mesh, from shapes alone (``jax.eval_shape``).

    jaxmm plan --model configs/models/qwen2_5_vl_72b.yaml --mesh data=1,fsdp=8,tensor=8 --seq 8192 --batch 8

Parameters are placed by their logical axis names through the rule table of
:mod:`jaxmm.sharding` (``fsdp`` shards ``embed``; ``tensor`` shards heads, kv heads, mlp and vocab;
a dimension the axis does not divide stays replicated).
Reported per device: parameters (compute dtype), AdamW state (float32 master copy + two moments,
sharded like the parameters), the KV cache for ``batch × seq`` (batch over data·fsdp, kv heads over
tensor), and the largest single-layer activation of the explicit attention path
(B·H·query_chunk·S float32, batch and heads sharded). No devices are used.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from jaxmm.sharding import DEFAULT_RULES

GiB = 2**30


def _load_config(path):
    """A model config YAML/JSON -> (family, config).

    Raises:
        jaxmm.config.ConfigError (a ValueError): invalid YAML (file and line), not a mapping, or an
            unknown ``model_type`` (the known ones listed).
    """
    from jaxmm.config import ConfigError, read_yaml
    from jaxmm.models.registry import FAMILIES

    try:  # JSON first (JSON is YAML, but PyYAML, YAML 1.1, reads JSON's 1e-06 as a string)
        d = json.loads(Path(path).read_text())
    except json.JSONDecodeError:
        d, _ = read_yaml(path)
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a mapping of config fields, got a {type(d).__name__}")
    kind = d.get("model_type", "qwen2_5_vl")
    if kind not in FAMILIES:
        raise ConfigError(f"{path}: model_type {kind!r} is not a known family; known: {sorted(FAMILIES)}")
    family = FAMILIES[kind]
    return family, family.Config.from_dict(d, source=str(path))


def plan(model_yaml, mesh: dict[str, int], seq: int = 4096, batch: int = 1, dtype_bytes: int = 2, query_chunk: int = 512) -> dict:
    """Bytes per device: {"params", "optimizer", "kv_cache", "attention_chunk", "total"} and counts."""
    import flax.nnx as nnx

    family, cfg = _load_config(model_yaml)
    axis_size = {"fsdp": mesh.get("fsdp", 1), "tensor": mesh.get("tensor", 1)}
    n_params, per_dev = 0, 0.0
    for _, var in nnx.to_flat_state(family.abstract_params(cfg, "float32")):
        shape = var.get_value().shape
        names = var.get_metadata().get("out_sharding") or ()
        shard, used = 1, set()
        for dim, name in zip(shape, names):
            axis = DEFAULT_RULES.get(name) if name else None
            if axis and axis not in used and dim % axis_size.get(axis, 1) == 0:
                shard *= axis_size.get(axis, 1)
                used.add(axis)
        n = int(np.prod(shape))
        n_params += n
        per_dev += n / shard
    t = cfg.text
    dp = mesh.get("data", 1) * mesh.get("fsdp", 1)
    b_local = math.ceil(batch / dp)
    g_shard = mesh.get("tensor", 1) if t.num_key_value_heads % mesh.get("tensor", 1) == 0 else 1
    kv = 2 * t.num_hidden_layers * b_local * seq * (t.num_key_value_heads / g_shard) * t.head_dim * dtype_bytes
    h_shard = mesh.get("tensor", 1) if t.num_attention_heads % mesh.get("tensor", 1) == 0 else 1
    chunk = b_local * (t.num_attention_heads / h_shard) * min(seq, query_chunk) * seq * 4
    out = {
        "parameters": n_params,
        "params": per_dev * dtype_bytes,
        "optimizer": per_dev * 12,
        "kv_cache": kv,
        "attention_chunk": chunk,
    }
    out["total"] = out["params"] + out["optimizer"] + out["kv_cache"] + out["attention_chunk"]
    return out


def parse_mesh(text: str) -> dict[str, int]:
    """ "data=2,fsdp=2,tensor=2" -> {"data": 2, "fsdp": 2, "tensor": 2} (missing axes are left out).

    Raises:
        ValueError: a part that is not AXIS=N, an unknown or repeated axis, or a size that is not a
            positive integer; the message names the part.
    """
    mesh = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        k, eq, v = part.partition("=")
        k, v = k.strip(), v.strip()
        if not eq:
            raise ValueError(f"--mesh {text!r}: {part!r} is not AXIS=N (expected data=N,fsdp=N,tensor=N)")
        if k not in ("data", "fsdp", "tensor"):
            raise ValueError(f"--mesh {text!r}: unknown axis {k!r}; the axes are data, fsdp, tensor")
        if k in mesh:
            raise ValueError(f"--mesh {text!r}: axis {k!r} given twice")
        if not v.isdigit() or int(v) < 1:
            raise ValueError(f"--mesh {text!r}: {k}={v!r}: expected a positive integer")
        mesh[k] = int(v)
    return mesh


def report(model_yaml, mesh, seq, batch) -> str:
    """:func:`plan`'s figures as the text ``jaxmm plan`` prints: parameter count, then GiB per
    device of parameters, AdamW state, KV cache, the explicit path's attention chunk and the
    training total, for ``batch`` sequences of ``seq`` tokens on ``mesh``."""
    r = plan(model_yaml, mesh, seq, batch)
    devices = int(np.prod(list(mesh.values()))) if mesh else 1
    rows = [
        f"model {model_yaml}: {r['parameters'] / 1e9:.2f} B parameters; mesh {mesh} ({devices} devices); "
        f"batch {batch} × {seq} tokens; bf16 compute",
        f"  parameters        {r['params'] / GiB:8.2f} GiB / device",
        f"  AdamW state (fp32 master + 2 moments) {r['optimizer'] / GiB:8.2f} GiB / device",
        f"  KV cache          {r['kv_cache'] / GiB:8.2f} GiB / device",
        f"  attention chunk   {r['attention_chunk'] / GiB:8.2f} GiB / device (explicit path, one layer)",
        f"  total (training)  {r['total'] / GiB:8.2f} GiB / device",
    ]
    return "\n".join(rows)
