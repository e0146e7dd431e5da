"""Logical axis names -> mesh axes (MaxText-style rule table) and parameter shardings.

Every parameter carries logical axis names (``out_sharding`` metadata: ``embed``, ``mlp``,
``heads``, ``kv_heads``, ``vocab`` or None). A rule table maps each name to a mesh axis (or None =
replicated); names whose mesh axis is absent from the mesh are replicated.
"""

from __future__ import annotations

import flax.nnx as nnx
import jax
import numpy as np
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


# ----------------------------------------------------------------------------- activations and KV cache
def batch_axes(mesh: jax.sharding.Mesh):
    """The mesh axes the batch dimension is split over: ("data", "fsdp") where present and > 1."""
    axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names and mesh.shape[a] > 1)
    return axes or None


def _batch_spec(shape, dim: int, mesh, ndim: int) -> PartitionSpec:
    axes = batch_axes(mesh)
    n = 1 if axes is None else int(np.prod([mesh.shape[a] for a in axes]))
    spec = [None] * ndim
    if axes is not None and shape[dim] % n == 0:
        spec[dim] = axes
    return PartitionSpec(*spec)


def batch_shardings(batch, mesh: jax.sharding.Mesh):
    """NamedShardings for a model ``Batch`` (same pytree structure): every per-sample array is split
    over :func:`batch_axes` on its batch dimension (input_ids, attention_mask, layout fields [B,…];
    position_ids [3,B,S] on dim 1); the packed vision inputs (pixel_values [N,·], VisionInputs: patches
    of all images together, not per sample) are replicated, as are arrays whose batch size the
    mesh does not divide."""
    b = batch.input_ids.shape[0]
    rep = NamedSharding(mesh, PartitionSpec())

    def one(path, x):
        head = str(getattr(path[0], "name", getattr(path[0], "key", "")))
        if head in ("pixel_values", "vision") or not hasattr(x, "shape") or x.ndim == 0:
            return rep
        if head == "position_ids":
            return NamedSharding(mesh, _batch_spec(x.shape, 1, mesh, x.ndim))
        if x.shape[0] == b:
            return NamedSharding(mesh, _batch_spec(x.shape, 0, mesh, x.ndim))
        return rep

    return jax.tree_util.tree_map_with_path(one, batch)


def cache_shardings(cache, mesh: jax.sharding.Mesh, rules=DEFAULT_RULES):
    """NamedShardings for a ``KVCache``: k, v (and k_pre) [L,B,K,G,D] split over the batch axes on B
    and over the ``kv_heads`` mesh axis on G where they divide; ``index`` replicated."""
    kv = rules.get("kv_heads")

    def one(path, x):
        if not hasattr(x, "shape") or x.ndim != 5:
            return NamedSharding(mesh, PartitionSpec())
        spec = list(_batch_spec(x.shape, 1, mesh, 5))
        if kv in mesh.axis_names and mesh.shape[kv] > 1 and x.shape[3] % mesh.shape[kv] == 0:
            spec[3] = kv
        return NamedSharding(mesh, PartitionSpec(*spec))

    return jax.tree_util.tree_map_with_path(one, cache)


def shardings_of(tree):
    """The ``.sharding`` of every array of a placed pytree (e.g. parameters loaded with ``mesh=``)."""
    return jax.tree_util.tree_map(lambda x: x.sharding, tree)


def jit_forward(config, mesh: jax.sharding.Mesh, params, batch, interventions=(), probes=()):
    """``jax.jit`` of the forward with explicit shardings: parameters as placed, the batch by
    :func:`batch_shardings`; logits [B,S,V] out split over the batch axes on B (and ``vocab`` over
    its mesh axis where it divides). Returns ``f(params, batch) -> logits``."""
    from jaxmm.models.qwen2_5_vl.modeling import forward

    v = config.text.vocab_size
    spec = list(_batch_spec((batch.input_ids.shape[0], 0, v), 0, mesh, 3))
    va = DEFAULT_RULES.get("vocab")
    if va in mesh.axis_names and mesh.shape[va] > 1 and v % mesh.shape[va] == 0:
        spec[2] = va
    return jax.jit(lambda p, b: forward(p, config, b, interventions, probes).logits,
                   in_shardings=(shardings_of(params), batch_shardings(batch, mesh)),
                   out_shardings=NamedSharding(mesh, PartitionSpec(*spec)))


def jit_prefill(config, mesh: jax.sharding.Mesh, params, batch, max_len: int, interventions=()):
    """``jax.jit`` of :func:`jaxmm.generate.prefill` with explicit shardings: the KV cache comes out
    as :func:`cache_shardings` declares. ``batch`` is the prompt batch extended to ``max_len`` key
    positions (``generate.batch_with(prompt, extend_for_decoding(prompt, max_len))``). Returns
    ``f(params, batch) -> (last_logits [B,V], cache, next_pos [B])``."""
    from jaxmm.generate import prefill
    from jaxmm.models.qwen2_5_vl.modeling import KVCache

    dtype = jax.tree_util.tree_leaves(params)[0].dtype
    pre_rope = any(getattr(iv, "reads_pre_rope_keys", False) for iv in interventions)
    cache = jax.eval_shape(lambda: KVCache.empty(config, batch.input_ids.shape[0], max_len, dtype, pre_rope))
    bsh = NamedSharding(mesh, _batch_spec((batch.input_ids.shape[0],), 0, mesh, 1))
    logits_sh = NamedSharding(mesh, _batch_spec((batch.input_ids.shape[0], 1), 0, mesh, 2))
    return jax.jit(lambda p, b: prefill(p, config, b, max_len, interventions)[:3],
                   in_shardings=(shardings_of(params), batch_shardings(batch, mesh)),
                   out_shardings=(logits_sh, cache_shardings(cache, mesh), bsh))
