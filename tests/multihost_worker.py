"""One process of the two-process test (tests/test_multihost.py): 4 fake CPU devices each, one
global 2x4 mesh through jax.distributed on localhost; writes its view of the logits. Then per-host
data: each process supplies its rows of a 4-row batch on a (2, 2, 2) mesh (local_rows,
global_batch) for jit_forward and jit_generate."""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

pid, port, ckpt, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)

import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

import jaxmm  # noqa: E402

assert jax.device_count() == 8 and jax.local_device_count() == 4
mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("fsdp", "tensor"))
model = jaxmm.load(ckpt, mesh=mesh)
data = np.load(os.path.join(os.path.dirname(out), "batch.npz"))
logits = model.forward(**{k: data[k] for k in data.files}).logits
full = multihost_utils.process_allgather(logits, tiled=True)
if pid == 0:
    np.save(out, np.asarray(full))

# Per-host data on a (data=2, fsdp=2, tensor=2) mesh: every process prepares the whole 4-row batch,
# keeps its rows (local_rows) and the global arrays are assembled from the two pieces (global_batch).
import json  # noqa: E402

from jaxmm.generate import extend_for_decoding  # noqa: E402
from jaxmm.generate import jit_generate  # noqa: E402
from jaxmm.sharding import global_batch, host_slice, jit_forward, local_rows, make_mesh  # noqa: E402

mesh = make_mesh(2, 2, 2)
model = jaxmm.load(ckpt, mesh=mesh)
data = np.load(os.path.join(os.path.dirname(out), "batch4.npz"))
whole = model.prepare(**{k: data[k] for k in data.files})
mine = local_rows(whole, mesh)
batch = global_batch(mine, mesh, 4)
logits = jit_forward(model.config, mesh, model.params, batch)(model.params, batch)
gen = jit_generate(model.config, mesh, model.params, whole, 4, stop_tokens=[])
full_ext = global_batch(local_rows(extend_for_decoding(whole, gen.max_len), mesh), mesh, 4)
tokens = gen(model.params, batch, full_ext, jax.random.PRNGKey(0)).tokens
rows = host_slice(4, mesh)
spec = lambda x: [list(a) if isinstance(a, tuple) else a for a in x.sharding.spec]
info = {
    "rows": [rows.start, rows.stop],
    "local_input_ids": np.asarray(mine.input_ids).tolist(),
    "logits_spec": spec(logits),
    "tokens_spec": spec(tokens),
    "local_shards": len(batch.input_ids.addressable_shards),
}
with open(os.path.join(os.path.dirname(out), f"perhost{pid}.json"), "w") as f:
    json.dump(info, f)
logits, tokens = (multihost_utils.process_allgather(x, tiled=True) for x in (logits, tokens))
if pid == 0:
    np.save(os.path.join(os.path.dirname(out), "logits4.npy"), np.asarray(logits))
    np.save(os.path.join(os.path.dirname(out), "tokens4.npy"), np.asarray(tokens))
jax.distributed.shutdown()
