"""Benchmark: decode throughput of jaxmm.generate against transformers' generate, same weights/inputs.

    python experiments/bench/decode.py [--size small|medium] [--new 64] [--batch 2]

Decode time per token is measured as (t(N new tokens) − t(1 new token)) / (N − 1) for both, so the
prefill (vision tower included) cancels out; both run greedy with no early stop. Needs the test
extra (torch). Figures go to docs/performance.md.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from forward import SIZES, build, inputs  # noqa: E402


def best_of(fn, repeats):
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="small", choices=sorted(SIZES))
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    import jax
    import torch

    import jaxmm
    from jaxmm.generate import generate

    with tempfile.TemporaryDirectory() as d:
        hf, cfg = build(args.size, Path(d))
        model = jaxmm.load(d)
    one = inputs(cfg, image_hw=(224, 224), text_len=32)
    b = args.batch
    raw = {
        "input_ids": np.repeat(one["input_ids"], b, 0),
        "attention_mask": np.repeat(one["attention_mask"], b, 0),
        "pixel_values": np.concatenate([one["pixel_values"]] * b),
        "image_grid_thw": np.repeat(one["image_grid_thw"], b, 0),
    }
    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), jax {jax.__version__} on {jax.devices()[0].platform}"
    )
    print(f"size={args.size} batch={b} prompt={raw['input_ids'].shape[1]} tokens, new={args.new}")
    t = {k: torch.from_numpy(v) for k, v in raw.items()}
    mm = torch.from_numpy((raw["input_ids"] == cfg.image_token_id).astype(np.int64))
    hf.config._attn_implementation = "sdpa"

    def hf_gen(n):
        with torch.no_grad():
            return hf.generate(**t, mm_token_type_ids=mm, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    batch = model.prepare(**raw)
    max_len = 64 * -(-(raw["input_ids"].shape[1] + args.new) // 64)  # one cache size for both runs

    def jx_gen(n):
        return jax.block_until_ready(
            generate(model.params, model.config, batch, max_new_tokens=n, stop_tokens=[], max_len=max_len).tokens
        )

    h1, hn = best_of(lambda: hf_gen(1), args.repeats), best_of(lambda: hf_gen(args.new), args.repeats)
    j1, jn = best_of(lambda: jx_gen(1), args.repeats), best_of(lambda: jx_gen(args.new), args.repeats)
    same = (np.asarray(jx_gen(args.new)) == hf_gen(args.new)[:, raw["input_ids"].shape[1] :].numpy()).mean()
    hf_tps = b * (args.new - 1) / (hn - h1)
    jx_tps = b * (args.new - 1) / (jn - j1)
    print(f"transformers generate: {hn * 1e3:8.1f} ms total, decode {hf_tps:8.1f} tok/s")
    print(f"jaxmm generate:        {jn * 1e3:8.1f} ms total, decode {jx_tps:8.1f} tok/s")
    print(f"decode speed-up {jx_tps / hf_tps:.2f}x; end-to-end {hn / jn:.2f}x; greedy tokens agreeing: {same:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
