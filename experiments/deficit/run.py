"""A second organism with the deficit the training-free methods address, and the methods on both.

    python experiments/deficit/run.py [--run runs/exp-deficit] [--steps 600] [--eval 150] [--rave-steps 100]

1. **The deficit organism**: the shipped organism fine-tuned (``configs/train/organism.yaml``, every
   task, seed 0) for ``--steps`` steps in a distracting style (:data:`DISTRACT`: the photo at full
   contrast, smaller shapes), exported as a Hugging Face checkpoint to ``RUN/deficit-hf``.
2. **Held-out evaluation** (seed 1, the distracting style) of both organisms: baseline, the
   training-free methods (``vrga``, ``ration``, ``pai``, ``var``, ``avar`` at their configs'
   defaults; VAR's sink dimensions and τ calibrated per organism, see :func:`var_calibration`) and
   RAVE (``configs/train/rave.yaml``, backbone frozen, ``--rave-steps`` steps on seed 2 in the same
   style, one module per organism). Both organisms' baselines in the organism's own style too.
3. ``experiments/deficit/results.md`` (tables) and ``experiments/deficit/methods.png``.

Resumable: the trainers resume from ``RUN``'s checkpoints, the evaluations skip the rows written.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))

DISTRACT = {"image_size": 112, "shape_scale": 0.25, "contrast": 1.0}  # the deficit organism's style
METHODS = ["vrga", "ration", "pai", "avar"]  # at their defaults; VAR (calibrated) and RAVE added per organism


def style_overrides(style: dict) -> list[str]:
    """TrainConfig overrides that put the grounded generator in ``style``."""
    return [f"data.{k}={v}" for k, v in style.items()]


def make_deficit(run: Path, steps: int, style: dict) -> tuple[Path, Path]:
    """Fine-tunes the shipped organism in ``style`` (resumes) and exports it: ``(train_out, hf_dir)``."""
    import jaxmm
    from jaxmm import organism
    from jaxmm.train.sft import TrainConfig, export_hf, final_params, train

    cfg = TrainConfig.from_yaml(
        ROOT / "configs/train/organism.yaml",
        [
            "model=organism",
            f"out={run / 'train'}",
            f"steps={steps}",
            f"save_every={max(50, steps // 4)}",
            *style_overrides(style),
        ],
    )
    out = train(cfg, progress=True)
    params, step = final_params(out)
    assert step == steps, f"trainer ended at step {step}, expected {steps}"
    model = jaxmm.load(organism.default())
    return out, export_hf(params, model.config, organism.default(), run / "deficit-hf")


def train_rave(model_dir: Path, out: Path, steps: int, style: dict) -> tuple[Path, list]:
    """RAVE as experiments/rave/run.py trains it (``configs/train/rave.yaml``, backbone frozen), on
    ``model_dir`` in ``style``: ``(module_dir, metrics)``."""
    import jaxmm
    from jaxmm.interventions import rave
    from jaxmm.train.sft import TrainConfig, final_rave, train

    cfg = TrainConfig.from_yaml(
        ROOT / "configs/train/rave.yaml",
        [f"model={model_dir}", f"out={out}", f"steps={steps}", f"save_every={max(25, steps // 2)}", *style_overrides(style)],
    )
    done = train(cfg, progress=True)
    module = rave.save(final_rave(done, jaxmm.load(model_dir).config), out / "module")
    metrics = [json.loads(l) for l in (done / "metrics.jsonl").read_text().splitlines()]
    return module, metrics


def var_calibration(model_dir: Path, style: dict, n: int = 25, start: int = 2, target: float = 0.1) -> dict:
    """VAR's model-specific knobs for a model without published sink dimensions: ``dims`` the two
    hidden dimensions with the largest RMS-normalised activation on image tokens (layer inputs from
    layer ``start`` on, ``n`` samples of seed 2), ``tau`` the threshold of the grid below whose sink
    share of image tokens (measured with VAR's own :class:`SinkTokens` probe) is closest to
    ``target``. Returns ``{dims, tau, share, peak}``."""
    import numpy as np

    import jaxmm
    from heldout import TASKS
    from jaxmm.data.grounded import make_sample
    from jaxmm.interventions.var import SinkTokens

    model = jaxmm.load(model_dir)
    size = (style["image_size"],) * 2
    samples = [make_sample(i, 2, size, TASKS[i % len(TASKS)], style["shape_scale"], style["contrast"]) for i in range(n)]
    chats = [
        [{"role": "user", "content": [{"type": "image", "image": s["image"]}, {"type": "text", "text": s["question"]}]}]
        for s in samples
    ]
    batch, _ = model.prepare_chat(chats)
    out = model.forward(batch=batch, output_hidden_states=True)
    image = np.asarray(batch.layout.image_mask)  # [B,S]
    peaks = []
    for h in out.hidden_states[start:-1]:  # inputs of layers start … L-1
        h = np.asarray(h, np.float64)
        h = h / np.sqrt((h * h).mean(-1, keepdims=True) + 1e-6)
        peaks.append(np.abs(h[image]).max(0))  # [E]
    peak = np.max(peaks, 0)
    dims = tuple(int(d) for d in np.argsort(-peak)[:2])
    layers = tuple(range(start, model.config.text.num_hidden_layers))
    best = None
    for tau in (1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 15.0, 20.0, 30.0):
        probe = SinkTokens(dims=dims, tau=tau, layers=layers)
        s = np.asarray(model.forward(batch=batch, probes=(probe,)).probes["var_sinks"]["text"].values)  # [L',B,S]
        share = float(s[:, image].mean())
        if best is None or abs(share - target) < abs(best[1] - target):
            best = (tau, share)
    return {"dims": list(dims), "tau": best[0], "share": best[1], "peak": [float(peak[d]) for d in dims]}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/exp-deficit")
    ap.add_argument("--steps", type=int, default=600, help="fine-tuning steps of the deficit organism")
    ap.add_argument("--eval", type=int, default=150, help="held-out samples per method (cycling the 5 tasks)")
    ap.add_argument("--rave-steps", type=int, default=100)
    ap.add_argument("--results", default=str(HERE), help="where results.md and methods.png go")
    args = ap.parse_args(argv)

    import numpy as np

    from heldout import STYLE, evaluate, table
    from jaxmm import organism
    from jaxmm.eval.report import _plt, method_name

    t0 = time.time()
    run = Path(args.run)
    train_out, deficit = make_deficit(run, args.steps, DISTRACT)
    t_train = time.time() - t0
    train_metrics = [json.loads(l) for l in (train_out / "metrics.jsonl").read_text().splitlines()]
    print(f"deficit organism ({args.steps} steps, {t_train:.0f} s) -> {deficit}", flush=True)

    organisms = {"organism": Path(organism.default()), "deficit": deficit}
    results, home, calib, rave_metrics, names = {}, {}, {}, {}, {}
    for key, mdir in organisms.items():
        tag = f"{key}-{args.steps}" if key == "deficit" else key
        calib[key] = var_calibration(mdir, DISTRACT)
        print(key, "VAR calibration", calib[key], flush=True)
        var_spec = {"method": "var", "dims": calib[key]["dims"], "tau": calib[key]["tau"]}
        module, rave_metrics[key] = train_rave(mdir, run / f"rave-{tag}", args.rave_steps, DISTRACT)
        rave_spec = {"method": "rave", "path": str(module)}
        methods = ["baseline", *METHODS, var_spec, rave_spec]
        names[key] = {method_name(var_spec): "var", method_name(rave_spec): "rave"}
        res = evaluate(str(mdir), methods, run / f"heldout-{tag}", n=args.eval, style=DISTRACT)
        results[key] = {names[key].get(method_name(m), method_name(m)): res[method_name(m)] for m in methods}
        home[key] = evaluate(str(mdir), ["baseline"], run / f"home-{tag}", n=args.eval, style=STYLE)["baseline"]
        print(key, json.dumps(results[key], indent=1), flush=True)
    wall = time.time() - t0

    # ---------------------------------------------------------------- figure
    plt = _plt()
    order = list(results["organism"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    x = np.arange(len(order))
    for i, (key, label) in enumerate((("organism", "organism (shipped)"), ("deficit", "deficit organism"))):
        axes[0].bar(x + (i - 0.5) * 0.4, [100 * results[key][m]["all"] for m in order], 0.4, label=label)
        axes[1].bar(x + (i - 0.5) * 0.4, [results[key][m]["region_ratio"] for m in order], 0.4, label=label)
    for ax, lab in zip(axes, ("held-out accuracy, all tasks (%)", "region ratio ā_R / ā_V")):
        ax.set_xticks(x, order, rotation=30)
        ax.set_ylabel(lab)
    axes[1].axhline(1.0, color="grey", lw=0.8, ls=":")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"distracting style: shapes {DISTRACT['shape_scale']} of the width, photo at contrast {DISTRACT['contrast']}")
    fig.tight_layout()
    fig.savefig(Path(args.results) / "methods.png", dpi=100)

    # ---------------------------------------------------------------- results.md
    cmd = (
        f"python experiments/deficit/run.py --run {args.run} --steps {args.steps} --eval {args.eval} "
        f"--rave-steps {args.rave_steps}"
    )
    lines = [
        "# A second organism with a visual-attention deficit, and the methods on both",
        "",
        f"Command: `{cmd}` (one CPU core, `taskset -c 1`; {wall / 60:.1f} min in all, of which "
        f"{t_train / 60:.1f} min the fine-tuning on this invocation — 0 when it resumed a finished run).",
        "",
        f"* **organism**: the shipped organism (`jaxmm/assets/organism/`, trained in the style shapes "
        f"{STYLE['shape_scale']} of the width, photo at contrast {STYLE['contrast']}).",
        f"* **deficit organism**: the shipped organism fine-tuned {args.steps} steps × 16 samples "
        "(`configs/train/organism.yaml`: every task, lr 0.002, warm-up 5 %, cosine; seed 0) in the distracting "
        f"style: shapes {DISTRACT['shape_scale']} of the width, photo at full contrast {DISTRACT['contrast']}, "
        f"{DISTRACT['image_size']}×{DISTRACT['image_size']}. Training loss first logged "
        f"{train_metrics[0]['loss']:.3f} (step {train_metrics[0]['step']}), last {train_metrics[-1]['loss']:.3f} "
        f"(step {train_metrics[-1]['step']}).",
        f"* **evaluation**: greedy, {args.eval} held-out grounded samples of seed 1 per method (the five tasks "
        "in turn) in the distracting style. Methods at the defaults of `configs/methods/` "
        "(vrga, ration, pai, avar); VAR with sink dimensions and τ calibrated per organism (no published "
        "values for this model; `var_calibration`: the two dimensions with the largest RMS-normalised "
        "activation on image tokens, τ from a grid giving the sink share closest to 10 % of image tokens, "
        "on 25 samples of seed 2); RAVE trained per organism as in experiments/rave "
        f"(`configs/train/rave.yaml`, backbone frozen, {args.rave_steps} steps × 16 on seed 2, in the "
        "distracting style).",
        "",
        "VAR calibration:",
        "",
        "| model | dims | peak |x| on them | τ | sink share of image tokens |",
        "|---|---|---|---|---|",
        *[
            f"| {k} | {c['dims']} | {', '.join(f'{p:.2f}' for p in c['peak'])} | {c['tau']} | {100 * c['share']:.1f} % |"
            for k, c in calib.items()
        ],
        "",
        "RAVE training (SFT loss on answer tokens, backbone frozen):",
        "",
        "| model | first logged | last |",
        "|---|---|---|",
        *[f"| {k} | {m[0]['loss']:.3f} | {m[-1]['loss']:.3f} (step {m[-1]['step']}) |" for k, m in rave_metrics.items()],
        "",
        "Baselines in the organism's own style (shapes 0.35, contrast 0.5), for reference:",
        "",
        *table({k: v for k, v in home.items()}, {"organism": "organism", "deficit": "deficit organism"}),
        "",
        "## Held-out, distracting style",
        "",
    ]
    for key, label in (("organism", "organism (shipped)"), ("deficit", "deficit organism")):
        lines += [f"### {label}", "", *table(results[key]), ""]
    lines += [
        "### Change against each model's baseline (accuracy in points, region ratio)",
        "",
        "| method | organism Δacc | organism Δregion ratio | deficit Δacc | deficit Δregion ratio |",
        "|---|---|---|---|---|",
    ]
    for m in order[1:]:
        cells = []
        for key in ("organism", "deficit"):
            r, b = results[key][m], results[key]["baseline"]
            cells += [f"{100 * (r['all'] - b['all']):+.1f}", f"{r['region_ratio'] - b['region_ratio']:+.3f}"]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "![methods](methods.png)", ""]
    out_md = Path(args.results) / "results.md"
    reading = ""
    if out_md.exists() and "## Reading" in out_md.read_text():
        reading = out_md.read_text()[out_md.read_text().index("## Reading") :]
    out_md.write_text("\n".join(lines) + reading)
    (run / "summary.json").write_text(json.dumps({"results": results, "home": home, "calib": calib}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
