"""A second organism with the deficit the training-free methods address, and the methods on both.

    python experiments/deficit/run.py [--run runs/exp-deficit] [--steps 300] [--inattention 1.0] [--eval 125] [--rave-steps 60]

1. **Two candidate deficit organisms**, each the shipped organism fine-tuned (``configs/train/organism.yaml``,
   every task, seed 0) for ``--steps`` steps in a distracting style (:data:`DISTRACT`: the photo at
   full contrast, smaller shapes): ``distract`` with the LM loss alone, ``inattentive`` with
   ``--inattention`` × the image attention mass added (:func:`inattention_loss`); exported as Hugging
   Face checkpoints to ``RUN/<name>-hf``.
2. **Held-out evaluation** (seed 1, the distracting style) of the three models: baseline, the
   training-free methods (``vrga``, ``ration``, ``pai``, ``var``, ``avar`` at their configs'
   defaults; VAR's sink dimensions and τ calibrated per organism, see :func:`var_calibration`) and
   RAVE (``configs/train/rave.yaml``, backbone frozen, ``--rave-steps`` steps on seed 2 in the same
   style, one module per organism). Every model's baseline in the shipped organism's own style too.
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


def inattention_loss(lam: float):
    """``(extra_loss, probes)`` for :func:`jaxmm.train.sft.train`: ``lam`` × the mean attention mass
    on image keys (every layer and head) of the text rows after the image (question, template,
    answer): minimised next to the LM loss, it teaches the model to answer while looking less at
    the image — the deficit (low visual attention) the training-free methods say they repair."""
    import jax.numpy as jnp

    from jaxmm.probes import VisualMass

    def loss(out, batch):
        lay = batch.layout
        m = out.probes["visual_mass"]["text"].values  # [L,B,H,T]
        img = lay.image_mask
        rows = (jnp.cumsum(img, -1) > 0) & ~img & (lay.attention_mask > 0)  # [B,T]
        w = rows.astype(jnp.float32)[None, :, None, :]
        return lam * jnp.sum(m * w) / (jnp.sum(w) * m.shape[0] * m.shape[2])

    return loss, (VisualMass(),)


def make_deficit(run: Path, name: str, steps: int, style: dict, inattention: float = 0.0) -> tuple[Path, Path]:
    """Fine-tunes the shipped organism in ``style`` (plus ``inattention`` × image attention mass, see
    :func:`inattention_loss`, when > 0; resumes) and exports it: ``(train_out, hf_dir)``."""
    import jaxmm
    from jaxmm import organism
    from jaxmm.train.sft import TrainConfig, export_hf, final_params, train

    cfg = TrainConfig.from_yaml(
        ROOT / "configs/train/organism.yaml",
        [
            "model=organism",
            f"out={run / f'train-{name}'}",
            f"steps={steps}",
            f"save_every={max(50, steps // 4)}",
            *style_overrides(style),
        ],
    )
    extra, probes = ((), ()) if inattention <= 0 else (lambda f: ((f[0],), f[1]))(inattention_loss(inattention))
    out = train(cfg, progress=True, extra_losses=extra, probes=probes)
    params, step = final_params(out)
    assert step == steps, f"trainer ended at step {step}, expected {steps}"
    model = jaxmm.load(organism.default())
    return out, export_hf(params, model.config, organism.default(), run / f"{name}-hf")


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
    """VAR's model-specific knobs for a model without published sink dimensions, from ``n`` samples
    of seed 2 in ``style``: the layer inputs of layers ``start`` … L−1 normalised as VAR reads them
    (RMSNorm with the layer's ``input_layernorm`` weight); ``dims`` the two hidden dimensions with
    the largest |value| on any image token, ``tau`` the ``1 − target`` quantile of the image tokens'
    peak over those dimensions, so that about ``target`` of the image keys are sinks; ``share`` the
    sink share VAR's own :class:`SinkTokens` probe then measures. Returns ``{dims, tau, share, peak}``."""
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
    eps = model.config.text.rms_norm_eps
    layers = tuple(range(start, model.config.text.num_hidden_layers))
    normed = []
    for li in layers:
        h = np.asarray(out.hidden_states[li], np.float64)[image]  # input of layer li, image tokens [N,E]
        w = np.asarray(model.params["language_model"]["layers"][li]["input_layernorm"]["weight"][...], np.float64)
        normed.append(h / np.sqrt((h * h).mean(-1, keepdims=True) + eps) * w)
    normed = np.abs(np.stack(normed))  # [L',N,E]
    peak = normed.max((0, 1))
    dims = tuple(int(d) for d in np.argsort(-peak)[:2])
    tau = float(np.quantile(normed[..., list(dims)].max(-1), 1 - target))
    probe = SinkTokens(dims=dims, tau=tau, layers=layers)
    s = np.asarray(model.forward(batch=batch, probes=(probe,)).probes["var_sinks"]["text"].values)  # [L',B,S]
    return {"dims": list(dims), "tau": round(tau, 4), "share": float(s[:, image].mean()), "peak": [float(peak[d]) for d in dims]}


def image_mass(model_dir: Path, style: dict, n: int = 50, batch_size: int = 25) -> dict:
    """The deficit measured directly: attention mass on image keys m_V (and on the system prompt,
    m_S) at the last prompt row (the row that predicts the first answer token), per layer (mean over
    heads and ``n`` held-out samples of seed 1 in ``style``) and overall. Returns
    ``{"per_layer": [...], "all": float, "system_per_layer": [...], "system": float}``."""
    import numpy as np

    import jaxmm
    from heldout import TASKS
    from jaxmm.data.grounded import make_sample
    from jaxmm.probes import KeyMass, VisualMass

    model = jaxmm.load(model_dir)
    size = (style["image_size"],) * 2
    rows, sys_rows = [], []
    for start in range(0, n, batch_size):
        samples = [
            make_sample(i, 1, size, TASKS[i % len(TASKS)], style["shape_scale"], style["contrast"])
            for i in range(start, min(n, start + batch_size))
        ]
        chats = [
            [{"role": "user", "content": [{"type": "image", "image": s["image"]}, {"type": "text", "text": s["question"]}]}]
            for s in samples
        ]
        batch, _ = model.prepare_chat(chats)
        pr = model.forward(batch=batch, probes=(VisualMass(), KeyMass(keys="system"))).probes
        rows.append(np.asarray(pr["visual_mass"]["text"].values)[..., -1].mean(-1))  # [L,B]: last row (left-padded)
        sys_rows.append(np.asarray(pr["system_mass"]["text"].values)[..., -1].mean(-1))
    per, sper = np.concatenate(rows, 1).mean(1), np.concatenate(sys_rows, 1).mean(1)
    return {
        "per_layer": [float(x) for x in per],
        "all": float(per.mean()),
        "system_per_layer": [float(x) for x in sper],
        "system": float(sper.mean()),
    }


LABELS = {
    "organism": "organism (shipped)",
    "distract": "distract-ft (style only)",
    "inattentive": "inattentive-ft (style + λ·m_V)",
}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/exp-deficit")
    ap.add_argument("--steps", type=int, default=300, help="fine-tuning steps of each new organism")
    ap.add_argument("--inattention", type=float, default=1.0, help="λ of the inattentive organism's loss (0: skip it)")
    ap.add_argument("--eval", type=int, default=125, help="held-out samples per method (cycling the 5 tasks)")
    ap.add_argument("--rave-steps", type=int, default=60)
    ap.add_argument("--results", default=str(HERE), help="where results.md and methods.png go")
    args = ap.parse_args(argv)

    import numpy as np

    from heldout import STYLE, evaluate, table
    from jaxmm import organism
    from jaxmm.eval.report import _plt, method_name

    t0 = time.time()
    run = Path(args.run)
    organisms, train_metrics, t_train = {"organism": Path(organism.default())}, {}, {}
    for name, lam in (("distract", 0.0), ("inattentive", args.inattention)):
        if name == "inattentive" and lam <= 0:
            continue
        t = time.time()
        out, organisms[name] = make_deficit(run, name, args.steps, DISTRACT, lam)
        t_train[name] = time.time() - t
        train_metrics[name] = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
        print(f"{name} organism ({args.steps} steps, {t_train[name]:.0f} s) -> {organisms[name]}", flush=True)

    results, home, calib, rave_metrics, mass = {}, {}, {}, {}, {}
    for key, mdir in organisms.items():
        tag = f"{key}-{args.steps}" if key != "organism" else key
        mass[key] = image_mass(mdir, DISTRACT)
        print(key, "image mass at the last prompt row", mass[key], flush=True)
        calib[key] = var_calibration(mdir, DISTRACT)
        print(key, "VAR calibration", calib[key], flush=True)
        var_spec = {"method": "var", "dims": calib[key]["dims"], "tau": calib[key]["tau"]}
        module, rave_metrics[key] = train_rave(mdir, run / f"rave-{tag}-{args.rave_steps}", args.rave_steps, DISTRACT)
        rave_spec = {"method": "rave", "path": str(module)}
        methods = ["baseline", *METHODS, var_spec, rave_spec]
        names = {method_name(var_spec): "var", method_name(rave_spec): "rave"}
        res = evaluate(str(mdir), methods, run / f"heldout-{tag}", n=args.eval, style=DISTRACT)
        results[key] = {names.get(method_name(m), method_name(m)): res[method_name(m)] for m in methods}
        home[key] = evaluate(str(mdir), ["baseline"], run / f"home-{tag}", n=args.eval, style=STYLE)["baseline"]
        print(key, json.dumps(results[key], indent=1), flush=True)
    wall = time.time() - t0
    (run / "summary.json").write_text(
        json.dumps(
            {"results": results, "home": home, "calib": calib, "image_mass": mass, "wall_s": wall, "train_s": t_train}, indent=1
        )
    )

    # ---------------------------------------------------------------- figure
    plt = _plt()
    order = list(results["organism"])
    keys = list(results)
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.9))
    x = np.arange(len(order))
    wd = 0.8 / len(keys)
    for i, key in enumerate(keys):
        off = x + (i - (len(keys) - 1) / 2) * wd
        axes[0].bar(off, [100 * results[key][m]["all"] for m in order], wd, label=LABELS[key])
        axes[1].bar(off, [results[key][m]["region_ratio"] for m in order], wd, label=LABELS[key])
        axes[2].bar(off, [results[key][m]["vas"] for m in order], wd, label=LABELS[key])
    for ax, lab in zip(axes, ("held-out accuracy, all tasks (%)", "region ratio ā_R / ā_V", "VAS")):
        ax.set_xticks(x, order, rotation=30)
        ax.set_ylabel(lab)
    axes[1].axhline(1.0, color="grey", lw=0.8, ls=":")
    axes[1].set_ylim(0.8, None)
    axes[2].set_yscale("log")
    axes[2].set_ylabel("VAS = m_V / m_S (log)")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=len(keys), fontsize=9)
    fig.suptitle(
        f"held-out, distracting style (shapes {DISTRACT['shape_scale']} of the width, photo at contrast "
        f"{DISTRACT['contrast']}), n = {args.eval} per bar"
    )
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(Path(args.results) / "methods.png", dpi=100)

    # ---------------------------------------------------------------- results.md
    cmd = (
        f"python experiments/deficit/run.py --run {args.run} --steps {args.steps} --inattention {args.inattention} "
        f"--eval {args.eval} --rave-steps {args.rave_steps}"
    )
    tm = train_metrics
    lines = [
        "# A second organism with a visual-attention deficit, and the methods on it",
        "",
        f"Command: `{cmd}` (one CPU core, `taskset -c 1`; {wall / 60:.1f} min in all on this invocation, of "
        f"which fine-tuning {', '.join(f'{k} {v / 60:.1f} min' for k, v in t_train.items())} — about 0 when a "
        "finished run is resumed).",
        "",
        f"* **organism**: the shipped organism (`jaxmm/assets/organism/`, trained in the style shapes "
        f"{STYLE['shape_scale']} of the width, photo at contrast {STYLE['contrast']}).",
        f"* **distract-ft**: the shipped organism fine-tuned {args.steps} steps × 16 samples "
        "(`configs/train/organism.yaml`: every task, lr 0.002, warm-up 5 %, cosine; seed 0) in the distracting "
        f"style: shapes {DISTRACT['shape_scale']} of the width on the photo at full contrast "
        f"({DISTRACT['contrast']}), {DISTRACT['image_size']}×{DISTRACT['image_size']}.",
    ]
    if "inattentive" in organisms:
        lines.append(
            f"* **inattentive-ft**: the same fine-tune plus λ·m_V with λ = {args.inattention} (`inattention_loss`: "
            "the mean attention mass on image keys over every layer and head of the text rows after the image), "
            "so the model learns to answer while attending less to the image."
        )
    lines += [
        "",
        "| fine-tune | LM loss, first logged | LM loss, last | λ·m_V, first | λ·m_V, last |",
        "|---|---|---|---|---|",
        *[
            f"| {k} | {m[0]['loss']:.3f} (step {m[0]['step']}) | {m[-1]['loss']:.3f} (step {m[-1]['step']}) | "
            f"{m[0]['total'] - m[0]['loss']:.3f} | {m[-1]['total'] - m[-1]['loss']:.3f} |"
            for k, m in tm.items()
        ],
        "",
        f"* **evaluation**: greedy, {args.eval} held-out grounded samples of seed 1 per method (the five tasks "
        "in turn) in the distracting style. Methods at the defaults of `configs/methods/` "
        "(vrga, ration, pai, avar); VAR with sink dimensions and τ calibrated per model (no published "
        "values for this architecture; `var_calibration`: the two dimensions with the largest activation "
        "after each layer's input RMSNorm on image tokens, τ their 90th percentile so that about 10 % of "
        "image keys are sinks, on 25 samples of seed 2); RAVE trained per model as in experiments/rave "
        f"(`configs/train/rave.yaml`, backbone frozen, {args.rave_steps} steps × 16 on seed 2, in the "
        "distracting style). Region ratio = mean attention per evidence-box image key / mean per image key "
        "(1 = no preference for the evidence), averaged over generated tokens, layers and heads.",
        "",
        "Attention mass on the image m_V (and on the system prompt m_S) at the last prompt row (it predicts the "
        "first answer token), mean over heads and 50 held-out samples of seed 1 in the distracting style, "
        "baseline (no method):",
        "",
        "| model | "
        + " | ".join(f"m_V layer {i}" for i in range(len(mass["organism"]["per_layer"])))
        + " | m_V mean | m_S mean |",
        "|---|" + "---|" * (len(mass["organism"]["per_layer"]) + 2),
        *[
            f"| {LABELS[k]} | " + " | ".join(f"{x:.3f}" for x in v["per_layer"]) + f" | {v['all']:.3f} | {v['system']:.3f} |"
            for k, v in mass.items()
        ],
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
        "## Baselines in the shipped organism's own style (shapes 0.35, contrast 0.5), for reference",
        "",
        *table(home, LABELS),
        "",
        "## Held-out, distracting style",
        "",
        "Baselines side by side:",
        "",
        *table({k: results[k]["baseline"] for k in keys}, LABELS),
        "",
    ]
    for key in keys:
        lines += [f"### {LABELS[key]}", "", *table(results[key]), ""]
    lines += [
        "### Change against each model's own baseline (accuracy in points / region ratio)",
        "",
        "| method | " + " | ".join(LABELS[k] for k in keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    for m in order[1:]:
        cells = []
        for key in keys:
            r, b = results[key][m], results[key]["baseline"]
            cells.append(f"{100 * (r['all'] - b['all']):+.1f} / {r['region_ratio'] - b['region_ratio']:+.3f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "![methods](methods.png)", ""]
    out_md = Path(args.results) / "results.md"
    reading = ""
    if out_md.exists() and "## Reading" in out_md.read_text():
        reading = out_md.read_text()[out_md.read_text().index("## Reading") :]
    out_md.write_text("\n".join(lines) + reading)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
