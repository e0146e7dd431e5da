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
        spec = PartitionSpec(*[a if a is None or shape[i] % mesh.shape[a] == 0 else None for i, a in enumerate(spec)])
        out[path] = NamedSharding(mesh, spec)
    return out


# ----------------------------------------------------------------------------- activations and KV cache
def batch_axes(mesh: jax.sharding.Mesh):
    """The mesh axes the batch dimension is split over: ("data", "fsdp") where present and > 1."""
    axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names and mesh.shape[a] > 1)
    return axes or None


def batch_spec(shape, dim: int, mesh, ndim: int) -> PartitionSpec:
    """A rank-``ndim`` PartitionSpec that splits dimension ``dim`` of an array of ``shape`` over the
    mesh's batch axes (:func:`batch_axes`) when it divides evenly, every other dimension replicated."""
    axes = batch_axes(mesh)
    n = 1 if axes is None else int(np.prod([mesh.shape[a] for a in axes]))
    spec = [None] * ndim
    if axes is not None and shape[dim] % n == 0:
        spec[dim] = axes
    return PartitionSpec(*spec)


def _rows_of(tree) -> int:
    """The batch size B of a ``Batch`` (``input_ids.shape[0]``), a dict with ``input_ids``, or else
    of the first array leaf (dim 0)."""
    ids = tree.get("input_ids") if isinstance(tree, dict) else getattr(tree, "input_ids", None)
    if ids is None:
        leaves = [x for x in jax.tree_util.tree_leaves(tree) if getattr(x, "ndim", 0) > 0]
        if not leaves:
            raise ValueError("no array with a batch dimension in the given pytree")
        ids = leaves[0]
    return int(ids.shape[0])


def batch_dim(path, x, b: int) -> int | None:
    """The batch dimension of one leaf of a batch pytree whose batch size is ``b``, or None for a
    leaf that is not per sample (by the field names on its path, at any depth): ``position_ids``
    [3,B,S] -> 1; the packed vision inputs
    (``pixel_values`` [N,·], ``vision``: patches of all images together) and scalars -> None; any
    other array whose dim 0 is B -> 0."""
    names = {str(getattr(k, "name", getattr(k, "key", ""))) for k in path}
    if names & {"pixel_values", "vision"} or not hasattr(x, "shape") or len(x.shape) == 0:
        return None
    if "position_ids" in names:
        return 1
    return 0 if x.shape[0] == b else None


def batch_shardings(batch, mesh: jax.sharding.Mesh):
    """NamedShardings for a model ``Batch`` (same pytree structure; also a dict of arrays such as
    ``{"input_ids": …, "labels": …}``): every per-sample array is split over :func:`batch_axes` on its
    batch dimension (input_ids, attention_mask, layout fields [B,…]; position_ids [3,B,S] on dim 1);
    the packed vision inputs (pixel_values [N,·], VisionInputs: patches of all images together, not
    per sample) are replicated, as are arrays whose batch size the mesh does not divide."""
    b = _rows_of(batch)
    rep = NamedSharding(mesh, PartitionSpec())

    def one(path, x):
        d = batch_dim(path, x, b)
        return rep if d is None else NamedSharding(mesh, batch_spec(x.shape, d, mesh, len(x.shape)))

    return jax.tree_util.tree_map_with_path(one, batch)


def config_mesh(axes) -> jax.sharding.Mesh | None:
    """The mesh of a config's ``mesh:`` section ({data, fsdp, tensor}, one axis may be -1: see
    :func:`jaxmm.config.mesh_axes`) over every device of every process, or None for none.

    Raises:
        ValueError: as :func:`~jaxmm.config.mesh_axes` (a bad axis, devices that the axes do
            not fill).
    """
    if not axes:
        return None
    from jaxmm.config import mesh_axes

    return make_mesh(**mesh_axes(axes, jax.device_count()))


def split_rows(x, mesh: jax.sharding.Mesh) -> jax.Array:
    """A host array [B, …] (the same global value on every process) placed on ``mesh`` with its
    rows split over :func:`batch_axes` (replicated where B does not divide), as
    :func:`batch_shardings` places a batch's per-sample arrays."""
    x = np.asarray(x)
    return jax.device_put(x, NamedSharding(mesh, batch_spec(x.shape, 0, mesh, x.ndim)))


