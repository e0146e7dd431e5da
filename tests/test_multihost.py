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

# A wall-clock guard against a hung process (not a speed check): two jax processes compile the
# model on a 2-core machine that may be running other tests too; 300 s was exceeded under load.
WAIT_S = 1200


def free_port() -> int:
    """A free TCP port on localhost for jax.distributed's coordinator."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
    """A global mesh over both processes' devices: logits equal; per-host data (each process supplies
    its rows of the batch) through jit_forward and jit_generate equals one process."""
    import json

    from jaxmm.generate import generate

    tiny.save_hf_model("gqa_untied", tmp_path / "hf")
    batch = make_batch([["chelsea"], []], "left")
    np.savez(tmp_path / "batch.npz", **batch)
    one = jaxmm.load(tmp_path / "hf")
    want = np.asarray(one.forward(**batch).logits)
    batch4 = make_batch([["chelsea"], ["coffee"], [], ["chelsea"]], "left")
    np.savez(tmp_path / "batch4.npz", **batch4)
    want4 = np.asarray(one.forward(**batch4).logits)
    want_tokens = np.asarray(generate(one.params, one.config, one.prepare(**batch4), max_new_tokens=4, stop_tokens=[]).tokens)
    port = free_port()
    worker = Path(__file__).with_name("multihost_worker.py")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(i), str(port), str(tmp_path / "hf"), str(tmp_path / "logits.npy")], env=env
        )
        for i in range(2)
    ]
    assert [p.wait(timeout=WAIT_S) for p in procs] == [0, 0]
    got = np.load(tmp_path / "logits.npy")
    valid = batch["attention_mask"].astype(bool)
    assert got.shape == want.shape
    assert np.abs(got - want)[valid].max() < 1e-5
    # per-host data: process r supplied rows 2r, 2r+1 of batch4; the global results equal one process
    for pid in range(2):
        info = json.loads((tmp_path / f"perhost{pid}.json").read_text())
        assert info["rows"] == [2 * pid, 2 * pid + 2]
        assert info["local_input_ids"] == batch4["input_ids"][2 * pid : 2 * pid + 2].tolist()
        assert info["logits_spec"][:2] == [["data", "fsdp"], None]
        assert info["tokens_spec"] == [["data", "fsdp"], None]
        assert info["local_shards"] == 4
    logits4 = np.load(tmp_path / "logits4.npy")
    valid4 = batch4["attention_mask"].astype(bool)
    assert logits4.shape == want4.shape and np.abs(logits4 - want4)[valid4].max() < 1e-5
    np.testing.assert_array_equal(np.load(tmp_path / "tokens4.npy"), want_tokens)


def test_two_process_evaluation_splits_samples_and_only_process_0_writes(tmp_path):
    """Each process evaluates every other sample; process 0 alone renders the figures (process 1's
    heatmaps from the maps in its rows), merges the rows and writes the report: the merged rows and
    figures equal a single-process run's. A single-process rerun resumes from the rank files. With a
    mesh over both processes (one sharded model) the rows and figures are again the same."""
    import json

    from jaxmm import organism
    from jaxmm.eval.harness import EvalConfig, run

    model = organism.build(tmp_path / "organism")
    cfg = dict(
        model=str(model),
        methods=["baseline", "pai"],
        batch_size=2,
        max_new_tokens=4,
        heatmaps=2,
        benchmarks=[{"name": "grounded", "limit": 5, "seed": 1, "image_size": 112}],
    )
    single = run(EvalConfig(out=str(tmp_path / "one"), **cfg), progress=False)
    port = free_port()
    worker = Path(__file__).with_name("multihost_eval_worker.py")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [
        subprocess.Popen([sys.executable, str(worker), str(i), str(port), str(model), str(tmp_path / "two")], env=env)
        for i in range(2)
    ]
    assert [p.wait(timeout=WAIT_S) for p in procs] == [0, 0]
    two = tmp_path / "two"
    rows = lambda d: {(r["id"], r["method"]): r for r in map(json.loads, (d / "results.jsonl").read_text().splitlines())}
    a, b = rows(single), rows(two)
    assert list(a) == list(b) and len(a) == 10  # same rows in the same order
    floats = {"vas", "visual_entropy", "region_ratio", "visual_entropy_per_layer"}
    for k in a:  # the same row, key by key (other batches: float metrics to 1e-4)
        assert list(a[k]) == list(b[k]), k
        for f in set(a[k]) - floats - {"seconds"}:
            assert a[k][f] == b[k][f], (k, f)
        for f in floats & set(a[k]):
            np.testing.assert_allclose(np.asarray(a[k][f], float), np.asarray(b[k][f], float), rtol=1e-4)
    # the split: rank 0 ran samples 0, 2, 4 and rank 1 samples 1, 3; rank 1 sent its heatmaps as data
    lines = lambda f: [json.loads(l) for l in f.read_text().splitlines()]
    ids = lambda f: {r["id"].rsplit("-", 1)[1] for r in lines(f)}
    assert ids(two / "results.rank0.jsonl") == {"0", "2", "4"} and ids(two / "results.rank1.jsonl") == {"1", "3"}
    assert sum("heatmap_data" in r for r in lines(two / "results.rank1.jsonl")) == 2  # sample 1 x 2 methods
    assert (two / "report.md").exists()
    figs = lambda d: sorted(p.name for p in (d / "figures").iterdir())
    assert figs(two) == figs(single) and any("grounded-1-1_" in f for f in figs(two))

    # resume on ONE process from the rank files alone: nothing runs again, the same merged rows
    merged = (two / "results.jsonl").read_text()
    (two / "results.jsonl").unlink()
    run(EvalConfig(out=str(two), **cfg), progress=False)
    assert (two / "results.jsonl").read_text() == merged

    # one model sharded over both processes' devices (fsdp=2 x tensor=2): every process runs every
    # sample, process 0 alone writes; the rows and figures are the single-process run's
    port = free_port()
    mesh = tmp_path / "mesh"
    procs = [
        subprocess.Popen([sys.executable, str(worker), str(i), str(port), str(model), str(mesh), "fsdp=2,tensor=2"], env=env)
        for i in range(2)
    ]
    assert [p.wait(timeout=WAIT_S) for p in procs] == [0, 0]
    c = rows(mesh)
    assert list(c) == list(a)
    for k in a:
        assert list(a[k]) == list(c[k]), k
        for f in set(a[k]) - floats - {"seconds"}:
            assert a[k][f] == c[k][f], (k, f)
        for f in floats & set(a[k]):
            np.testing.assert_allclose(np.asarray(a[k][f], float), np.asarray(c[k][f], float), rtol=1e-4)
    assert not list(mesh.glob("results.rank*.jsonl")) and (mesh / "report.md").exists()
    assert figs(mesh) == figs(single)


def test_two_process_sft_on_a_global_mesh_equals_one_process(tmp_path):
    """Three SFT steps on a (data=2, fsdp=2) mesh spanning two processes (2 devices each) give the
    parameters of a single-device run (1e-5); only process 0 wrote the metrics."""
    from jaxmm import organism
    from jaxmm.train.sft import TrainConfig, final_params, flat_params, train

    model = organism.build(tmp_path / "organism")
    kw = dict(
        model=str(model),
        steps=3,
        batch_size=4,
        lr=3e-3,
        save_every=3,
        log_every=1,
        keep=1,
        seq_len=160,
        tensorboard=False,
        data={"name": "grounded", "size": 16, "seed": 1, "image_size": 112},
    )
    want, _ = final_params(train(TrainConfig(out=str(tmp_path / "one"), **kw), progress=False))
    want = flat_params(want)
    port = free_port()
    worker = Path(__file__).with_name("multihost_train_worker.py")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [
        subprocess.Popen([sys.executable, str(worker), str(i), str(port), str(model), str(tmp_path / "two")], env=env)
        for i in range(2)
    ]
    assert [p.wait(timeout=WAIT_S) for p in procs] == [0, 0]
    got = np.load(tmp_path / "two" / "final.npz")
    assert set(got.files) == set(want)
    assert max(float(np.abs(got[k] - want[k]).max()) for k in want) < 1e-5
    start = flat_params(jaxmm.load(model).params)
    assert max(float(np.abs(got[k] - start[k]).max()) for k in want) > 1e-4
    rows = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 3  # one writer: process 0


def test_two_process_grpo_on_a_global_mesh_equals_one_process(tmp_path):
    """Two GRPO steps (sampled rollouts, scoring, the update) on a (data=2, fsdp=2) mesh spanning two
    processes give the rewards and parameters of a single-device run (1e-5); only process 0 wrote
    the metrics."""
    import json

    from jaxmm import organism
    from jaxmm.train.grpo import GRPOConfig, train
    from jaxmm.train.sft import final_state, flat_params

    model = organism.build(tmp_path / "organism")
    kw = dict(
        model=str(model),
        steps=2,
        prompts_per_step=2,
        group_size=2,
        max_new_tokens=6,
        lr=1e-3,
        save_every=2,
        keep=1,
        tensorboard=False,
        rewards={"r_att": 1.0, "accuracy": 1.0},
        data={"name": "grounded", "size": 4, "seed": 3, "image_size": 112, "tasks": ["grounding"]},
    )
    one = train(GRPOConfig(out=str(tmp_path / "one"), **kw), progress=False)
    want = flat_params(final_state(one)[0]["params"])
    port = free_port()
    worker = Path(__file__).with_name("multihost_grpo_worker.py")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [
        subprocess.Popen([sys.executable, str(worker), str(i), str(port), json.dumps(kw), str(tmp_path / "two")], env=env)
        for i in range(2)
    ]
    assert [p.wait(timeout=WAIT_S) for p in procs] == [0, 0]
    got = np.load(tmp_path / "two" / "final.npz")
    assert set(got.files) == set(want)
    assert max(float(np.abs(got[k] - want[k]).max()) for k in want) < 1e-5
    start = flat_params(jaxmm.load(model).params)
    assert max(float(np.abs(got[k] - start[k]).max()) for k in want) > 1e-5  # the steps changed the weights
    rows = lambda d: [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
    a, b = rows(one), rows(tmp_path / "two")
    assert len(b) == 2  # one writer: process 0
    for ra, rb in zip(a, b):
        for k in ("reward/r_att", "reward/accuracy", "reward/total", "length", "kl", "loss"):
            np.testing.assert_allclose(rb[k], ra[k], rtol=1e-4, atol=1e-6, err_msg=k)
