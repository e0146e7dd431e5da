"""Evaluation report: ``report.md`` with accuracy and attention tables, and PNG figures.

Figures (``figures/``): attention heatmaps over the image for chosen samples and methods (written
by the harness as it goes), stacked into one ``grid_<benchmark>_<id>.png`` per sample across the
methods, ``vas_vs_accuracy.png`` (per method and benchmark) and
``visual_entropy_per_layer.png`` (mean over samples, per method).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import defaultdict
from pathlib import Path

import numpy as np


def method_name(spec) -> str:
    """A method's column name: its name plus its parameters (``"avar:alpha_sys=0.05"``), so two
    settings of one method are two columns. An intervention object is named by its class and the
    values of its fields (arrays by their contents)."""
    if isinstance(spec, str):
        return spec
    if isinstance(spec, dict):
        rest = ",".join(f"{k}={v}" for k, v in spec.items() if k != "method")
        return spec["method"] + (f":{rest}" if rest else "")
    if dataclasses.is_dataclass(spec):
        rest = ",".join(
            f"{f.name}={_show(getattr(spec, f.name))}" for f in dataclasses.fields(spec) if getattr(spec, f.name) is not None
        )
        return type(spec).__name__.lower() + (f":{rest}" if rest else "")
    return type(spec).__name__.lower()


def _show(v) -> str:
    """A field's value in a column name: arrays by their (first 8) entries, and a longer array also
    by a hash of all of them (two arrays that differ after the 8th entry are two columns)."""
    if not (hasattr(v, "shape") and hasattr(v, "dtype")):
        return str(v)
    a = np.asarray(v)
    if a.size == 1:
        return str(a.item())
    head = " ".join(f"{x:g}" for x in a.ravel()[:8])
    if a.size <= 8:
        return f"[{head}]"
    digest = hashlib.sha1(str(a.shape).encode() + np.ascontiguousarray(a).tobytes()).hexdigest()[:8]
    return f"[{head} … #{digest}]"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def render_heatmap(image, attention: np.ndarray, path: Path, title: str = "", box=None):
    """Overlays a merged-grid attention map [rows, cols] on ``image`` (PIL) and saves a PNG; ``box``:
    the evidence box(es) drawn on both panels, one ``(x0, y0, x1, y1)`` or a list (image pixels)."""
    plt = _plt()
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = image.size
    fig, axes = plt.subplots(1, 2, figsize=(7, 3.6))
    axes[0].imshow(image)
    axes[0].set_title("image", fontsize=9)
    axes[1].imshow(image)
    im = axes[1].imshow(attention, cmap="jet", alpha=0.5, extent=(0, w, h, 0), interpolation="nearest")
    fig.colorbar(im, ax=axes[1], fraction=0.046, pad=0.04, label="attention weight")
    axes[1].set_title("attention of generated tokens\n(last layer, mean over heads and tokens)", fontsize=8)
    if title:
        import textwrap

        shown = "".join(c if c.isprintable() else " " for c in title)  # model output may hold control chars
        fig.suptitle("\n".join(textwrap.wrap(shown, 90)[:4]), fontsize=7)
    from matplotlib.patches import Rectangle

    from jaxmm.processing.batch import boxes_of

    for b in boxes_of(box):
        for ax in axes:
            ax.add_patch(Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1], fill=False, color="white", lw=1.5))
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def load_rows(out_dir: Path) -> list[dict]:
    """The rows of ``out_dir/results.jsonl``, one dict per (benchmark, sample, method), in file
    order; a line that is not valid JSON (a row cut by a killed run) is skipped.

    Raises:
        FileNotFoundError: no results.jsonl in ``out_dir``.
    """
    rows = []
    for line in (Path(out_dir) / "results.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def summarize(rows: list[dict]) -> dict:
    """{(benchmark, method): {"accuracy", "metric", "n", "errors", "unparsed", "vas", "visual_entropy",
    "region_ratio", "per_layer"}}: means over the rows without error. ``accuracy`` is the mean of
    the benchmark's own score (``metric`` names it: accuracy, relaxed accuracy, ANLS, VQA
    accuracy, exact match); ``unparsed`` counts answers the scorer could not read (no option
    letter, neither yes nor no)."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["benchmark"], r["method"])].append(r)
    out = {}
    for key, rs in groups.items():
        ok = [r for r in rs if "error" not in r]

        def mean(k):
            vals = [r[k] for r in ok if r.get(k) is not None]
            return float(np.mean(vals)) if vals else None

        layers = [r["visual_entropy_per_layer"] for r in ok if r.get("visual_entropy_per_layer")]
        metric = next((r["metric"] for r in ok if r.get("metric")), "accuracy")
        out[key] = {
            "accuracy": mean("score"),
            "metric": metric,
            "n": len(ok),
            "errors": len(rs) - len(ok),
            "unparsed": sum(r.get("parsed") is None for r in ok),
            "vas": mean("vas"),
            "visual_entropy": mean("visual_entropy"),
            "region_ratio": mean("region_ratio"),
            "per_layer": np.mean(layers, 0).tolist() if layers else None,
        }
    return out


