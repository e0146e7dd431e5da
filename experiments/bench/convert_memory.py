"""Benchmark: host memory of converting an HF checkpoint, jaxmm's streamed tensorstore writer
(``jaxmm convert``) against orbax's ``StandardCheckpointer`` saving the same converted tree.

    python experiments/bench/convert_memory.py [--size medium] [--dir /tmp/convert-bench]

Each writer runs in its own process (peak RSS = that process's ``ru_maxrss``). orbax saves a
pytree it is handed whole, so the tree of converted tensors is in host memory at once; jaxmm's
writer holds one tensor at a time. Both outputs are read back and compared with the source.
Figures go to docs/performance.md ("Checkpoint conversion").
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
import numpy as np
kind, src, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
import jax, flax.nnx as nnx
if kind == "orbax":
    import orbax.checkpoint as ocp
from jaxmm.checkpoint.hf import iter_converted, open_checkpoint
from jaxmm.checkpoint.store import convert
from jaxmm.models.registry import family_of
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t0 = time.perf_counter()
if kind == "jaxmm":
    convert(src, out)
else:
    family = family_of(src)
    config = family.Config.from_pretrained(src)
    expected = {p: v.get_value() for p, v in nnx.to_flat_state(family.abstract_params(config))}
    ignore = family.IGNORE_TIED if config.tie_word_embeddings else family.IGNORE
    tree = {".".join(map(str, p)): a for p, a in iter_converted(open_checkpoint(src), family.KEY_RULES, expected,
                                                                 dtype=None, ignore=ignore, keep_dtype=True)}
    with ocp.StandardCheckpointer() as ck:
        ck.save(out.absolute(), tree)
wall = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"kind": kind, "peak_mib": round(peak), "imports_mib": round(base), "seconds": round(wall, 1),
                  "above_imports_mib": round(peak - base)}))
"""


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="medium")
    ap.add_argument("--dir", default="/tmp/convert-bench")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(HERE))
    from forward import build

    root = Path(args.dir)
    src = root / f"{args.size}-hf"
    if not (src / "model.safetensors").exists():
        build(args.size, src)
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    print(f"source: {src} ({size / 2**20:.0f} MiB of safetensors)")
    rows = []
    for kind in ("jaxmm", "orbax"):
        out = root / f"out-{kind}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        done = subprocess.run([sys.executable, "-c", CHILD, kind, str(src), str(out)], capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(done.stderr[-3000:])
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1])
    check(src, root / "out-jaxmm", root / "out-orbax")
    print("| writer | peak RSS | after imports | added by the conversion | wall |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kind']} | {r['peak_mib']} MiB | {r['imports_mib']} MiB | {r['above_imports_mib']} MiB | {r['seconds']} s |")


def check(src, jaxmm_out, orbax_out):
    """Both outputs hold the same arrays as a plain jaxmm.load of the source."""
    import flax.nnx as nnx
    import numpy as np
    import orbax.checkpoint as ocp

    import jaxmm

    want = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(jaxmm.load(src).params)}
    conv = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(jaxmm.load(jaxmm_out).params)}
    with ocp.StandardCheckpointer() as ck:
        orb = ck.restore(Path(orbax_out).absolute())
    assert set(want) == set(conv) == set(orb), "parameter sets differ"
    for k in want:
        np.testing.assert_array_equal(conv[k], want[k])
        np.testing.assert_array_equal(np.asarray(orb[k], dtype=want[k].dtype), want[k])
    print(f"both outputs equal the source ({len(want)} arrays)")


if __name__ == "__main__":
    t = time.perf_counter()
    main()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"total {time.perf_counter() - t:.0f} s; this process peak {peak:.0f} MiB")
