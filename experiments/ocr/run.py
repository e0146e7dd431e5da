"""Issue 21: what does it take to get the organism's OCR above chance (12.5 %, 8 words)?

    python experiments/ocr/run.py [--run runs/exp-ocr] [--steps N] [--eval N] [--probe-steps N]

1. Vision-only probe, per style (image size, shape_scale; the photo at contrast 0.5 as the organism
   was trained): the shipped organism's vision tower, its merged tokens mean-pooled into a linear
   classifier over the 8 words, trained on OCR samples of seed 0 and scored on held-out seed 1.
   Two readings: the frozen tower (a linear probe of the features the organism already has) and the
   tower trained with the classifier (can this tower learn to separate the words at all?).
2. SFT of the shipped organism on OCR only, in the style whose trained probe scored best
   (``configs/train/organism.yaml`` with overrides, as ``experiments/organism/train_organism.py``
   does), optionally with AVAR's enhance loss (``--agto ALPHA``), and optionally starting from the
   probe-trained vision tower (``--from-probe``).
3. Greedy OCR accuracy with the eval harness on held-out samples (seed 1, same style) before and
   after the fine-tune.

The recipe that gets OCR above chance (49 % vs 12.5 %; experiments/ocr/results.md), ≈ 20 min on one core:

    python experiments/ocr/run.py --run runs/exp-ocr --steps 800 --probe-steps 300 --probe-lr 2e-3 \
        --probe-lpft --styles 224:0.4 --style 224:0.4 --from-probe --freeze-vision

The defaults (no flags) run the three probes and the direct recipe (the shipped tower, trainable),
which stays at chance.

Reuses the run directory (probe results are cached, the trainer and the harness resume). Writes
``experiments/ocr/results.md`` (the numbers; the reading below it is kept) and
``experiments/ocr/curves.png``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
CONTRAST = 0.5
CHANCE = 1 / 8
# (image_size, shape_scale): the organism's style, larger text (the generator's maximum), and larger
# text on 4x the image tokens
STYLES = ((112, 0.35), (112, 0.4), (224, 0.4))
DEFAULT_STYLES = ",".join(f"{s}:{c}" for s, c in STYLES)


def style_name(size: int, scale: float) -> str:
    return f"{size}px-s{scale}"


def probe_key(size: int, scale: float, args) -> str:
    """A probe's name: its style, plus its steps and lr where they are not the defaults (200, 1e-3)."""
    default = (args.probe_steps, args.probe_lr) == (200, 1e-3)
    key = style_name(size, scale) + ("" if default else f"-{args.probe_steps}x-lr{args.probe_lr:g}")
    return key + ("-lpft" if args.probe_lpft else "")


# ----------------------------------------------------------------------------- the probe
def ocr_samples(n: int, seed: int, size: int, scale: float, offset: int = 0):
    """``n`` OCR samples of ``seed``: indices ``offset + 5k + 3``, the OCR samples of the grounded
    benchmark's task cycle (so seed 1 is the harness's held-out OCR set)."""
    from jaxmm.data.grounded import make_sample

    return [make_sample(offset + 5 * k + 3, seed, (size, size), "ocr", scale, CONTRAST) for k in range(n)]


def probe_arrays(model, samples):
    """Samples -> (patches float32 [n, N, D], labels int [n], grid (t, h, w))."""
    import numpy as np

    from jaxmm.data.grounded import WORDS

    xs, grid = [], None
    for s in samples:
        x, grid = model.image_processor.preprocess_one(s["image"], 0)
        xs.append(x)
    return np.stack(xs).astype(np.float32), np.array([WORDS.index(s["answer"]) for s in samples]), tuple(grid)


