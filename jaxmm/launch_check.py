"""Multi-host smoke test: ``python -m jaxmm.launch_check CKPT FSDP TENSOR`` on every host.

Initialises ``jax.distributed`` (arguments from the environment: TPU metadata, SLURM variables or
JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID), builds a (data, fsdp, tensor) mesh over
all devices, restores the checkpoint onto it and runs a one-token forward.
"""

from __future__ import annotations

import sys

import jax
import numpy as np


def main(argv=None) -> int:
    """``argv`` = ``[CKPT, FSDP, TENSOR]`` (default ``sys.argv[1:]``): initialises
    ``jax.distributed``, builds the mesh (data = devices / (FSDP × TENSOR)), restores ``CKPT`` on it
    in bfloat16, runs a one-token forward and prints this process's share; returns 0.

    Raises:
        ValueError: FSDP or TENSOR not an integer, or not dividing the device count.
    """
    ckpt, fsdp, tensor = (argv or sys.argv[1:])[:3]
    jax.distributed.initialize()
    import jaxmm
    from jaxmm.sharding import make_mesh

    n = jax.device_count()
    fsdp, tensor = int(fsdp), int(tensor)
    mesh = make_mesh(n // (fsdp * tensor), fsdp, tensor)
    model = jaxmm.load(ckpt, dtype="bfloat16", mesh=mesh)
    local = sum(s.data.nbytes for leaf in jax.tree_util.tree_leaves(model.params) for s in leaf.addressable_shards)
    out = model.forward(input_ids=np.array([[1]]), attention_mask=np.array([[1]]))
    print(
        f"process {jax.process_index()}/{jax.process_count()}: {jax.local_device_count()} local of {n} devices, "
        f"{local / 2**30:.2f} GiB of parameters here, logits {out.logits.shape}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