def on_host(tree):
    """Every ``jax.Array`` of ``tree`` as numpy on this process; arrays split over other processes'
    devices (a mesh spanning hosts) are gathered first (``process_allgather``, a collective: every
    process must call it)."""
    from jax.experimental import multihost_utils

    def one(x):
        if isinstance(x, jax.Array):
            return np.asarray(multihost_utils.process_allgather(x, tiled=True) if not x.is_fully_addressable else x)
        return x

    return jax.tree_util.tree_map(one, tree)


def cache_shardings(cache, mesh: jax.sharding.Mesh, rules=DEFAULT_RULES):
    """NamedShardings for a ``KVCache``: k, v (and k_pre) [L,B,K,G,D] split over the batch axes on B
    and over the ``kv_heads`` mesh axis on G where they divide; ``index`` replicated."""
    kv = rules.get("kv_heads")

    def one(path, x):
        if not hasattr(x, "shape") or x.ndim != 5:
            return NamedSharding(mesh, PartitionSpec())
        spec = list(batch_spec(x.shape, 1, mesh, 5))
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
    from jaxmm.models.core.model import forward

    v = config.text.vocab_size
    spec = list(batch_spec((batch.input_ids.shape[0], 0, v), 0, mesh, 3))
    va = DEFAULT_RULES.get("vocab")
    if va in mesh.axis_names and mesh.shape[va] > 1 and v % mesh.shape[va] == 0:
        spec[2] = va
    return jax.jit(
        lambda p, b: forward(p, config, b, interventions, probes).logits,
        in_shardings=(shardings_of(params), batch_shardings(batch, mesh)),
        out_shardings=NamedSharding(mesh, PartitionSpec(*spec)),
    )


# ----------------------------------------------------------------------------- per-host data
def host_slice(global_batch_size: int, mesh: jax.sharding.Mesh | None = None) -> slice:
    """The rows ``[start, stop)`` of a global batch of ``global_batch_size`` rows that this process
    (``jax.process_index()`` of ``jax.process_count()``) supplies.

    Without a mesh: the even split, rows ``[r·n/P, (r+1)·n/P)``. With a mesh: exactly the rows the
    process's devices hold when the batch is split over :func:`batch_axes` (what
    :func:`global_batch` and ``jax.make_array_from_process_local_data`` expect); for
    :func:`make_mesh` over ``jax.devices()`` (devices in process order) the two agree, and a mesh
    that does not split the batch across processes gives every process all rows.

    Raises:
        ValueError: ``global_batch_size`` not divisible by the process count (no mesh) or by the
            number of batch shards (data × fsdp of the mesh), or a mesh whose devices give this
            process non-contiguous rows.
    """
    n = int(global_batch_size)
    r, p = jax.process_index(), jax.process_count()
    if mesh is None:
        if n % p:
            raise ValueError(
                f"global batch size {n} is not divisible by the {p} processes: each process "
                f"must supply the same number of rows (use a multiple of {p})"
            )
        k = n // p
        return slice(r * k, (r + 1) * k)
    axes = batch_axes(mesh)
    shards = 1 if axes is None else int(np.prod([mesh.shape[a] for a in axes]))
    if n % shards:
        raise ValueError(
            f"global batch size {n} is not divisible by the {shards} batch shards of the mesh "
            f"({' x '.join(f'{a}={mesh.shape[a]}' for a in axes)}); use a multiple of {shards}"
        )
    sharding = NamedSharding(mesh, PartitionSpec(axes))
    idx = sorted(
        {
            (s[0].start or 0, n if s[0].stop is None else s[0].stop)
            for s in sharding.addressable_devices_indices_map((n,)).values()
        }
    )
    if any(a[1] != b[0] for a, b in zip(idx, idx[1:])):
        raise ValueError(
            f"process {r}'s devices hold non-contiguous batch rows {idx} on this mesh; build the "
            "mesh with devices ordered by process (jaxmm.sharding.make_mesh over jax.devices())"
        )
    return slice(idx[0][0], idx[-1][1])


