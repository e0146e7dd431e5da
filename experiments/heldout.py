"""Held-out evaluation shared by the experiments: accuracy per task type, VAS and region ratio, per
method, on grounded samples of seed 1 (the organism and every fine-tuning run train on seeds 0/2)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

TASKS = ("recognition", "counting", "grounding", "ocr", "spatial")
STYLE = {"image_size": 112, "shape_scale": 0.35, "contrast": 0.5}  # the organism's training style


def evaluate(model: str, methods: list, out: str | Path, n: int = 250, batch_size: int = 25, style: dict | None = None) -> dict:
    """Runs (or resumes) ``jaxmm eval`` (grounded, in ``style``, default :data:`STYLE`) and returns
    ``{method: {"tasks": {task: acc}, "all", "vas",
    "region_ratio", "n"}}`` (accuracies in [0, 1])."""
    import numpy as np

    from jaxmm.eval.harness import EvalConfig, run
    from jaxmm.eval.report import load_rows

    cfg = EvalConfig(
        model=str(model),
        out=str(out),
        methods=methods,
        batch_size=batch_size,
        max_new_tokens=16,
        heatmaps=0,
        benchmarks=[{"name": "grounded", "limit": n, "seed": 1, **(style or STYLE)}],
    )
    rows = [r for r in load_rows(run(cfg, progress=True)) if "error" not in r]
    by = defaultdict(list)
    for r in rows:
        by[r["method"]].append(r)
    out = {}
    for m, rs in by.items():
        per = defaultdict(list)
        for r in rs:
            per[r["task"]].append(r["score"])
        mean = lambda k: float(np.mean([r[k] for r in rs if r.get(k) is not None]))
        out[m] = {
            "tasks": {t: float(np.mean(per[t])) for t in TASKS if per[t]},
            "all": float(np.mean([r["score"] for r in rs])),
            "vas": mean("vas"),
            "region_ratio": mean("region_ratio"),
            "n": len(rs),
        }
    return out


def table(results: dict, names: dict | None = None) -> list[str]:
    """Markdown rows: one line per method, accuracy per task, all, VAS, region ratio."""
    lines = ["| model / method | " + " | ".join(TASKS) + " | all | VAS | region ratio | n |", "|---|" + "---|" * (len(TASKS) + 4)]
    for m, r in results.items():
        cells = [f"{100 * r['tasks'].get(t, float('nan')):.1f}" for t in TASKS]
        lines.append(
            f"| {(names or {}).get(m, m)} | "
            + " | ".join(cells)
            + f" | {100 * r['all']:.1f} | {r['vas']:.3f} | {r['region_ratio']:.3f} | {r['n']} |"
        )
    return lines