def config_order(rows: list[dict], config: dict | None = None) -> tuple[list[str], list[str]]:
    """Benchmark and method names in the run config's order (``config.json``: its ``benchmarks``
    and ``methods``), then any other name of ``rows`` in order of appearance."""
    config = config or {}
    benches = [b["name"] if isinstance(b, dict) else str(b) for b in config.get("benchmarks", [])]
    methods = [method_name(m) for m in config.get("methods", [])]
    for r in rows:
        if r["benchmark"] not in benches:
            benches.append(r["benchmark"])
        if r["method"] not in methods:
            methods.append(r["method"])
    seen_b, seen_m = {r["benchmark"] for r in rows}, {r["method"] for r in rows}
    return [b for b in dict.fromkeys(benches) if b in seen_b], [m for m in dict.fromkeys(methods) if m in seen_m]


def chair_metrics(rows: list[dict]) -> dict:
    """{method: {"n", "CHAIR_s", "CHAIR_i", "mentions"}} over the CHAIR rows without error (PAI's
    chair.py): CHAIR_s the share of captions with a hallucinated object, CHAIR_i hallucinated object
    mentions over all object mentions (NaN without mentions)."""
    out = {}
    for r in rows:
        if r["benchmark"] != "chair" or "error" in r or not isinstance(r.get("parsed"), dict):
            continue
        m = out.setdefault(r["method"], {"n": 0, "hallucinated_captions": 0, "hallucinated": 0, "mentions": 0})
        m["n"] += 1
        m["hallucinated_captions"] += bool(r["parsed"]["hallucinated"])
        m["hallucinated"] += len(r["parsed"]["hallucinated"])
        m["mentions"] += len(r["parsed"]["categories"])
    return {
        k: {
            "n": v["n"],
            "CHAIR_s": v["hallucinated_captions"] / v["n"],
            "mentions": v["mentions"],
            "CHAIR_i": v["hallucinated"] / v["mentions"] if v["mentions"] else float("nan"),
        }
        for k, v in out.items()
    }


def pope_metrics(rows: list[dict]) -> dict:
    """POPE's scores per (method, split): {(method, split): {"n", "accuracy", "precision", "recall",
    "f1", "yes_ratio", "unparsed"}}, split = the row's ``task`` (random / popular / adversarial),
    plus split ``"all"``. "yes" is the positive class, as in POPE's evaluation and lmms-eval's
    ``pope_aggregate_*``: precision = TP / (TP + FP), recall = TP / (TP + FN), F1 their harmonic mean,
    yes ratio = share of answers "yes"; an unparsed answer (neither yes nor no) is wrong, counts in
    no class and is counted. Error rows are left out. Fractions in [0, 1] (0 where undefined)."""
    groups = defaultdict(list)
    for r in rows:
        if r.get("benchmark") == "pope" and "error" not in r:
            groups[(r["method"], r.get("task") or "?")].append(r)
            groups[(r["method"], "all")].append(r)
    out = {}
    for key, rs in groups.items():
        pred = [r.get("parsed") for r in rs]
        gt = [str(r["answer"]).strip().lower() for r in rs]
        tp = sum(p == "yes" and g == "yes" for p, g in zip(pred, gt))
        fp = sum(p == "yes" and g == "no" for p, g in zip(pred, gt))
        fn = sum(p == "no" and g == "yes" for p, g in zip(pred, gt))
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        out[key] = {
            "n": len(rs),
            "accuracy": sum(p == g for p, g in zip(pred, gt)) / len(rs),
            "precision": prec,
            "recall": rec,
            "f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0,
            "yes_ratio": sum(p == "yes" for p in pred) / len(rs),
            "unparsed": sum(p is None for p in pred),
        }
    return out


def task_accuracy(rows: list[dict]) -> dict:
    """Accuracy per (benchmark, task, method) over rows without error: {key: {"accuracy", "n",
    "unparsed"}} (the benchmark's category field: MMStar's ``category``, POPE's split, …)."""
    groups = defaultdict(list)
    for r in rows:
        if "error" not in r and r.get("task") is not None:
            groups[(r["benchmark"], r["task"], r["method"])].append(r)
    return {
        k: {
            "accuracy": float(np.mean([r["score"] for r in rs])),
            "n": len(rs),
            "unparsed": sum(r.get("parsed") is None for r in rs),
        }
        for k, rs in groups.items()
    }


