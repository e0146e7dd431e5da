"""Two processes through jax.distributed on localhost compute the single-process logits."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

import jaxmm
import tiny
from test_qwen2_5_vl_parity import make_batch


def test_two_processes_equal_one(tmp_path):
    tiny.save_hf_model("gqa_untied", tmp_path / "hf")
    batch = make_batch([["chelsea"], []], "left")
    np.savez(tmp_path / "batch.npz", **batch)
    want = np.asarray(jaxmm.load(tmp_path / "hf").forward(**batch).logits)
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    worker = Path(__file__).with_name("multihost_worker.py")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    procs = [subprocess.Popen([sys.executable, str(worker), str(i), str(port), str(tmp_path / "hf"),
                               str(tmp_path / "logits.npy")], env=env) for i in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    got = np.load(tmp_path / "logits.npy")
    valid = batch["attention_mask"].astype(bool)
    assert got.shape == want.shape
    assert np.abs(got - want)[valid].max() < 1e-5


def test_two_process_evaluation_splits_samples_and_only_process_0_writes(tmp_path):
    """Each process evaluates every other sample; process 0 merges the rows and writes the report:
    the merged rows equal a single-process run's."""
    import json

    from jaxmm import organism
    from jaxmm.eval.harness import EvalConfig, run

    model = organism.build(tmp_path / "organism")
    cfg = dict(model=str(model), methods=["baseline", "pai"], batch_size=2, max_new_tokens=4, heatmaps=2,
               benchmarks=[{"name": "grounded", "limit": 5, "seed": 1, "image_size": 112}])
    single = run(EvalConfig(out=str(tmp_path / "one"), **cfg), progress=False)
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    worker = Path(__file__).with_name("multihost_eval_worker.py")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, str(worker), str(i), str(port), str(model), str(tmp_path / "two")],
                              env=env) for i in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    two = tmp_path / "two"
    rows = lambda d: {(r["id"], r["method"]): r for r in map(json.loads, (d / "results.jsonl").read_text().splitlines())}
    a, b = rows(single), rows(two)
    assert set(a) == set(b) and len(a) == 10
    for k in a:
        assert a[k]["prediction"] == b[k]["prediction"], k
        np.testing.assert_allclose(a[k]["vas"], b[k]["vas"], rtol=1e-4)
    # the split: rank 0 ran samples 0, 2, 4 and rank 1 samples 1, 3; only rank 0 wrote the report
    ids = lambda f: {json.loads(l)["id"].rsplit("-", 1)[1] for l in f.read_text().splitlines()}
    assert ids(two / "results.rank0.jsonl") == {"0", "2", "4"} and ids(two / "results.rank1.jsonl") == {"1", "3"}
    assert (two / "report.md").exists()
    figs = sorted(p.name for p in (two / "figures").glob("heatmap_*"))
    assert figs and all("grounded-1-0_" in f for f in figs)     # heatmaps of process 0's samples only
