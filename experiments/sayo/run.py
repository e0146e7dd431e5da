"""SAYO on the organism: GRPO with the region attention reward r_att (top-30 % entropy tokens, last
layer) plus accuracy, from the shipped organism; accuracy, VAS and region ratio before and after on
held-out grounded samples, and the reward curves.

    python experiments/sayo/run.py [--run runs/exp-sayo] [--steps 60] [--eval 250]

Uses ``configs/train/grpo_sayo.yaml`` (resumable). Writes ``experiments/sayo/results.md`` and
``experiments/sayo/reward_curve.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/exp-sayo")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--eval", type=int, default=250)
    args = ap.parse_args(argv)

    import numpy as np

    import jaxmm
    from heldout import evaluate, table
    from jaxmm import organism
    from jaxmm.train.grpo import GRPOConfig, train
    from jaxmm.train.sft import export_hf, final_params

    run = Path(args.run)
    cfg = GRPOConfig.from_yaml(ROOT / "configs/train/grpo_sayo.yaml", [f"out={run / 'grpo'}", f"steps={args.steps}"])
    out = train(cfg, progress=True)
    params, step = final_params(out)
    tuned = export_hf(params, jaxmm.load(organism.default()).config, organism.default(), run / "sayo-hf")
    res = {"organism": evaluate(str(organism.default()), ["baseline"], run / "heldout-organism", args.eval)["baseline"],
           "sayo": evaluate(str(tuned), ["baseline"], run / "heldout-sayo", args.eval)["baseline"]}
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    from jaxmm.eval.report import _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    steps = [r["step"] for r in rows]
    smooth = lambda x: np.convolve(x, np.ones(5) / 5, mode="valid")
    for k in ("reward/r_att", "reward/accuracy"):
        v = np.array([r[k] for r in rows])
        ax.plot(steps, v, alpha=0.3)
        ax.plot(steps[4:], smooth(v), label=k.split("/")[1] + " (5-step mean)")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("mean reward of the rollouts")
    ax.legend()
    fig.tight_layout()
    fig.savefig(HERE / "reward_curve.png", dpi=100)
    first = lambda k: np.mean([r[k] for r in rows[:10]])
    last = lambda k: np.mean([r[k] for r in rows[-10:]])
    names = {"organism": "organism (start)", "sayo": f"+ GRPO {step} steps (r_att + accuracy)"}
    lines = ["# SAYO's attention reward on the organism", "",
             f"GRPO from the shipped organism, {step} steps × {cfg.prompts_per_step} prompts × G = {cfg.group_size} "
             f"completions (temperature {cfg.temperature}, top-p {cfg.top_p}, lr {cfg.lr}, β_KL {cfg.kl_beta}, "
             "full fine-tuning), reward r_att (top-30 % entropy tokens, last layer, region = evidence box) + "
             f"accuracy, grounded samples of seed 3; evaluated greedy on {args.eval} held-out samples of seed 1. "
             f"Command: `python experiments/sayo/run.py --steps {args.steps}`.", "",
             *table(res, names), "",
             f"Rollout means, first 10 steps → last 10: r_att {first('reward/r_att'):+.3f} → {last('reward/r_att'):+.3f}, "
             f"accuracy {first('reward/accuracy'):.3f} → {last('reward/accuracy'):.3f}, "
             f"KL {first('kl'):.4f} → {last('kl'):.4f}.", "",
             "![reward curve](reward_curve.png)", ""]
    (HERE / "results.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