def run_probe(model, size, scale, steps, n_train, n_test, batch=32, lr=1e-3, log_every=25, lpft=False):
    """Trains the probe in one style; returns ``({"frozen": acc, "trained": acc, "curve": [...], ...},
    the parameters with the trained tower)``. ``lpft``: the trained probe starts from the frozen
    probe's classifier (linear probe, then fine-tune) instead of a zero classifier."""
    import flax.nnx as nnx
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from jaxmm.models.core.model import graphdef

    t0 = time.perf_counter()
    xtr, ytr, grid = probe_arrays(model, ocr_samples(n_train, 0, size, scale))
    xte, yte, _ = probe_arrays(model, ocr_samples(n_test, 1, size, scale))
    t_data = time.perf_counter() - t0
    gdef = graphdef(model.config, "float32")
    host_inputs = type(nnx.merge(gdef, model.params).visual).host_inputs

    def vis_for(b):
        return host_inputs(np.array([grid] * b), model.config.vision)

    vis_b, vis_e = vis_for(batch), vis_for(50)

    def pooled(params, x, vis):  # x [b, N, D] -> [b, E]
        b = x.shape[0]
        feats, _, _ = nnx.merge(gdef, params).visual(x.reshape(-1, x.shape[-1]), vis)
        return feats.reshape(b, -1, feats.shape[-1]).mean(1)

    def features(params, x):
        f = jax.jit(pooled)
        out = []
        for i in range(0, len(x), 50):
            chunk = x[i : i + 50]
            pad = np.concatenate([chunk, np.repeat(chunk[-1:], 50 - len(chunk), 0)]) if len(chunk) < 50 else chunk
            out.append(np.asarray(f(params, pad, vis_e))[: len(chunk)])
        return np.concatenate(out)

    e = model.config.vision.out_hidden_size
    head0 = {"w": jnp.zeros((e, 8)), "b": jnp.zeros(8)}

    def ce(head, f, y):
        logits = f @ head["w"] + head["b"]
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(y)), y])

    # (a) frozen tower: a linear classifier on the pooled features (standardised), full batch
    ftr, fte = features(model.params, xtr), features(model.params, xte)
    mu, sd = ftr.mean(0), ftr.std(0) + 1e-6
    ftr_n, fte_n = (ftr - mu) / sd, (fte - mu) / sd
    tx = optax.adam(1e-2)
    head, opt = head0, tx.init(head0)

    @jax.jit
    def fstep(head, opt):
        loss, g = jax.value_and_grad(ce)(head, ftr_n, ytr)
        u, opt = tx.update(g, opt)
        return optax.apply_updates(head, u), opt, loss

    for _ in range(1000):
        head, opt = fstep(head, opt)[:2]
    acc = lambda h, f, y: float(np.mean(np.argmax(f @ np.asarray(h["w"]) + np.asarray(h["b"]), -1) == y))
    frozen_train, frozen = acc(head, ftr_n, ytr), acc(head, fte_n, yte)

    # (b) the tower trained with the classifier (from the shipped tower)
    if lpft:  # fold the standardisation into the frozen probe's classifier
        w = np.asarray(head["w"]) / sd[:, None]
        head0 = {"w": jnp.asarray(w), "b": jnp.asarray(np.asarray(head["b"]) - mu @ w)}
    state = {"params": model.params, "head": head0}
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 20), max(steps, 2))
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(sched))
    opt = tx.init(state)

    def loss_fn(state, x, y):
        return ce(state["head"], pooled(state["params"], x, vis_b), y)

    @jax.jit
    def step(state, opt, x, y):
        loss, g = jax.value_and_grad(loss_fn)(state, x, y)
        u, opt = tx.update(g, opt, state)
        return optax.apply_updates(state, u), opt, loss

    def test_acc(state):
        f = features(state["params"], xte)
        return acc(state["head"], f, yte)

    rng = np.random.default_rng(0)
    curve, losses, t1 = [], [], time.perf_counter()
    for i in range(steps):
        idx = rng.integers(0, len(xtr), batch)
        state, opt, loss = step(state, opt, xtr[idx], ytr[idx])
        losses.append(float(loss))
        if (i + 1) % log_every == 0 or i + 1 == steps:
            curve.append({"step": i + 1, "loss": float(np.mean(losses[-log_every:])), "test_acc": test_acc(state)})
            c = curve[-1]
            print(f"  probe {style_name(size, scale)} step {i + 1}: loss {c['loss']:.3f} held-out {c['test_acc']:.3f}")
    return {
        "size": size,
        "shape_scale": scale,
        "frozen": frozen,
        "frozen_train": frozen_train,
        "trained": curve[-1]["test_acc"],
        "curve": curve,
        "steps": steps,
        "lr": lr,
        "lpft": lpft,
        "n_train": n_train,
        "n_test": n_test,
        "seconds_data": t_data,
        "seconds_train": time.perf_counter() - t1,
    }, state["params"]


