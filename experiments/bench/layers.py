"""Benchmark: the text decoder's layers as one ``lax.scan`` against a Python-unrolled loop.

    python experiments/bench/layers.py [--size deep] [--new 32] [--repeats 3]

For each mode of :func:`jaxmm.models.core.model.layer_loop` (``"unrolled"``, ``"scan"``), in one
run on the same weights and inputs: compile time (``lower`` + ``compile``) of the jitted forward
and of the whole ``generate`` program, prefill latency, decode rate ((t(N new) − t(1 new)) / (N − 1),
greedy, no early stop), and the largest difference of logits and tokens between the modes. The
``deep`` size is ``small``'s widths at Qwen2.5-VL-7B's depth (28 text layers, 32 vision blocks).
Figures go to docs/performance.md.
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
from forward import SIZES, build, inputs, timeit  # noqa: E402


STATIC = (1, 4, 5, 12, 13, 15)  # run_generation's static arguments, by position


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="deep", choices=sorted(SIZES))
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    import jax

    import jaxmm
    from jaxmm.generate import Sampling, decode_side, extend_for_decoding, plan_shapes, prefill_batch, run_generation
    from jaxmm.models.core.model import forward, layer_loop

    with tempfile.TemporaryDirectory() as d:
        _, cfg = build(args.size, Path(d))
        model = jaxmm.load(d)
    raw = inputs(cfg, image_hw=(224, 224), text_len=32)
    batch = model.prepare(**raw)
    print(f"machine: {platform.processor() or platform.machine()}, jax {jax.__version__} on {jax.devices()[0].platform}")
    print(
        f"size={args.size}: {cfg.text_config.num_hidden_layers} text layers, {cfg.vision_config.depth} vision blocks; "
        f"prompt {raw['input_ids'].shape[1]} tokens; decode {args.new} new"
    )
    s, rows, max_len = plan_shapes(batch, args.new, None)
    full = extend_for_decoding(batch, max_len)
    pre = prefill_batch(batch, full, rows, model.config)
    dec = decode_side(full)
    stop, pad = jax.numpy.asarray([-1], jax.numpy.int32), jax.numpy.int32(0)
    key = jax.random.PRNGKey(0)

    def gen_args(n):
        return (
            model.params,
            model.config,
            pre,
            dec,
            max_len,
            n,
            Sampling(),
            key,
            stop,
            pad,
            (),
            (),
            True,
            False,
            None,
            None,
            jax.numpy.int32(s),
        )

    results = {}
    for mode in ("unrolled", "scan"):
        with layer_loop(mode):
            fwd = jax.jit(lambda p, b: forward(p, model.config, b).logits)
            t0 = time.perf_counter()
            fwd_c = fwd.lower(model.params, batch).compile()
            c_fwd = time.perf_counter() - t0
            t0 = time.perf_counter()
            gen_n = run_generation.lower(*gen_args(args.new)).compile()
            c_gen = time.perf_counter() - t0
            gen_1 = run_generation.lower(*gen_args(1)).compile()
            dyn = lambda n: [a for i, a in enumerate(gen_args(n)) if i not in STATIC]  # a compiled call takes these
            t_fwd = timeit(lambda: fwd_c(model.params, batch).block_until_ready(), args.repeats)
            t1 = timeit(lambda: jax.block_until_ready(gen_1(*dyn(1))), args.repeats)
            tn = timeit(lambda: jax.block_until_ready(gen_n(*dyn(args.new))), args.repeats)
            out = gen_n(*dyn(args.new))
            results[mode] = dict(
                compile_forward=c_fwd,
                compile_generate=c_gen,
                prefill=t_fwd,
                decode=pre.input_ids.shape[0] * (args.new - 1) / (tn - t1),
                logits=np.asarray(fwd_c(model.params, batch)),
                tokens=np.asarray(out.tokens),
            )
        r = results[mode]
        print(
            f"{mode:9s} compile forward {r['compile_forward']:6.1f} s | compile generate {r['compile_generate']:6.1f} s | "
            f"prefill {r['prefill'] * 1e3:7.1f} ms | decode {r['decode']:7.1f} tok/s"
        )
    a, b = results["unrolled"], results["scan"]
    print(
        f"scan vs unrolled: max |Δlogits| {np.abs(a['logits'] - b['logits']).max():.1e}, "
        f"tokens equal {bool((a['tokens'] == b['tokens']).all())}; compile speed-up forward "
        f"{a['compile_forward'] / b['compile_forward']:.1f}x, generate {a['compile_generate'] / b['compile_generate']:.1f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
