"""The evaluation harness: a model × methods × benchmarks grid, resumable, written as it goes.

    jaxmm eval --config organism batch_size=4 benchmarks.0.limit=16

Results go to ``<out>/results.jsonl``, one row per (benchmark, sample, method), appended and
flushed batch by batch; a rerun skips the rows already there (a killed run loses at most the batch
in flight). A sample that fails (unreadable image, prompt over ``max_prompt_tokens``) becomes a
row with its ``error`` and the run goes on. Each row holds the prompt, prediction, parsed answer,
score, prompt and completion lengths in tokens (``prompt_tokens``, ``n_tokens``) and per-sample
attention metrics over the generated tokens (mean over tokens, layers and
heads): ``vas`` (AVAR), ``visual_entropy``, ``region_ratio`` where the sample has an evidence box,
and ``visual_entropy_per_layer``. The report (:mod:`jaxmm.eval.report`) is written at the end.

Several processes (after ``jax.distributed.initialize``, e.g. ``jaxmm eval --distributed``) share
the work through files in the shared output directory, no collective on the data path:

* process r of P evaluates samples r, r+P, r+2P, … of every benchmark
  (:func:`jaxmm.sharding.host_samples`), each on its own devices, and appends its rows to
  ``results.rank{r}.jsonl`` (flushed batch by batch, as the single-process file);
* a process r ≠ 0 writes nothing else: its heatmap rows carry the attention map
  (``heatmap_data``) and process 0 renders the figure;
* after a barrier (``multihost_utils.sync_global_devices``) process 0 alone renders those
  heatmaps, merges ``results.jsonl`` and every ``results.rank*.jsonl`` into ``results.jsonl``
  (one row per benchmark/id/method, atomically renamed), writes ``report.md`` and the figures.

Resuming: every process skips the rows in ``results.jsonl`` and in every rank file, so a killed
run resumes with any number of processes; a single-process rerun first merges rank files left by
a multi-process run. A single-process run with no rank files behaves exactly as before.

A run directory is defined by its settings (:func:`run_settings`: model and weights' identity,
dtype, benchmarks, decoding; stored in ``settings.json`` with their hash): resuming it with other
settings raises :class:`SettingsChanged` naming each changed field, or with ``if_changed="new"``
writes to ``<out>-<hash>`` beside it. Methods are columns named with their parameters
(:func:`method_name`), so adding a method or raising a benchmark's ``limit`` extends a run. An
exclusive lock on the directory (``.lock.rank{r}``, one per process) makes a second concurrent run
on it fail at once, whatever the process counts of the two.

A model too large for one process's devices (32B, 72B) is evaluated with ``mesh: {data, fsdp,
tensor}``: the mesh spans every device of every process, the model is placed on it by its logical
axes (:mod:`jaxmm.sharding`) and generation runs as one program over all of them. Every process then
prepares every batch (the same samples, in the same order) and process 0 alone writes the rows to
``results.jsonl``; there are no rank files.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Annotated, Any, Literal, Sequence

import numpy as np
from pydantic import AfterValidator, ConfigDict, Field, InstanceOf
from typing_extensions import NotRequired, TypedDict

from jaxmm import probes as P
from jaxmm.eval.report import method_name
from jaxmm.attention import Intervention
from jaxmm.config import (
    ORGANISM_RANDOM,
    Dtype,
    Fraction,
    GroundedTasks,
    Mesh,
    ModelRef,
    NonNegInt,
    PosFloat,
    PosInt,
    Validated,
    load as load_config,
    mesh_axes,
)
from jaxmm.prompts import get as get_prompt
from jaxmm.eval import scoring


def _benchmark_name(name: str) -> str:
    from jaxmm.eval.benchmarks import READERS

    if name not in READERS:
        raise ValueError(f"unknown benchmark; known: {sorted(READERS)}")
    return name


def _prompt_name(name: str) -> str:
    get_prompt(name)  # ValueError naming the known prompts
    return name


def _method(spec):
    """A method column: ``baseline``, an intervention spec (:func:`jaxmm.interventions.parse`) or
    an intervention object (Python-built configs)."""
    if spec != "baseline" and isinstance(spec, (str, dict)):
        from jaxmm.interventions import parse

        parse(spec)
    return spec


class BenchmarkSpec(TypedDict):
    """One benchmark of an eval config (see :func:`jaxmm.eval.benchmarks.load`)."""

    __pydantic_config__ = ConfigDict(extra="forbid")
    name: Annotated[str, AfterValidator(_benchmark_name)]
    path: NotRequired[str | None]  # parquet/jsonl file, directory or glob (not for grounded)
    limit: NotRequired[PosInt | None]  # the first `limit` samples (None = all; grounded: 64)
    seed: NotRequired[NonNegInt]  # default: the config's seed
    prompt: NotRequired[Annotated[str, AfterValidator(_prompt_name)] | None]
    image_size: NotRequired[PosInt]  # grounded only: square images of this many pixels
    shape_scale: NotRequired[PosFloat]  # grounded only: style of make_sample
    contrast: NotRequired[Fraction]
    tasks: NotRequired[GroundedTasks]  # grounded only: sample i is of task tasks[i % len(tasks)]
    fields: NotRequired[dict[str, str]]  # schema field -> the file's column name (e.g. {question: problem})


MethodSpec = Annotated[str | dict[str, Any] | InstanceOf[Intervention], AfterValidator(_method)]


@dataclasses.dataclass
class EvalConfig(Validated):
    """Schema of the eval configs (``jaxmm/configs/eval/*.yaml``, or any YAML file; dotted
    overrides on the command line). A benchmark spec is ``{name, path, limit, seed, prompt, fields}``
    (plus the grounded generator's ``image_size`` and style; ``fields`` maps schema fields to the
    file's own column names, :func:`jaxmm.eval.benchmarks.read_table`): ``prompt`` names a released prompt of
    :data:`jaxmm.prompts.PROMPTS` (``vrga``, ``vrga_think``, ``sayo``) that replaces the benchmark's
    standard instruction; ``None`` keeps it. The annotations are the schema :meth:`from_yaml`
    and the constructor check (:mod:`jaxmm.config`). ``model`` as in training (:data:`jaxmm.config.ModelRef`):
    ``None`` or ``"organism"`` = the shipped organism, ``"organism-random"`` = the seeded random one.
    ``methods`` may also hold intervention objects when the config is built in Python."""

    __pydantic_config__ = ConfigDict(extra="forbid")

    model: ModelRef = None  # HF checkpoint dir; None (or "organism") = the embedded organism
    dtype: Dtype = "float32"
    out: str = "runs/eval"
    benchmarks: Annotated[list[BenchmarkSpec], Field(min_length=1)] = dataclasses.field(
        default_factory=lambda: [{"name": "grounded", "limit": 40}]
    )
    methods: Annotated[list[MethodSpec], Field(min_length=1)] = dataclasses.field(default_factory=lambda: ["baseline"])
    batch_size: PosInt = 8
    max_new_tokens: PosInt = 16
    max_prompt_tokens: PosInt = 4096
    heatmaps: NonNegInt = 2  # samples per benchmark rendered as attention heatmaps
    seed: NonNegInt = 0
    if_changed: Literal["refuse", "new"] = "refuse"  # resuming `out` with other settings: refuse, or new (out-<hash>)
    min_pixels: PosInt | None = None  # image resolution bounds (pixel counts); None = the checkpoint's
    max_pixels: PosInt | None = None
    mesh: Mesh | None = None  # {data, fsdp, tensor}: one model sharded over every device of
    # every process (see run()); None = a whole model per process

    @classmethod
    def from_yaml(cls, path: str | Path | None, overrides: Sequence[str] = ()) -> "EvalConfig":
        """The config in ``path`` (a YAML file or a packaged config's name, :func:`resolve_config`;
        ``None`` = ``organism``) with ``key=value`` overrides, validated (:func:`jaxmm.config.load`).

        Raises:
            FileNotFoundError: no such file nor packaged config.
            jaxmm.config.ConfigError (a ValueError): bad YAML, a malformed override, an unknown
                field, a bad value (wrong type, out of range, unknown benchmark, prompt or method
                knob), naming the file and line or the override, the field and the value.
        """
        return load_config(cls, resolve_config(path), overrides)


PACKAGED = Path(__file__).resolve().parents[1] / "configs" / "eval"


def resolve_config(name: str | Path | None) -> Path:
    """An eval config: a YAML file's path, or the name of one shipped in the package
    (``jaxmm/configs/eval/<name>.yaml``; ``None`` = ``organism``, the README's main job).

    Raises:
        FileNotFoundError: neither a file nor a packaged name (the packaged names are listed).
    """
    name = "organism" if name is None else name
    path = Path(name)
    if path.exists():
        return path
    packaged = PACKAGED / f"{name}.yaml"
    if path.suffix == "" and len(path.parts) == 1 and packaged.exists():
        return packaged
    known = sorted(p.stem for p in PACKAGED.glob("*.yaml"))
    raise FileNotFoundError(f"eval config {str(name)!r}: no such file, nor a packaged config (packaged: {known})")


def _weights_identity(model_dir) -> list:
    """What identifies a checkpoint's weights without reading them all: each ``*.safetensors``
    file's name, size and a hash of its header (tensor names, shapes, offsets) and of 1 MiB of its
    data at four evenly spaced offsets (so a fine-tune of the same architecture differs), and a
    hash of ``config.json``. The same on every host that holds a copy (no paths, no times)."""
    if model_dir is None or model_dir == ORGANISM_RANDOM:
        return [model_dir or "organism"]
    d = Path(model_dir)
    out = []
    for f in sorted(d.glob("*.safetensors")) + sorted(d.glob("config.json")):
        st = f.stat()
        h = hashlib.sha1()
        with open(f, "rb") as fh:
            head = fh.read(8)
            if f.suffix == ".safetensors" and len(head) == 8:
                h.update(head + fh.read(int.from_bytes(head, "little")))
                for k in range(4):
                    fh.seek(st.st_size * k // 4)
                    h.update(fh.read(1 << 20))
            else:
                h.update(head + fh.read())
        out.append([f.name, st.st_size, h.hexdigest()[:16]])
    return out


def run_settings(cfg: EvalConfig) -> dict:
    """Everything that changes a result row (not ``out``, ``batch_size``, ``heatmaps``; methods are
    columns named with their parameters, so adding one extends a run): the model path and its
    weights' identity, dtype, each benchmark's spec (but its ``limit``: more samples extend a run),
    decoding and prompt limits, image resolution bounds, seed. Not the ``mesh``: the same model
    split another way gives the same rows (up to float rounding)."""
    return {
        "model": cfg.model if cfg.model in (None, ORGANISM_RANDOM) else str(Path(cfg.model).resolve()),
        "weights": _weights_identity(cfg.model),
        "dtype": cfg.dtype,
        "benchmarks": [{k: v for k, v in dict(b).items() if k != "limit"} for b in cfg.benchmarks],
        "max_new_tokens": cfg.max_new_tokens,
        "max_prompt_tokens": cfg.max_prompt_tokens,
        "seed": cfg.seed,
        "min_pixels": cfg.min_pixels,
        "max_pixels": cfg.max_pixels,
    }


def _settings_hash(settings: dict) -> str:
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


class SettingsChanged(ValueError):
    """Resuming an output directory whose rows were made with other settings."""


def _check_settings(out_dir: Path, settings: dict) -> None:
    f = out_dir / "settings.json"
    if not f.exists():
        return
    old = json.loads(f.read_text()).get("settings", {})
    new = json.loads(json.dumps(settings, default=str))  # as stored (tuples as lists, …)
    changed = [k for k in new if old.get(k) != new[k]]
    if changed:
        show = lambda v: json.dumps(v, default=str)[:120]
        what = "; ".join(f"{k}: {show(old.get(k))} -> {show(new[k])}" for k in changed)
        raise SettingsChanged(
            f"{out_dir} holds rows made with other settings ({what}). Use another `out`, "
            "or `if_changed=new` to write a new run directory beside it"
        )


class _Lock:
    """An exclusive, non-blocking ``flock`` on ``<out>/.lock.rank{r}`` for the run's duration."""

    def __init__(self, path: Path):
        import fcntl

        self.path, self.f = path, open(path, "a")
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.f.close()
            raise RuntimeError(
                f"{path.parent} is in use by another jaxmm eval (lock {path.name} is held); "
                "wait for it to finish or use another `out`"
            ) from None

    def release(self):
        self.f.close()


def _repair(path: Path):
    """Drops a partial last line left by a kill mid-write (it would corrupt the next append)."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def _done_rows(path: Path) -> set:
    done = set()
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill: that sample runs again
                continue
            done.add((r["benchmark"], r["id"], r["method"]))
    return done


def _append(path: Path, rows: list[dict]):
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        f.flush()
        os.fsync(f.fileno())


@functools.cache
def _chair():
    from jaxmm.eval.chair import Chair

    return Chair()


def score(sample: dict, prediction: str) -> tuple[Any, float]:
    """``(parsed, score)`` of a completion under the sample's rule (``sample["score"]``, one of
    :data:`jaxmm.eval.scoring.METRIC`): the parsed answer (option letter, yes/no, CHAIR's object
    mentions, or the answer text) and its score in [0, 1] (CHAIR: 1 if any mentioned object is
    hallucinated).

    Raises:
        ValueError: an unknown rule.
    """
    rule = sample["score"]
    if rule == "option_letter":
        parsed = scoring.option_letter(prediction)
        return parsed, float(parsed == sample["answer"])
    if rule == "yes_no":
        parsed = scoring.yes_no(prediction)
        return parsed, float(parsed == sample["answer"])
    if rule == "chair":  # parsed: the caption's object mentions; score: 1 if any is hallucinated
        mentions, cats = _chair().objects(prediction)
        hallucinated = [c for c in cats if c not in set(sample["answer"])]
        return {"mentions": mentions, "categories": cats, "hallucinated": hallucinated}, float(bool(hallucinated))
    parsed = scoring.answer_text(prediction)
    if rule in ("exact", "relaxed"):  # a list of accepted answers: the best match
        rule_fn = scoring.exact if rule == "exact" else scoring.relaxed
        answers = sample["answer"] if isinstance(sample["answer"], list) else [sample["answer"]]
        return parsed, max(rule_fn(prediction, str(a)) for a in answers)
    if rule == "anls":
        return parsed, scoring.anls(prediction, sample["answer"])
    if rule == "vqa":
        return parsed, scoring.vqa(prediction, sample["answer"])
    raise ValueError(f"unknown scoring rule {rule!r}")


def _metrics(out, b, n_tokens, has_box):
    """Means over the generated tokens (t < n), layers and heads of row b."""
    n = max(int(n_tokens), 1)
    get = lambda name: np.asarray(out.probes[name]["text"].values[b, :n], np.float64)  # [T,L,H]
    with np.errstate(invalid="ignore", divide="ignore"):
        vas, ent = get("vas"), get("visual_entropy")
        m = {
            "vas": float(np.nanmean(np.where(np.isfinite(vas), vas, np.nan))),
            "visual_entropy": float(np.mean(ent)),
            "visual_entropy_per_layer": [float(x) for x in ent.mean(axis=(0, 2))],
        }
        if has_box:
            rr = get("region_ratio")
            m["region_ratio"] = float(np.nanmean(np.where(np.isfinite(rr), rr, np.nan)))
    return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in m.items()}


def run(cfg: EvalConfig, progress: bool = True) -> Path:
    """Runs (or resumes) the grid; returns the output directory.

    Multi-host (``jax.process_count() > 1``, after ``jax.distributed.initialize``): process r takes
    samples r, r+P, r+2P, … of every benchmark and appends its rows to ``results.rank{r}.jsonl``;
    after a barrier, process 0 alone renders the other processes' heatmaps, merges every rank file
    into ``results.jsonl`` and writes the report and figures (see the module docstring). Only
    process 0's return value has the report. Single-process runs write ``results.jsonl`` directly.
    With ``cfg.mesh`` one model is sharded over every device of every process, every process runs
    every sample and process 0 alone writes.

    Raises:
        SettingsChanged: ``out`` holds a run with other settings (``if_changed="refuse"``).
        ValueError: a bad ``if_changed`` or ``mesh``, or a mesh that the devices do not fill.
        RuntimeError: another run holds ``out``'s lock.
    """
    import jax

    if cfg.if_changed not in ("refuse", "new"):
        raise ValueError(f"if_changed={cfg.if_changed!r}: expected 'refuse' or 'new'")
    rank, n_proc = jax.process_index(), jax.process_count()
    mesh_axes(cfg.mesh, jax.device_count())  # a bad mesh or prompt name fails before anything is written
    for b in cfg.benchmarks:
        if dict(b).get("prompt") is not None:
            get_prompt(b["prompt"])
    settings = run_settings(cfg)
    out_dir = Path(cfg.out)
    try:
        _check_settings(out_dir, settings)
    except SettingsChanged:
        if cfg.if_changed == "refuse":
            raise
        out_dir = out_dir.with_name(f"{out_dir.name}-{_settings_hash(settings)}")
        _check_settings(out_dir, settings)
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = _Lock(out_dir / f".lock.rank{rank}")
    try:
        return _run(cfg, out_dir, settings, rank, n_proc, progress)
    finally:
        lock.release()


def _run(cfg, out_dir, settings, rank, n_proc, progress):
    import jax

    import jaxmm
    from jaxmm import organism
    from jaxmm.eval import benchmarks as B
    from jaxmm.eval.report import write_report
    from jaxmm.sharding import host_samples, make_mesh

    mesh = None if cfg.mesh is None else make_mesh(**mesh_axes(cfg.mesh, jax.device_count()))
    spmd = mesh is not None and n_proc > 1  # one program over every process: process 0 writes the rows
    if rank == 0:
        written = dataclasses.asdict(cfg)  # an intervention object as a method: by its column name
        written["methods"] = [m if isinstance(m, (str, dict)) else method_name(m) for m in cfg.methods]
        (out_dir / "config.json").write_text(json.dumps(written, indent=2))
        tmp = out_dir / "settings.json.tmp"
        tmp.write_text(json.dumps({"hash": _settings_hash(settings), "settings": settings}, indent=2, default=str))
        tmp.replace(out_dir / "settings.json")
    merged = out_dir / "results.jsonl"
    single_writer = n_proc == 1 or spmd
    resumed_ranks = single_writer and bool(_rank_files(out_dir))
    if resumed_ranks and rank == 0:  # resuming a per-process run with one writer: its rows count as done
        _repair(merged)
        merge_rank_files(out_dir)
    if spmd:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("jaxmm-eval-resume-merged")
    results = merged if single_writer else out_dir / f"results.rank{rank}.jsonl"
    if rank == 0 or not single_writer:
        _repair(results)
    done = _done_rows(results)
    if n_proc > 1 and not spmd:  # rows any process already wrote, whatever the process count was then
        done |= _done_rows(merged).union(*(_done_rows(f) for f in _rank_files(out_dir)))
    model = jaxmm.load(organism.resolve(cfg.model), dtype=cfg.dtype, mesh=mesh)
    model.set_pixels(cfg.min_pixels, cfg.max_pixels)
    nl = model.config.text.num_hidden_layers
    methods = [(method_name(m), () if m == "baseline" else model.interventions([m])) for m in cfg.methods]
    total = 0
    datasets, prompts = [], []
    for spec in cfg.benchmarks:
        spec = dict(spec)
        name = spec.pop("name")
        prompt = spec.pop("prompt", None)
        prompts.append(None if prompt is None else get_prompt(prompt))
        ds = B.load(name, spec.pop("path", None), spec.pop("limit", None), spec.pop("seed", cfg.seed), **spec)
        datasets.append(ds)
        total += len(ds) * len(methods)
    if resumed_ranks and rank == 0:
        render_deferred_heatmaps(out_dir, datasets)
    bar = None
    if progress and (rank == 0 or not spmd):
        from tqdm import tqdm

        bar = tqdm(total=total, desc="eval", unit="sample", dynamic_ncols=True)
    for k, ds in enumerate(datasets):
        for mname, ivs in methods:
            todo = list(range(len(ds)) if spmd else host_samples(len(ds)))
            for start in range(0, len(todo), cfg.batch_size):
                chunk = todo[start : start + cfg.batch_size]
                rows, ok = [], []
                for i in chunk:
                    try:
                        s = ds[i]
                    except Exception as e:  # noqa: BLE001 — unreadable sample: an error row
                        rows.append({"benchmark": "?", "id": f"index-{i}", "method": mname, "error": f"{type(e).__name__}: {e}"})
                        continue
                    if (s["benchmark"], s["id"], mname) in done:
                        continue
                    try:
                        s["image"] = B.decode_image(s["image"])
                        s["_source"] = (k, i)  # for process 0 to render another process's heatmap
                        if prompts[k] is not None:  # a named prompt: its user text and system turn
                            s["question"] = prompts[k].user.format(question=s["raw_question"])
                            s["_system"] = prompts[k].system
                        ok.append(s)
                    except Exception as e:  # noqa: BLE001
                        rows.append(_error_row(s, mname, e))
                if ok:
                    rows += _run_batch(model, ok, mname, ivs, cfg, nl, out_dir, render=rank == 0, mesh=mesh)
                rows = [r for r in rows if (r["benchmark"], r["id"], r["method"]) not in done]
                if rank == 0 or not spmd:
                    _append(results, rows)
                done.update((r["benchmark"], r["id"], r["method"]) for r in rows)
                if bar is not None:
                    bar.update(len(chunk))
    if bar is not None:
        bar.close()
    if spmd:
        multihost_utils.sync_global_devices("jaxmm-eval-rows-written")
        if rank != 0:
            return out_dir
    elif n_proc > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("jaxmm-eval-rows-written")
        if rank == 0:
            render_deferred_heatmaps(out_dir, datasets)
            merge_rank_files(out_dir)
        multihost_utils.sync_global_devices("jaxmm-eval-merged")
        if rank != 0:
            return out_dir
    write_report(out_dir)
    return out_dir


def _rank_files(out_dir: Path) -> list[Path]:
    """Every ``results.rank{r}.jsonl`` in ``out_dir``, by rank (any process count, past or present)."""
    found = []
    for f in Path(out_dir).glob("results.rank*.jsonl"):
        r = f.name[len("results.rank") : -len(".jsonl")]
        if r.isdigit():
            found.append((int(r), f))
    return [f for _, f in sorted(found)]


def render_deferred_heatmaps(out_dir: Path, datasets) -> int:
    """Process 0, after the barrier: renders the heatmaps other processes described in their rank
    files (``heatmap_data``: the attention map, the sample's dataset position and index), reloading
    each image from ``datasets`` (the run's benchmarks, in config order). Skips figures already on
    disk (resume). Returns how many it rendered."""
    from jaxmm.eval import benchmarks as B
    from jaxmm.eval.report import render_heatmap

    n = 0
    for f in _rank_files(out_dir):
        for line in f.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            d = r.get("heatmap_data")
            if d is None or (out_dir / r["heatmap"]).exists():
                continue
            k, i = d["source"]
            image = B.decode_image(datasets[k][i]["image"])
            render_heatmap(image, np.asarray(d["map"], np.float32), out_dir / r["heatmap"], title=d["title"], box=d.get("box"))
            n += 1
    return n


def merge_rank_files(out_dir: Path) -> Path:
    """``results.jsonl`` ∪ every ``results.rank*.jsonl`` -> ``results.jsonl``: one row per
    benchmark/id/method (first seen wins, ``results.jsonl`` first, then ranks in order; a row's
    ``heatmap_data``, the map process 0 renders from, is dropped), in a single-process run's order
    (benchmark and method groups as first seen, samples by index within a group), written to a
    temporary file and renamed. Merges whatever rank files are present, whatever process count
    wrote them."""
    out_dir = Path(out_dir)
    seen, rows, groups = set(), [], {}
    for f in [out_dir / "results.jsonl"] + _rank_files(out_dir):
        if not f.exists():
            continue
        for line in f.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            key = (r.get("benchmark"), r.get("id"), r.get("method"))
            if key in seen:
                continue
            seen.add(key)
            if "heatmap_data" in r:
                del r["heatmap_data"]
                line = json.dumps(r)
            prefix, _, index = str(r.get("id")).rpartition("-")
            group = groups.setdefault((r.get("benchmark"), prefix, r.get("method")), len(groups))
            rows.append(((group, int(index) if index.isdigit() else float("inf"), len(rows)), line))
    tmp = out_dir / "results.jsonl.tmp"
    tmp.write_text("".join(line + "\n" for _, line in sorted(rows, key=lambda kl: kl[0])))
    tmp.replace(out_dir / "results.jsonl")
    return out_dir / "results.jsonl"


def _error_row(s, method, e):
    return {
        "benchmark": s["benchmark"],
        "id": s["id"],
        "method": method,
        "question": s.get("question"),
        "answer": s.get("answer"),
        "error": f"{type(e).__name__}: {e}",
    }


def _run_batch(model, samples, mname, ivs, cfg, nl, out_dir, render=True, mesh=None):
    """Generates for a batch; on failure retries one by one so only the failing samples are lost."""
    try:
        return _generate_rows(model, samples, mname, ivs, cfg, nl, out_dir, render, mesh)
    except Exception as e:  # noqa: BLE001
        if len(samples) == 1:
            return [_error_row(samples[0], mname, e)]
        rows = []
        for s in samples:
            rows += _run_batch(model, [s], mname, ivs, cfg, nl, out_dir, render, mesh)
        return rows


def _generate_rows(model, samples, mname, ivs, cfg, nl, out_dir, render=True, mesh=None):
    """Rows of one batch. ``render=False`` (processes other than 0): a heatmap row carries its map in
    ``heatmap_data`` instead of writing the figure (:func:`render_deferred_heatmaps`)."""
    from jaxmm.eval.report import render_heatmap
    from jaxmm.generate import generate, pai_contrast_for
    from jaxmm.processing import batch as host
    from jaxmm.sharding import on_host

    messages = [
        host.vqa_messages(s["question"], [s["image"]], s["_system"] if "_system" in s else s.get("system")) for s in samples
    ]
    batch, info = host.chat_batch(model, messages)
    if batch.input_ids.shape[1] > cfg.max_prompt_tokens:
        raise ValueError(f"prompt of {batch.input_ids.shape[1]} tokens exceeds max_prompt_tokens={cfg.max_prompt_tokens}")
    boxes, sizes = host.sample_boxes(samples)
    if boxes:
        batch = host.with_region_weights(batch, host.region_weights(model, batch.layout, info["image_grid_thw"], boxes, sizes))
    lay = batch.layout
    index = [s["id"].rsplit("-", 1)[-1] for s in samples]  # heatmaps for samples 0 … heatmaps−1
    drawn = [i.isdigit() and int(i) < cfg.heatmaps for i in index]
    probes = (P.VAS(eps=1e-6), P.VisualEntropy(), P.RegionRatio(eps=1e-12))
    if any(drawn):  # the full last-layer maps [B,T,1,H,K] only for a batch that draws a heatmap
        probes += (P.AttentionWeights(name="last_layer", layers=(nl - 1,)),)
    t0 = time.perf_counter()
    out = generate(
        model.params,
        model.config,
        batch,
        max_new_tokens=cfg.max_new_tokens,
        stop_tokens=host.stop_tokens(model),
        pad_token_id=host.pad_token_id(model),
        interventions=ivs,
        probes=probes,
        mesh=mesh,
        contrast=pai_contrast_for(batch, model.config, ivs),
    )
    out = on_host(out)  # gathered first where a mesh spans processes
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    prompt_tokens = np.asarray(batch.attention_mask).sum(axis=1)
    seconds = (time.perf_counter() - t0) / len(samples)
    rows = []
    heat = np.asarray(out.probes["last_layer"]["text"].values) if any(drawn) else None  # [B,T,1,H,K]
    for b, s in enumerate(samples):
        pred = model.tokenizer.decode(tokens[b, : lengths[b]], skip_special_tokens=True)
        parsed, sc = score(s, pred)
        row = {
            "benchmark": s["benchmark"],
            "id": s["id"],
            "method": mname,
            "task": s.get("task"),
            "question": s["question"],
            "answer": s["answer"],
            "prediction": pred,
            "parsed": parsed,
            "score": sc,
            "metric": scoring.METRIC[s["score"]],
            "n_tokens": int(lengths[b]),
            "prompt_tokens": int(prompt_tokens[b]),
            "seconds": seconds,
        }
        row.update(_metrics(out, b, lengths[b], b in boxes))
        if drawn[b]:
            img_keys = np.asarray(lay.image_mask[b])
            first = np.asarray(lay.grid_pos[b])[img_keys][:, 0] == 0  # frame 0 (LLaVA-NeXT: the base image)
            att = heat[b, : max(int(lengths[b]), 1), 0].mean(axis=(0, 1))[: img_keys.shape[0]][img_keys][first]
            gh, gw = (int(x) for x in np.asarray(lay.grid_hw[b])[img_keys][0])
            fig = out_dir / "figures" / f"heatmap_{s['benchmark']}_{s['id']}_{mname.replace(':', '_').replace(',', '_')}.png"
            title = f"{s['id']} · {mname} · Q: {s['question']} · answer: {s['answer']} · prediction: {pred}"
            if render:
                render_heatmap(s["image"], att.reshape(gh, gw), fig, title=title, box=s.get("box"))
            row["heatmap"] = str(fig.relative_to(out_dir))
            if not render:
                row["heatmap_data"] = {
                    "map": att.reshape(gh, gw).tolist(),
                    "title": title,
                    "box": [[float(v) for v in b] for b in host.boxes_of(s.get("box"))] or None,
                    "source": list(s["_source"]),
                }
        rows.append(row)
    return rows