def _fmt(x, pct=False):
    if x is None:
        return "–"
    return f"{100 * x:.1f}" if pct else f"{x:.3f}"


def table(summary: dict, benchmarks: list[str] | None = None, methods: list[str] | None = None) -> str:
    """Markdown score table, benchmark × method (in the given orders; default: sorted, baseline
    first), each benchmark's metric named, deltas against ``baseline`` in points, unparsed answers
    and error rows counted in brackets."""
    benches = benchmarks or sorted({b for b, _ in summary})
    if methods is None:
        methods = sorted({m for _, m in summary}, key=lambda m: (m != "baseline", m))
    lines = ["| benchmark | metric (%) | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for b in benches:
        base = summary.get((b, "baseline"), {}).get("accuracy")
        metric = next((summary[(b, m)]["metric"] for m in methods if (b, m) in summary), "accuracy")
        cells = []
        for m in methods:
            s = summary.get((b, m))
            if s is None:
                cells.append("–")
                continue
            cell = _fmt(s["accuracy"], pct=True)
            if m != "baseline" and base is not None and s["accuracy"] is not None:
                cell += f" ({100 * (s['accuracy'] - base):+.1f})"
            if s.get("unparsed"):
                cell += f" [{s['unparsed']} unparsed]"
            if s["errors"]:
                cell += f" [{s['errors']} err]"
            cells.append(cell)
        lines.append(f"| {b} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def heatmap_grids(out_dir: Path, rows: list[dict], methods: list[str]) -> list[str]:
    """One figure per sample stacking its heatmaps of every method (in ``methods`` order) from the
    PNGs the harness wrote: ``figures/grid_<benchmark>_<id>.png``; returns their paths relative to
    ``out_dir``."""
    from PIL import Image

    by_sample = defaultdict(dict)
    for r in rows:
        if r.get("heatmap") and (out_dir / r["heatmap"]).exists():
            by_sample[(r["benchmark"], r["id"])][r["method"]] = out_dir / r["heatmap"]
    out = []
    for (b, i), figs in sorted(by_sample.items()):
        images = [Image.open(figs[m]).convert("RGB") for m in methods if m in figs]
        grid = Image.new("RGB", (max(im.width for im in images), sum(im.height for im in images)), "white")
        y = 0
        for im in images:
            grid.paste(im, (0, y))
            y += im.height
        path = Path("figures") / f"grid_{b}_{i}.png"
        grid.save(out_dir / path)
        out.append(str(path))
    return out


def task_table(rows: list[dict], benchmarks: list[str], methods: list[str]) -> str:
    """Markdown score table per (benchmark, task) × method, in the given orders: the benchmark's
    metric in %, the delta against ``baseline`` in points, unparsed answers in brackets; ``n`` is
    the number of scored rows of the first method ("" when there are no tasks)."""
    acc = task_accuracy(rows)
    keys = sorted({(b, t) for b, t, _ in acc}, key=lambda bt: (benchmarks.index(bt[0]), str(bt[1])))
    if not keys:
        return ""
    lines = ["| benchmark | task | n | " + " | ".join(methods) + " |", "|---|---|---|" + "---|" * len(methods)]
    for b, t in keys:
        base = acc.get((b, t, "baseline"), {}).get("accuracy")
        n = next((acc[(b, t, m)]["n"] for m in methods if (b, t, m) in acc), 0)
        cells = []
        for m in methods:
            x = acc.get((b, t, m))
            if x is None:
                cells.append("–")
                continue
            cell = _fmt(x["accuracy"], pct=True)
            if m != "baseline" and base is not None:
                cell += f" ({100 * (x['accuracy'] - base):+.1f})"
            if x["unparsed"]:
                cell += f" [{x['unparsed']} unparsed]"
            cells.append(cell)
        lines.append(f"| {b} | {t} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def score_tables(rows: list[dict], config: dict | None = None) -> str:
    """The report's score sections as markdown, in the run config's order: scores per benchmark
    (each benchmark's own metric), per task, and POPE's per-split scores when POPE was run. What
    ``jaxmm eval`` prints when it ends."""
    summary = summarize(rows)
    benches, methods = config_order(rows, config)
    out = [
        "## Scores (%) — each benchmark's own metric; delta against baseline in points",
        "",
        table(summary, benches, methods),
        "",
    ]
    tasks = task_table(rows, benches, methods)
    if tasks:
        out += ["## Scores per task (%)", "", tasks, ""]
    pope = [
        "| split | method | n | accuracy | precision | recall | F1 | yes ratio | unparsed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (m, split), s in sorted(
        pope_metrics(rows).items(), key=lambda kv: (kv[0][1] == "all", kv[0][1], methods.index(kv[0][0]))
    ):
        pope.append(
            f"| {split} | {m} | {s['n']} | "
            + " | ".join(_fmt(s[k], pct=True) for k in ("accuracy", "precision", "recall", "f1", "yes_ratio"))
            + f" | {s['unparsed']} |"
        )
    if len(pope) > 2:
        out += ['## POPE (%, "yes" is the positive class)', "", "\n".join(pope), ""]
    chair = chair_metrics(rows)
    if chair:
        lines = ["| method | captions | object mentions | CHAIR_s | CHAIR_i |", "|---|---|---|---|---|"]
        lines += [
            f"| {m} | {c['n']} | {c['mentions']} | {_fmt(c['CHAIR_s'], pct=True)} | {_fmt(c['CHAIR_i'], pct=True)} |"
            for m, c in sorted(chair.items(), key=lambda kv: methods.index(kv[0]))
        ]
        out += ["## CHAIR (%, lower is better: hallucinated objects in captions)", "", "\n".join(lines), ""]
    return "\n".join(out).rstrip()


def run_config(out_dir: str | Path) -> dict:
    """The run's ``config.json`` ({} when there is none)."""
    f = Path(out_dir) / "config.json"
    return json.loads(f.read_text()) if f.exists() else {}


def write_report(out_dir: str | Path) -> Path:
    """Writes ``report.md`` and the figures of the run in ``out_dir`` from its ``results.jsonl``;
    returns the report's path."""
    out_dir = Path(out_dir)
    rows = load_rows(out_dir)
    summary = summarize(rows)
    cfg = run_config(out_dir)
    benches, methods = config_order(rows, cfg)
    ordered = [((b, m), summary[(b, m)]) for b in benches for m in methods if (b, m) in summary]
    plt = _plt()
    figs = out_dir / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    # VAS against accuracy
    fig, ax = plt.subplots(figsize=(6, 4))
    for (b, m), s in ordered:
        if s["vas"] is not None and s["accuracy"] is not None:
            ax.scatter(s["vas"], 100 * s["accuracy"], label=f"{m} · {b}", s=30)
    ax.set_xlabel(
        "VAS = attention mass on image tokens / on system tokens\n(mean over generated tokens, layers, heads)", fontsize=8
    )
    ax.set_ylabel("accuracy (%)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(figs / "vas_vs_accuracy.png", dpi=100)
    plt.close(fig)
    # visual entropy per layer
    fig, ax = plt.subplots(figsize=(5, 4))
    for (b, m), s in ordered:
        if s["per_layer"]:
            ax.plot(range(len(s["per_layer"])), s["per_layer"], marker="o", label=f"{m} · {b}")
            ax.set_xticks(range(len(s["per_layer"])))
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("visual entropy H_V (nats)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(figs / "visual_entropy_per_layer.png", dpi=100)
    plt.close(fig)
    attn = ["| benchmark | method | n | VAS | visual entropy | region ratio |", "|---|---|---|---|---|---|"]
    for (b, m), s in ordered:
        attn.append(f"| {b} | {m} | {s['n']} | {_fmt(s['vas'])} | {_fmt(s['visual_entropy'])} | {_fmt(s['region_ratio'])} |")
    grids = heatmap_grids(out_dir, rows, methods)
    text = "\n".join(
        [
            "# Evaluation report",
            "",
            f"Model: `{cfg.get('model') or 'embedded organism'}` · rows: {len(rows)} · errors: {sum('error' in r for r in rows)}",
            "",
            score_tables(rows, cfg),
            "",
            "## Attention (means over samples; per sample: over generated tokens, layers, heads)",
            "",
            "VAS (AVAR's Visual Attention Score) is the attention mass a generated token puts on the image "
            "tokens divided by the mass on the system-prompt tokens, m_V / m_S (a ratio of totals, not of "
            "per-token means): it is often far above 1, since the image holds many tokens and the system "
            "prompt few, and it grows when the answer looks at the image rather than at the prompt. "
            "Visual entropy is the entropy (nats) of the attention within the image; region ratio is the mean "
            "attention on the evidence box over the mean on the image.",
            "",
            "\n".join(attn),
            "",
            "## Figures",
            "",
            "![VAS vs accuracy](figures/vas_vs_accuracy.png)",
            "",
            "![visual entropy per layer](figures/visual_entropy_per_layer.png)",
            "",
            "Attention heatmaps, one figure per sample (a row per method):",
            "",
            *[f"![{Path(h).stem}]({h})" for h in grids],
            "",
        ]
    )
    path = out_dir / "report.md"
    path.write_text(text)
    return path
