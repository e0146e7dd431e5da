"""One process of the two-process evaluation test (tests/test_multihost.py): jax.distributed on
localhost, then ``jaxmm eval``'s harness on a shared output directory."""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

pid, port, model, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)

from jaxmm.eval.harness import EvalConfig, run  # noqa: E402

assert jax.process_count() == 2
run(EvalConfig(model=model, out=out, methods=["baseline", "pai"], batch_size=2, max_new_tokens=4, heatmaps=2,
               benchmarks=[{"name": "grounded", "limit": 5, "seed": 1, "image_size": 112}]), progress=False)
jax.distributed.shutdown()
