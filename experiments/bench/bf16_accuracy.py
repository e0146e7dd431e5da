"""bfloat16 accuracy: jaxmm bf16 and transformers bf16 (eager and sdpa) against transformers float32.

    python experiments/bench/bf16_accuracy.py                 # the three tiny models of the test
    python experiments/bench/bf16_accuracy.py --seeds 0 1 2   # ratio spread over random models

Uses the models, batches and error measures of ``tests/test_bf16_parity.py`` (a batch of 2 with a
real photo per row, left padded; errors at real positions). The first form prints a markdown table
for docs/performance.md ("bfloat16 accuracy"); ``--seeds`` prints, per random model, the ratios of
jaxmm's and of transformers-sdpa's errors to transformers-eager's (the spread behind the test's
factors). Needs the test extra (torch).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))


def table(figs) -> str:
    rows = [
        "| model | params | prompt | max \\|logit\\| | jaxmm bf16 vs fp32 | transformers bf16 eager vs fp32 "
        "| transformers bf16 sdpa vs fp32 | jaxmm bf16 vs transformers bf16 (eager) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for f in figs:
        cell = lambda k: f"{f[k]['max']:.3f} / {f[k]['mean']:.4f}"
        rows.append(
            f"| {f['family']} | {f['params'] / 1e3:.0f} k | 2 × {f['seq']} ({f['tokens']} real) | {f['scale']:.2f} "
            f"| {cell('jaxmm')} | {cell('hf_eager')} | {cell('hf_sdpa')} | {cell('jaxmm_vs_hf')} |"
        )
    return "\n".join(rows)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="*", help="random models per family/config instead of the test's")
    args = p.parse_args()

    import jax
    import torch

    import test_bf16_parity as T
    import tiny

    torch.set_num_threads(2)
    print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}")
    if args.seeds is None:
        figs = [T.measure(fam, tempfile.mkdtemp(), attns=("eager", "sdpa")) for fam in sorted(T.BUILDERS)]
        for f in figs:
            print(T.report(f))
        print("\nmax / mean abs error of the logits at real positions:\n")
        print(table(figs))
        return
    cases = [
        ("qwen2_5_vl", "gqa_untied", lambda s: tiny.build_hf_model("gqa_untied", seed=s)),
        ("qwen2_5_vl", "mha_tied", lambda s: tiny.build_hf_model("mha_tied", seed=s)),
        ("qwen2_vl", "", lambda s: tiny.build_hf_qwen2_vl(seed=s)),
        ("qwen3_vl", "", lambda s: tiny.build_hf_qwen3_vl(seed=s)),
    ]
    print("ratio of errors to transformers-eager's (mean / p99.9 / max), logits; last hidden state (mean / max)")
    for fam, cfg, build in cases:
        for s in args.seeds:
            f = T.measure(fam, tempfile.mkdtemp(), build(s), T.make_batch(fam, seed=s), attns=("eager", "sdpa"))
            r = lambda a, b: " / ".join(f"{f[a][k] / f[b][k]:.3f}" for k in ("mean", "p999", "max"))
            h = " / ".join(f"{f['jaxmm_hidden'][k] / f['hf_eager_hidden'][k]:.3f}" for k in ("mean", "max"))
            print(
                f"{fam} {cfg} seed {s}: jaxmm {r('jaxmm', 'hf_eager')}  sdpa {r('hf_sdpa', 'hf_eager')}  hidden jaxmm {h}",
                flush=True,
            )


if __name__ == "__main__":
    main()
