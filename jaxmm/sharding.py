"""Logical axis names -> mesh axes (MaxText-style rule table) and parameter shardings.

Every parameter carries logical axis names (``out_sharding`` metadata: ``embed``, ``mlp``,
``heads``, ``kv_heads``, ``vocab`` or None). A rule table maps each name to a mesh axis (or None =
replicated); names whose mesh axis is absent from the mesh are replicated.
"""

from __future__ import annotations

import flax.nnx as nnx
import jax
from jax.sharding import NamedSharding, PartitionSpec

# Tensor parallelism over "tensor", FSDP-style sharding of the embedding dim over "fsdp"; the batch
# goes over ("data", "fsdp").
DEFAULT_RULES: dict[str, str | None] = {
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "vocab": "tensor",
}


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, devices=None) -> jax.sharding.Mesh:
    """A ("data", "fsdp", "tensor") mesh over ``devices`` (default: all, across hosts)."""
    import numpy as np

    devices = jax.devices() if devices is None else devices
    n = data * fsdp * tensor
    if n != len(devices):
        raise ValueError(f"mesh data={data} x fsdp={fsdp} x tensor={tensor} = {n} devices, but {len(devices)} are given")
    return jax.sharding.Mesh(np.array(devices).reshape(data, fsdp, tensor), ("data", "fsdp", "tensor"))


def logical_to_spec(names, mesh: jax.sharding.Mesh, rules=DEFAULT_RULES) -> PartitionSpec:
    """``("embed", "mlp")`` -> ``PartitionSpec("fsdp", "tensor")`` on a mesh with those axes."""
    axes = []
    for n in names or ():
        a = rules.get(n) if n is not None else None
        ok = a in mesh.axis_names and mesh.shape[a] > 1 and a not in axes  # a mesh axis shards one dim
        axes.append(a if ok else None)
    return PartitionSpec(*axes)


def param_shardings(abstract: nnx.State, mesh: jax.sharding.Mesh, rules=DEFAULT_RULES) -> dict:
    """``{path: NamedSharding}`` for every parameter of an abstract state (``abstract_params``).

    A dimension that the mesh axis does not divide is replicated instead of failing.
    """
    out = {}
    for path, var in nnx.to_flat_state(abstract):
        names = var.get_metadata().get("out_sharding")
        spec = logical_to_spec(names, mesh, rules)
        shape = var.get_value().shape
        spec = PartitionSpec(*[a if a is None or shape[i] % mesh.shape[a] == 0 else None
                               for i, a in enumerate(spec)])
        out[path] = NamedSharding(mesh, spec)
    return out