# ----------------------------------------------------------------------------- eval
def heldout_file(run: Path, n: int, size: int, scale: float) -> Path:
    """The held-out OCR samples (seed 1) as a grounded jsonl with PNG images (the harness's grounded
    generator cycles every task; this keeps the same OCR samples and only them)."""
    d = run / f"heldout-{style_name(size, scale)}-{n}"
    f = d / "ocr.jsonl"
    if f.exists():
        return f
    d.mkdir(parents=True, exist_ok=True)
    rows = []
    for s in ocr_samples(n, 1, size, scale):
        p = d / f"{s['id']}.png"
        s["image"].save(p)
        rows.append(
            {
                "id": s["id"],
                "question": s["question"],
                "answer": s["answer"],
                "task": s["task"],
                "box": list(s["box"]),
                "image": str(p.absolute()),
            }
        )
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


def ocr_accuracy(model, data: Path, out: Path, n: int) -> dict:
    from jaxmm.eval.harness import EvalConfig, run as run_eval
    from jaxmm.eval.report import load_rows

    ev = EvalConfig(
        model=None if model is None else str(model),
        out=str(out),
        methods=["baseline"],
        batch_size=25,
        max_new_tokens=16,
        heatmaps=0,
        benchmarks=[{"name": "grounded", "path": str(data), "limit": n}],
    )
    t0 = time.perf_counter()
    rows = [r for r in load_rows(run_eval(ev, progress=True)) if "error" not in r]
    preds = {}
    for r in rows:
        preds[r.get("prediction", r.get("answer_text", "?"))] = preds.get(r.get("prediction", r.get("answer_text", "?")), 0) + 1
    return {
        "acc": sum(r["score"] for r in rows) / max(len(rows), 1),
        "n": len(rows),
        "seconds": time.perf_counter() - t0,
        "predictions": dict(sorted(preds.items(), key=lambda kv: -kv[1])[:8]),
    }


