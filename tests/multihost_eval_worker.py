"""One process of the two-process evaluation test (tests/test_multihost.py): jax.distributed on
localhost, then ``jaxmm eval``'s harness on a shared output directory. On process 1 writing a
report or rendering a figure raises (only process 0 may). An optional fifth argument, a mesh such as
``fsdp=2,tensor=2``, runs one model sharded over both processes' devices."""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

pid, port, model, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
mesh = {k: int(v) for k, v in (kv.split("=") for kv in sys.argv[5].split(","))} if len(sys.argv) > 5 else None
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)

import jaxmm.eval.report as report  # noqa: E402
from jaxmm.eval.harness import EvalConfig, run  # noqa: E402

assert jax.process_count() == 2
if pid != 0:  # only process 0 renders figures and writes the report: anywhere else this fails the run

    def forbidden(*a, **k):
        raise AssertionError(f"process {pid} tried to write a report or a figure")

    report.write_report = report.render_heatmap = forbidden
run(
    EvalConfig(
        model=model,
        out=out,
        mesh=mesh,
        methods=["baseline", "pai"],
        batch_size=2,
        max_new_tokens=4,
        heatmaps=2,
        benchmarks=[{"name": "grounded", "limit": 5, "seed": 1, "image_size": 112}],
    ),
    progress=False,
)
jax.distributed.shutdown()
