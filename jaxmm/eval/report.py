"""Evaluation report: ``report.md`` with accuracy and attention tables, and PNG figures.

Figures (``figures/``): attention heatmaps over the image for chosen samples and methods (written
by the harness as it goes), ``vas_vs_accuracy.png`` (per method and benchmark) and
``visual_entropy_per_layer.png`` (mean over samples, per method).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def render_heatmap(image, attention: np.ndarray, path: Path, title: str = "", box=None):
    """Overlays a merged-grid attention map [rows, cols] on ``image`` (PIL) and saves a PNG."""
    plt = _plt()
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = image.size
    fig, axes = plt.subplots(1, 2, figsize=(7, 3.6))
    axes[0].imshow(image)
    axes[0].set_title("image", fontsize=9)
    axes[1].imshow(image)
    axes[1].imshow(attention, cmap="jet", alpha=0.5, extent=(0, w, h, 0), interpolation="nearest")
    axes[1].set_title(f"attention of generated tokens\n(last layer, mean over heads) {title}", fontsize=8)
    if box is not None:
        from matplotlib.patches import Rectangle

        for ax in axes:
            ax.add_patch(Rectangle((box[0], box[1]), box[2] - box[0], box[3] - box[1], fill=False, color="white", lw=1.5))
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def load_rows(out_dir: Path) -> list[dict]:
    rows = []
    for line in (Path(out_dir) / "results.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def summarize(rows: list[dict]) -> dict:
    """{(benchmark, method): {"accuracy", "n", "errors", "vas", "visual_entropy", "region_ratio", "per_layer"}}."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["benchmark"], r["method"])].append(r)
    out = {}
    for key, rs in groups.items():
        ok = [r for r in rs if "error" not in r]
        mean = lambda k: float(np.mean([r[k] for r in ok if r.get(k) is not None])) if any(r.get(k) is not None for r in ok) else None
        layers = [r["visual_entropy_per_layer"] for r in ok if r.get("visual_entropy_per_layer")]
        out[key] = {"accuracy": mean("score"), "n": len(ok), "errors": len(rs) - len(ok), "vas": mean("vas"),
                    "visual_entropy": mean("visual_entropy"), "region_ratio": mean("region_ratio"),
                    "per_layer": np.mean(layers, 0).tolist() if layers else None}
    return out


def _fmt(x, pct=False):
    if x is None:
        return "–"
    return f"{100 * x:.1f}" if pct else f"{x:.3f}"


def table(summary: dict) -> str:
    """Markdown accuracy table, benchmark × method, with deltas against ``baseline``."""
    benches = sorted({b for b, _ in summary})
    methods = []
    for _, m in summary:
        if m not in methods:
            methods.append(m)
    methods.sort(key=lambda m: (m != "baseline", m))
    lines = ["| benchmark | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for b in benches:
        base = summary.get((b, "baseline"), {}).get("accuracy")
        cells = []
        for m in methods:
            s = summary.get((b, m))
            if s is None:
                cells.append("–")
                continue
            cell = _fmt(s["accuracy"], pct=True)
            if m != "baseline" and base is not None and s["accuracy"] is not None:
                cell += f" ({100 * (s['accuracy'] - base):+.1f})"
            if s["errors"]:
                cell += f" [{s['errors']} err]"
            cells.append(cell)
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    rows = load_rows(out_dir)
    summary = summarize(rows)
    plt = _plt()
    figs = out_dir / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    # VAS against accuracy
    fig, ax = plt.subplots(figsize=(5, 4))
    for (b, m), s in sorted(summary.items()):
        if s["vas"] is not None and s["accuracy"] is not None:
            ax.scatter(s["vas"], 100 * s["accuracy"])
            ax.annotate(f"{m} · {b}", (s["vas"], 100 * s["accuracy"]), fontsize=7)
    ax.set_xlabel("VAS (image / system attention, mean over generated tokens)")
    ax.set_ylabel("accuracy (%)")
    fig.tight_layout()
    fig.savefig(figs / "vas_vs_accuracy.png", dpi=100)
    plt.close(fig)
    # visual entropy per layer
    fig, ax = plt.subplots(figsize=(5, 4))
    for (b, m), s in sorted(summary.items()):
        if s["per_layer"]:
            ax.plot(range(len(s["per_layer"])), s["per_layer"], marker="o", label=f"{m} · {b}")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("visual entropy H_V (nats)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(figs / "visual_entropy_per_layer.png", dpi=100)
    plt.close(fig)
    attn = ["| benchmark | method | n | VAS | visual entropy | region ratio |", "|---|---|---|---|---|---|"]
    for (b, m), s in sorted(summary.items()):
        attn.append(f"| {b} | {m} | {s['n']} | {_fmt(s['vas'])} | {_fmt(s['visual_entropy'])} | {_fmt(s['region_ratio'])} |")
    heatmaps = sorted({r["heatmap"] for r in rows if r.get("heatmap")})
    cfg = json.loads((out_dir / "config.json").read_text()) if (out_dir / "config.json").exists() else {}
    text = "\n".join([
        "# Evaluation report", "",
        f"Model: `{cfg.get('model') or 'embedded organism'}` · rows: {len(rows)} · "
        f"errors: {sum('error' in r for r in rows)}", "",
        "## Accuracy (%) — delta against baseline in parentheses", "", table(summary), "",
        "## Attention (means over samples; per sample: over generated tokens, layers, heads)", "", "\n".join(attn), "",
        "## Figures", "", "![VAS vs accuracy](figures/vas_vs_accuracy.png)", "",
        "![visual entropy per layer](figures/visual_entropy_per_layer.png)", "",
        *[f"![{Path(h).stem}]({h})" for h in heatmaps], ""])
    path = out_dir / "report.md"
    path.write_text(text)
    return path
