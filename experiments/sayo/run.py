"""SAYO on the organism: GRPO with the region attention reward r_att (top-30 % entropy tokens, last
layer, region = the evidence box), with and without accuracy, from the shipped organism; accuracy,
VAS and region ratio before and after on held-out grounded samples, the reward curves, and a
diagnostic of how much signal r_att carries inside a group at the start.

    python experiments/sayo/run.py [--run runs/exp-sayo] [--eval 250]

Every recipe is ``configs/train/grpo_sayo.yaml`` plus the overrides in ``RECIPES`` (resumable: a
finished run is only re-evaluated). Writes ``experiments/sayo/results.md`` (keeping a hand-written
``## Reading`` section if one is there) and ``experiments/sayo/reward_curve.png``.

SAYO's format reward needs ``<answer>…</answer>`` tags the organism never writes (it answers in a
few words), so it would be 0 for every completion and carry no signal; the recipes use ``r_att``
alone (SAYO's only informative reward here) or ``r_att + accuracy``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))

# name -> (label, overrides of configs/train/grpo_sayo.yaml)
RECIPES = {
    "grpo": ("r_att + acc, lr 3e-4, β 0.001", ["steps=60"]),
    "grpo-ratt-only": ("r_att only, lr 3e-4, β 0.001", ["steps=150", "rewards={r_att: 1.0}"]),
    "grpo-lr1e-4-kl01": ("r_att + acc, lr 1e-4, β 0.01", ["steps=800", "lr=0.0001", "kl_beta=0.01", "save_every=100"]),
}


def group_signal(cfg, n_steps: int = 12, offset: int = 1000) -> dict:
    """At the start policy: how often a group's completions differ in r_att, and how r_att relates
    to correctness inside groups (rollouts on ``n_steps`` × prompts_per_step training prompts)."""
    import numpy as np

    import jaxmm
    from jaxmm import organism
    from jaxmm.train.grpo import make_score_fn, rollout
    from jaxmm.train.sft import dataset, initial_state

    model = jaxmm.load(organism.default(), dtype="float32")
    state = initial_state(cfg, model.params, model.config)
    ds, score_fn, g, p = dataset(cfg), make_score_fn(model.config, cfg), cfg.group_size, cfg.prompts_per_step
    acc, ratt, tasks = [], [], []
    for step in range(n_steps):
        samples = [ds[offset + step * p + i] for i in range(p)]
        rewards = rollout(model, cfg, state, model.params, samples, step, score_fn)[5]
        acc.append(rewards["accuracy"].reshape(p, g))
        ratt.append(rewards["r_att"].reshape(p, g))
        tasks += [s["task"] for s in samples]
    acc, ratt, tasks = np.concatenate(acc), np.concatenate(ratt), np.array(tasks)
    mixed = acc.std(1) > 0
    da, dr = (acc - acc.mean(1, keepdims=True))[mixed], (ratt - ratt.mean(1, keepdims=True))[mixed]
    per_task = {
        t: {
            "acc": float(acc[tasks == t].mean()),
            "r_att": float(ratt[tasks == t].mean()),
            "std_in_group": float(ratt[tasks == t].std(1).mean()),
            "groups": int((tasks == t).sum()),
        }
        for t in sorted(set(tasks))
    }
    return {
        "groups": len(acc),
        "spread": int((ratt.std(1) > 0.01).sum()),
        "mixed_acc": int(mixed.sum()),
        "corr": float(np.corrcoef(da.ravel(), dr.ravel())[0, 1]),
        "std_between_groups": float(ratt.mean(1).std()),
        "std_in_group": float(ratt.std(1).mean()),
        "per_task": per_task,
    }


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/exp-sayo")
    ap.add_argument("--eval", type=int, default=250)
    args = ap.parse_args(argv)

    import numpy as np

    import jaxmm
    from heldout import evaluate, table
    from jaxmm import organism
    from jaxmm.train.grpo import GRPOConfig, train
    from jaxmm.train.sft import export_hf, final_params

    run = Path(args.run)
    base = jaxmm.load(organism.default()).config
    res = {"organism": evaluate(str(organism.default()), ["baseline"], run / "heldout-organism", args.eval)["baseline"]}
    names, rows, cfgs = {"organism": "organism (start)"}, {}, {}
    for name, (label, overrides) in RECIPES.items():
        cfg = GRPOConfig.from_yaml(ROOT / "configs/train/grpo_sayo.yaml", [f"out={run / name}", "tensorboard=false", *overrides])
        out = train(cfg, progress=True)
        params, step = final_params(out)
        hf = export_hf(params, base, organism.default(), run / f"{name}-hf")
        res[name] = evaluate(str(hf), ["baseline"], run / f"heldout-{name}", args.eval)["baseline"]
        names[name] = f"+ GRPO {step} steps: {label}"
        rows[name] = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
        cfgs[name] = cfg
    diag = group_signal(cfgs["grpo"])

    from jaxmm.eval.report import _plt

    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    win = 20
    smooth = lambda x: np.convolve(x, np.ones(win) / win, mode="valid")
    for name, rs in rows.items():
        steps = np.array([r["step"] for r in rs])
        for ax, key in zip(axes, ("reward/r_att", "reward/accuracy", "kl")):
            v = np.array([r[key] for r in rs])
            ax.plot(steps[win - 1 :], smooth(v), label=RECIPES[name][0])
    for ax, title in zip(axes, ("r_att of the rollouts", "accuracy of the rollouts", "KL to the start (k3)")):
        ax.set_title(f"{title}, {win}-step mean", fontsize=9)
        ax.set_xlabel("GRPO step")
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(HERE / "reward_curve.png", dpi=100)

    def span(rs, key, k=20):
        return f"{np.mean([r[key] for r in rs[:k]]):+.3f} → {np.mean([r[key] for r in rs[-k:]]):+.3f}"

    c0 = cfgs["grpo"]
    lines = [
        "# SAYO's attention reward on the organism",
        "",
        f"GRPO from the shipped organism, {c0.prompts_per_step} prompts × G = {c0.group_size} completions per "
        f"step (temperature {c0.temperature}, top-p {c0.top_p}, full fine-tuning, max {c0.max_new_tokens} new "
        "tokens), r_att on the top-30 % entropy tokens of each completion (last layer, region = the evidence "
        "box), grounded training samples of seed 3 (all five tasks); evaluated greedy on "
        f"{args.eval} held-out samples of seed 1 (`experiments/heldout.py`: VAS and region ratio are means over "
        "generated tokens, all layers and heads). SAYO's format reward is left out: the organism never writes "
        "`<answer>` tags, so it is 0 for every completion. Command: `python experiments/sayo/run.py`.",
        "",
        *table(res, names),
        "",
        "Rollout means (sampled at temperature 1, so below greedy accuracy), first 20 steps → last 20:",
        "",
        "| recipe | steps | r_att | accuracy | region ratio | KL | entropy |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, rs in rows.items():
        rr = span(rs, "region_ratio") if "region_ratio" in rs[0] else "(not logged)"
        lines.append(
            f"| {RECIPES[name][0]} | {len(rs)} | {span(rs, 'reward/r_att')} | {span(rs, 'reward/accuracy')} "
            f"| {rr} | {span(rs, 'kl')} | {span(rs, 'entropy')} |"
        )
    lines += [
        "",
        "![reward curves](reward_curve.png)",
        "",
        f"How much signal r_att carries inside a group, at the start policy ({diag['groups']} groups of "
        f"G = {c0.group_size}, training prompts): {diag['spread']} groups have completions whose r_att differs "
        f"(std > 0.01); the mean within-group std of r_att is {diag['std_in_group']:.3f} against "
        f"{diag['std_between_groups']:.3f} between groups; in the {diag['mixed_acc']} groups with both right "
        f"and wrong answers, the within-group correlation of r_att with correctness is {diag['corr']:+.2f}.",
        "",
        "| task | groups | sampled accuracy | r_att | within-group std of r_att |",
        "|---|---|---|---|---|",
    ]
    for t, d in diag["per_task"].items():
        lines.append(f"| {t} | {d['groups']} | {d['acc']:.2f} | {d['r_att']:+.3f} | {d['std_in_group']:.3f} |")
    old = (HERE / "results.md").read_text() if (HERE / "results.md").exists() else ""
    reading = old[old.index("## Reading") :] if "## Reading" in old else ""
    (HERE / "results.md").write_text("\n".join(lines) + "\n\n" + reading)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
