"""One process of the two-process test (tests/test_multihost.py): 4 fake CPU devices each, one
global 2x4 mesh through jax.distributed on localhost; writes its view of the logits."""

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
jax.distributed.shutdown()
