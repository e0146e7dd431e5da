"""One process of the two-process GRPO test (tests/test_multihost.py): 2 fake CPU devices each, a
global (data=2, fsdp=2) mesh through jax.distributed on localhost; process 0 saves the final params."""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

pid, port, kw, out = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)

import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from jaxmm.train.grpo import GRPOConfig, train  # noqa: E402
from jaxmm.train.sft import flat_params  # noqa: E402

train(GRPOConfig(out=out, mesh={"data": 2, "fsdp": 2, "tensor": 1}, **kw), progress=False)
mngr = ocp.CheckpointManager(os.path.join(out, "checkpoints"))
restored = mngr.restore(
    mngr.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore())
)
params = jax.tree_util.tree_map(lambda x: multihost_utils.process_allgather(x, tiled=True), restored.state["params"])
if pid == 0:
    np.savez(os.path.join(out, "final.npz"), **flat_params(params))
jax.distributed.shutdown()
