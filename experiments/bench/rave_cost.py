"""Benchmark: the inference cost of a RAVE module (methods.md RAVE: "almost no" overhead claimed).

    python experiments/bench/rave_cost.py [--size small|medium] [--repeats 5] [--new-tokens 32]

Builds a random-weight Qwen2.5-VL of the given size (as experiments/bench/forward.py), then times in
one run: the jitted prefill, and greedy generation of ``--new-tokens`` tokens, without RAVE, with a
bilinear rank-8 RAVE on every layer and head, and with one on 2 layers × 2 heads (RAVE's "selected
GQA heads"), gates opened (γ = 0.5) so no branch is skipped. Reports milliseconds and the ratios.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path


sys.path.insert(0, str(Path(__file__).parent))
from forward import build, inputs, timeit  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="small", choices=("small", "medium"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp

    import jaxmm
    from jaxmm.generate import generate
    from jaxmm.interventions import rave
    from jaxmm.models import qwen2_5_vl

    with tempfile.TemporaryDirectory() as d:
        _, cfg = build(args.size, Path(d))
        model = jaxmm.load(d)
    batch = model.prepare(**inputs(cfg))
    t = model.config.text
    open_gate = lambda rv: type(rv)(**{**rv.__dict__, "gamma": jnp.full(rv.gamma.shape, 0.5, jnp.float32)})
    variants = {
        "none": (),
        "all layers, all heads": (open_gate(rave.init(model.config, rank=8)),),
        "2 layers x 2 heads": (
            open_gate(rave.init(model.config, rank=8, layers=[t.num_hidden_layers // 2, t.num_hidden_layers - 1], heads=[0, 1])),
        ),
    }
    gen = lambda p, b, ivs: generate(p, model.config, b, max_new_tokens=args.new_tokens, interventions=ivs).tokens
    print(
        f"size={args.size} sequence={batch.input_ids.shape[1]} tokens, jax {jax.__version__} on "
        f"{jax.devices()[0].platform}, {args.new_tokens} new tokens"
    )
    base = {}
    for name, ivs in variants.items():
        pre = timeit(
            lambda: qwen2_5_vl.forward_jit(model.params, model.config, batch, ivs).logits.block_until_ready(), args.repeats
        )
        dec = timeit(lambda: gen(model.params, batch, ivs).block_until_ready(), max(2, args.repeats // 2))
        base.setdefault("pre", pre)
        base.setdefault("dec", dec)
        print(
            f"{name:24s} prefill {pre * 1e3:8.1f} ms ({pre / base['pre']:.2f}x)   "
            f"generate {dec * 1e3:8.1f} ms ({dec / base['dec']:.2f}x)"
        )


if __name__ == "__main__":
    main()