# ----------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/exp-ocr")
    ap.add_argument("--steps", type=int, default=600, help="SFT steps (OCR only)")
    ap.add_argument("--eval", type=int, default=100, help="held-out OCR samples")
    ap.add_argument("--probe-steps", type=int, default=200)
    ap.add_argument("--probe-lr", type=float, default=1e-3)
    ap.add_argument("--probe-lpft", action="store_true", help="trained probe starts from the frozen probe's classifier")
    ap.add_argument("--probe-train", type=int, default=1024, help="probe training samples per style")
    ap.add_argument("--probe-test", type=int, default=200)
    ap.add_argument("--styles", default=DEFAULT_STYLES, help="image_size:shape_scale,...")
    ap.add_argument("--style", default=None, help="SFT style image_size:shape_scale (default: the best trained probe)")
    ap.add_argument("--agto", type=float, default=0.0, help="AVAR enhance loss alpha (0 = off)")
    ap.add_argument("--from-probe", action="store_true", help="start the SFT from the probe-trained vision tower")
    ap.add_argument("--freeze-vision", action="store_true", help="SFT trains the decoder only (the vision tower frozen)")
    ap.add_argument("--lr", type=float, default=None, help="SFT peak lr (default: organism.yaml's)")
    ap.add_argument("--batch", type=int, default=None, help="SFT batch size (default: organism.yaml's)")
    ap.add_argument("--results", default=str(HERE / "results.md"))
    args = ap.parse_args(argv)

    import jaxmm
    from jaxmm import organism
    from jaxmm.train.sft import TrainConfig, export_hf, final_params, train

    run = Path(args.run)
    run.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    shipped = organism.resolve(None)
    model = jaxmm.load(shipped, dtype="float32")

    # 1. probes
    probes = {}
    for spec in args.styles.split(","):
        size, scale = int(spec.split(":")[0]), float(spec.split(":")[1])
        name = probe_key(size, scale, args)
        f = run / "probe" / f"{name}.json"
        if f.exists():
            probes[name] = json.loads(f.read_text())
            print(f"probe {name}: cached")
            continue
        print(f"probe {name} …")
        res, params = run_probe(
            model, size, scale, args.probe_steps, args.probe_train, args.probe_test, lr=args.probe_lr, lpft=args.probe_lpft
        )
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(res, indent=1))
        probes[name] = res
        export_hf(params, model.config, shipped, run / f"probe-{name}-hf")  # the probe-trained tower
        print(f"probe {name}: frozen {res['frozen']:.3f}, trained {res['trained']:.3f} ({res['seconds_train']:.0f} s)")

    if args.style:
        size, scale = int(args.style.split(":")[0]), float(args.style.split(":")[1])
    else:
        best = max(probes.values(), key=lambda r: (r["trained"], -r["size"]))
        size, scale = best["size"], best["shape_scale"]
    sname = style_name(size, scale)
    print(f"SFT style: {sname}")

    # 2. the fine-tune
    start_model = shipped
    if args.from_probe:
        pk = probe_key(size, scale, args)
        start_model = run / f"probe-{pk}-hf"
        if not start_model.exists():
            _, params = run_probe(
                model, size, scale, args.probe_steps, args.probe_train, args.probe_test, lr=args.probe_lr, lpft=args.probe_lpft
            )
            export_hf(params, model.config, shipped, start_model)
    tag = f"sft-{sname}" + (f"-agto{args.agto:g}" if args.agto else "") + (f"-from-probe-{pk}" if args.from_probe else "")
    tag += f"-lr{args.lr:g}" if args.lr else ""
    tag += "-frozen-vision" if args.freeze_vision else ""
    overrides = [
        f"out={run / tag}",
        f"steps={args.steps}",
        f"model={start_model}",
        "data.tasks=[ocr]",
        f"data.image_size={size}",
        f"data.shape_scale={scale}",
        f"data.contrast={CONTRAST}",
        f"save_every={max(50, min(250, args.steps // 4))}",
    ]
    if args.agto:
        overrides.append(f"agto={{alpha: {args.agto}, beta: 0.0}}")
    if args.lr:
        overrides.append(f"lr={args.lr}")
    if args.freeze_vision:
        overrides.append("freeze=[visual]")
    if args.batch:
        overrides.append(f"batch_size={args.batch}")
    cfg = TrainConfig.from_yaml(ROOT / "configs/train/organism.yaml", overrides)
    out = train(cfg, progress=True)
    params, step = final_params(out)
    tuned = export_hf(params, model.config, shipped, run / f"{tag}-hf")
    metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    # metrics.jsonl's "seconds" restart with every (resumed) session; sum each session's last value
    secs, prev = 0.0, 0.0
    for m in metrics:
        if m["seconds"] < prev:
            secs += prev
        prev = m["seconds"]
    secs += prev

    # 3. held-out OCR accuracy, before and after
    data = heldout_file(run, args.eval, size, scale)
    before = ocr_accuracy(None, data, run / f"eval-shipped-{sname}-{args.eval}", args.eval)
    after = ocr_accuracy(tuned, data, run / f"eval-{tag}-{args.eval}", args.eval)
    if sname != style_name(112, 0.35):
        before_own = ocr_accuracy(
            None, heldout_file(run, args.eval, 112, 0.35), run / f"eval-shipped-112px-s0.35-{args.eval}", args.eval
        )
    else:
        before_own = before
    total = time.perf_counter() - t_start
    summary = {
        "command": command(args),
        "probes": {k: {kk: v for kk, v in r.items() if kk != "curve"} for k, r in probes.items()},
        "style": sname,
        "tag": tag,
        "start": "the shipped organism" + (f" with the {sname} probe's trained vision tower" if args.from_probe else ""),
        "sft_steps": step,
        "sft_seconds": secs,
        "final_loss": metrics[-1]["loss"],
        "loss_curve": [[m["step"], m["loss"]] for m in metrics],
        "before": before,
        "before_organism_style": before_own,
        "after": after,
        "session_seconds": total,
        "config": {k: getattr(cfg, k) for k in ("lr", "batch_size", "seq_len", "agto", "data", "freeze")},
    }
    (run / f"summary-{tag}.json").write_text(json.dumps(summary, indent=1))
    report(run, Path(args.results))