def local_rows(tree, mesh: jax.sharding.Mesh | None = None):
    """This process's share of a global batch built whole on every host (host-side numpy pytree:
    a ``Batch`` from ``model.prepare``, labels, …): every per-sample leaf (:func:`batch_dim`) cut to
    :func:`host_slice` rows; the packed vision inputs and other non-per-sample leaves kept whole (they
    are replicated, see :func:`batch_shardings`). Feed the result to :func:`global_batch`."""
    n = _rows_of(tree)
    rows = host_slice(n, mesh)

    def one(path, x):
        d = batch_dim(path, x, n)
        if d is None:
            return x
        return np.asarray(x)[(slice(None),) * d + (rows,)]

    return jax.tree_util.tree_map_with_path(one, tree)


def global_batch(local, mesh: jax.sharding.Mesh, global_batch_size: int, shardings=None):
    """Global ``jax.Array``\\ s from per-process pieces (``jax.make_array_from_process_local_data``).

    Args:
        local: a pytree of host numpy arrays (a ``Batch``, a dict with labels, …): per-sample leaves
            hold this process's :func:`host_slice` rows on their batch dimension (:func:`batch_dim`:
            B_local = global_batch_size / P rows), every other leaf (packed ``pixel_values``,
            ``vision``) holds the whole global value, identical on every process.
        mesh: the mesh the arrays go to.
        global_batch_size: n, the global B.
        shardings: a pytree of NamedShardings for the global arrays (default: :func:`batch_shardings`
            of the global shapes).

    Returns the pytree of global arrays ([n, …] per-sample leaves, split over :func:`batch_axes`).

    Raises:
        ValueError: a per-sample leaf whose batch dimension is not this process's row count, or (with
            several processes) replicated leaves that differ between processes, e.g. ``pixel_values``
            prepared from one host's images only (prepare the whole batch on every host and cut it
            with :func:`local_rows`).
    """
    n = int(global_batch_size)
    rows = host_slice(n, mesh)
    b_loc = rows.stop - rows.start
    local = jax.tree_util.tree_map(np.asarray, local)
    flat, treedef = jax.tree_util.tree_flatten_with_path(local)
    dims = [batch_dim(path, x, b_loc) for path, x in flat]
    if dims and all(d is None for d in dims):
        raise ValueError(f"no per-sample leaf with this process's {b_loc} rows (of {n}) in the given pytree")
    ids = local.get("input_ids") if isinstance(local, dict) else getattr(local, "input_ids", None)
    if ids is not None and ids.shape[0] != b_loc:
        raise ValueError(
            f"input_ids has {ids.shape[0]} rows, but process {jax.process_index()} supplies rows "
            f"{rows.start}:{rows.stop} of the global {n} ({b_loc} rows; see host_slice/local_rows)"
        )
    shapes = [x.shape if d is None else x.shape[:d] + (n,) + x.shape[d + 1 :] for (_, x), d in zip(flat, dims)]
    if shardings is None:
        rep = NamedSharding(mesh, PartitionSpec())
        sh = [rep if d is None else NamedSharding(mesh, batch_spec(g, d, mesh, len(g))) for g, d in zip(shapes, dims)]
    else:
        sh = treedef.flatten_up_to(shardings)
    if jax.process_count() > 1:
        import zlib

        from jax.experimental import multihost_utils

        rep = [x for (_, x), d in zip(flat, dims) if d is None]
        digest = np.array([zlib.crc32(np.ascontiguousarray(x).tobytes()) % 2**31 for x in rep] + [len(rep)], np.int32)
        multihost_utils.assert_equal(
            digest,
            "global_batch: the replicated leaves (pixel_values, vision inputs, …) "
            "differ between processes; every process must supply the whole global value",
        )
    out = [jax.make_array_from_process_local_data(s, x, g) for (_, x), s, g in zip(flat, sh, shapes)]
    return jax.tree_util.tree_unflatten(treedef, out)


def host_samples(n: int) -> range:
    """The samples of an n-sample evaluation this process runs: ``r, r+P, r+2P, …`` (interleaved, so
    any n works and the processes stay balanced; used by :func:`jaxmm.eval.harness.run`)."""
    return range(jax.process_index(), n, jax.process_count())


def is_writer() -> bool:
    """True on the one process that writes shared files (reports, metrics, checkpoints' metadata):
    process 0."""
    return jax.process_index() == 0
