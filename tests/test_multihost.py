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