def command(args) -> str:
    cmd = "python experiments/ocr/run.py" + "".join(
        f" {flag} {v}"
        for flag, v in (("--run", args.run), ("--steps", args.steps), ("--eval", args.eval), ("--probe-steps", args.probe_steps))
    )
    cmd += f" --probe-lr {args.probe_lr:g}" if args.probe_lr != 1e-3 else ""
    cmd += " --probe-lpft" if args.probe_lpft else ""
    cmd += f" --styles {args.styles}" if args.styles != DEFAULT_STYLES else ""
    cmd += (f" --agto {args.agto:g}" if args.agto else "") + (" --from-probe" if args.from_probe else "")
    cmd += (f" --style {args.style}" if args.style else "") + (f" --lr {args.lr:g}" if args.lr else "")
    cmd += " --freeze-vision" if args.freeze_vision else ""
    return cmd + (f" --batch {args.batch}" if args.batch else "")


def report(run: Path, path: Path):
    """results.md (every probe and SFT run of ``run``, in the order they finished; the hand-written
    reading below the numbers is kept) and curves.png."""
    from jaxmm.eval.report import _plt

    files = sorted((run / "probe").glob("*.json"), key=lambda f: f.stat().st_mtime)
    probes = {f.stem: json.loads(f.read_text()) for f in files}

    sums = [json.loads(f.read_text()) for f in sorted(run.glob("summary-*.json"), key=lambda f: f.stat().st_mtime)]
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))
    for k, r in probes.items():
        a1.plot(
            [c["step"] for c in r["curve"]], [c["test_acc"] for c in r["curve"]], label=f"{k} (frozen tower: {r['frozen']:.2f})"
        )
    a1.axhline(CHANCE, color="grey", ls="--", lw=1, label="chance")
    a1.set_xlabel("probe step (tower + linear head trained)")
    a1.set_ylabel("held-out word accuracy")
    a1.set_ylim(0, 1)
    a1.legend(fontsize=7)
    a1.set_title("vision-only probe (mean-pooled, linear)")
    for s in sums:
        c = s["loss_curve"]
        a2.plot(
            [x[0] for x in c],
            [x[1] for x in c],
            label=f"{s['tag']}: OCR {100 * s['before']['acc']:.0f} -> {100 * s['after']['acc']:.0f} %",
        )
    prior = prior_loss()
    a2.axhline(prior, color="grey", ls="--", lw=1, label=f"the answer prior, no reading ({prior:.3f})")
    a2.set_xlabel("SFT step")
    a2.set_ylabel("SFT loss (answer tokens)")
    a2.set_yscale("log")
    a2.legend(fontsize=6, loc="lower left")
    a2.set_title("OCR-only SFT of the shipped organism")
    fig.tight_layout()
    fig.savefig(HERE / "curves.png", dpi=100)

    reading = ""
    if path.exists() and "## Reading" in path.read_text():
        reading = path.read_text()[path.read_text().index("## Reading") :]
    p = next(iter(probes.values()))
    lines = [
        "# OCR above chance? (issue 21)",
        "",
        "Commands (one core each: `taskset -c 0`), in the order they ran (probes are cached in the run directory):",
        "",
        *[f"    {s['command']}" for s in sums],
        "",
        "## Vision-only probe",
        "",
        "The shipped organism's vision tower, its merged tokens mean-pooled into a linear classifier over the 8 words; "
        f"{p['n_train']} OCR training samples (seed 0), {p['n_test']} held-out (seed 1), photo at contrast {CONTRAST}. "
        "*Frozen*: the tower as shipped, only the classifier trained (Adam, full batch, 1000 steps; features standardised). "
        "*Trained*: tower and classifier together from the shipped tower, batches of 32, Adam (warm-up, cosine), "
        "from a zero classifier or from the frozen probe's (linear probe then fine-tune).",
        "",
        "| probe | style (image px, text shape_scale) | image tokens | font px | frozen-tower probe | trained-tower probe "
        "| trained: steps, lr, start | probe time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k, r in probes.items():
        lines.append(
            f"| {k} | {r['size']} px, {r['shape_scale']} | {(r['size'] // 28) ** 2} | {int(r['size'] * r['shape_scale']) // 2} | "
            f"{100 * r['frozen']:.1f} % | {100 * r['trained']:.1f} % | {r['steps']}, {r.get('lr', 1e-3):g}, "
            f"{'frozen probe' if r.get('lpft') else 'zero'} classifier | {r['seconds_train']:.0f} s |"
        )
    lines += [
        "",
        "## OCR-only SFT",
        "",
        "`configs/train/organism.yaml` + overrides (tasks [ocr], the style's image_size and shape_scale, contrast 0.5); "
        "greedy OCR accuracy with the eval harness (jaxmm.eval.harness, grounded rows read from a jsonl of the held-out "
        "OCR samples: seed 1, indices 5k+3, the same style); chance 12.5 %. The shipped organism in its own style: "
        f"{100 * sums[0]['before_organism_style']['acc']:.1f} % (n = {sums[0]['before_organism_style']['n']}, "
        f"answers {_preds(sums[0]['before_organism_style'])})."
        if sums
        else "",
        "",
        "| run | start | style | steps × batch, lr | extra loss, frozen | OCR before | OCR after | n | answers after "
        "| SFT time | final loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in sums:
        c = s["config"]
        agto = f"AVAR enhance α = {c['agto']['alpha']}" if c.get("agto") else "none"
        agto += ", vision tower frozen" if c.get("freeze") else ""
        lines.append(
            f"| {s['tag']} | {s['start']} | {s['style']} | {s['sft_steps']} × {c['batch_size']}, {c['lr']} | {agto} | "
            f"{100 * s['before']['acc']:.1f} % | {100 * s['after']['acc']:.1f} % | {s['after']['n']} | {_preds(s['after'])} | "
            f"{s['sft_seconds'] / 60:.1f} min ({s['sft_seconds'] / max(s['sft_steps'], 1):.2f} s/step) | {s['final_loss']:.3f} |"
        )
    lines += ["", "![probe and SFT curves](curves.png)", ""]
    path.write_text("\n".join(lines) + ("\n" + reading if reading else ""))
    print("\n".join(lines))


def prior_loss() -> float:
    """The SFT loss (nats per answer token, <|im_end|> included) of a model that knows the 8 words
    are equally likely but cannot read them: ln 8 over the mean number of answer tokens."""
    import math

    from tokenizers import Tokenizer

    from jaxmm import organism
    from jaxmm.data.grounded import WORDS

    tok = Tokenizer.from_file(str(Path(organism.resolve(None)) / "tokenizer.json"))
    n = sum(len(tok.encode(w).ids) + 1 for w in WORDS) / len(WORDS)
    return math.log(len(WORDS)) / n


def _preds(r):
    return ", ".join(f"{k!s} ×{v}" for k, v in list(r["predictions"].items())[:4])


if __name__ == "__main__":
    main()
