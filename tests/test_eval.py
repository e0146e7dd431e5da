"""Evaluation: readers on fixture files in each benchmark's schema, scorers, resume, error rows,
and an end-to-end grid on a tiny model."""

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import tiny
from jaxmm.data.grounded import TASKS, generate_samples, make_sample
from jaxmm.eval import benchmarks as B
from jaxmm.eval import scoring as S
from jaxmm.eval.harness import EvalConfig, SettingsChanged, _Lock, method_name, run
from jaxmm.eval.report import load_rows, summarize, table


def png_bytes(name="coffee", size=(64, 48)):
    buf = io.BytesIO()
    tiny.photos()[name].convert("RGB").resize(size).save(buf, format="PNG")
    return buf.getvalue()


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


SCHEMAS = {
    "mmstar": (
        {
            "index": 7,
            "question": "Which animal?\nOptions: A: cat, B: dog",
            "answer": "A",
            "category": "coarse perception",
            "l2_category": "image scene",
            "image": {"bytes": None, "path": None},
        },
        "B",
        "option_letter",
    ),
    "mmbench": (
        {
            "index": 3,
            "question": "What is shown?",
            "hint": "nan",
            "A": "a cup",
            "B": "a car",
            "C": "a dog",
            "D": "nan",
            "answer": "A",
            "category": "object",
            "image": None,
        },
        "C. a dog",
        "option_letter",
    ),
    "mathvista": (
        {
            "pid": "12",
            "question": "What is the value?",
            "choices": None,
            "answer": "3",
            "question_type": "free_form",
            "answer_type": "integer",
            "query": "Hint: answer with an integer.\nWhat is the value?",
            "image": None,
        },
        "3",
        "exact",
    ),
    "pope": (
        {
            "question_id": "5",
            "question": "Is there a cup in the image?",
            "answer": "yes",
            "category": "adversarial",
            "image": None,
        },
        "no",
        "yes_no",
    ),
    "hallusionbench": (
        {
            "category": "VD",
            "subcategory": "illusion",
            "set_id": 1,
            "figure_id": 0,
            "question_id": 2,
            "question": "Is the left line longer?",
            "gt_answer": "1",
            "image": None,
        },
        "yes",
        "yes_no",
    ),
    "chartqa": ({"id": 4, "query": "What is the peak value?", "label": "41.5", "type": "human", "image": None}, "42", "relaxed"),
    "textvqa": (
        {"question_id": 9, "question": "What brand?", "answers": ["nike"] * 7 + ["adidas"] * 3, "image": None},
        "nike",
        "vqa",
    ),
    "docvqa": (
        {"questionId": 11, "question": "What is the date?", "answers": ["May 5, 1999", "5 May 1999"], "image": None},
        "may 5 1999",
        "anls",
    ),
    "vqa": ({"id": 5, "question": "<image>What animal?", "answer": "cat", "image": None}, "cat", "exact"),
}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_readers_parquet_and_jsonl(tmp_path, name):
    row, _, rule = SCHEMAS[name]
    row = dict(row, image={"bytes": png_bytes(), "path": None})
    ds = B.load(name, write_parquet(tmp_path / f"{name}.parquet", [row]))
    s = ds[0]
    assert len(ds) == 1 and s["score"] == rule and s["benchmark"] == name and s["question"]
    assert B.decode_image(s["image"]).size == (64, 48)
    # JSONL + image folder
    (tmp_path / "images").mkdir(exist_ok=True)
    (tmp_path / "images" / "a.png").write_bytes(png_bytes())
    jrow = dict(row, image="images/a.png")
    (tmp_path / f"{name}.jsonl").write_text(json.dumps(jrow) + "\n")
    s2 = B.load(name, tmp_path / f"{name}.jsonl")[0]
    assert B.decode_image(s2["image"]).size == (64, 48) and s2["id"] == s["id"]
    if name == "mmbench":
        assert "A. a cup" in s["question"] and "D." not in s["question"]
    if name == "hallusionbench":
        assert s["answer"] == "yes"


_IDS_SCRIPT = """
import json, sys
from jaxmm.eval import benchmarks as B
ds = B.load("chartqa", sys.argv[1])
print(json.dumps({"ids": [ds[i]["id"] for i in range(len(ds))], "hash": hash(ds[0]["question"])}))
"""


def test_ids_without_a_field_are_the_same_in_every_process(tmp_path):
    """HF's ChartQA exports have no id column: the id must not depend on the process's str-hash salt
    (resume and multi-host merges key rows by id)."""
    import os
    import subprocess
    import sys

    q1, q2 = "What is the peak value?", "What is the lowest value?"
    img1, img2 = {"bytes": png_bytes("coffee"), "path": None}, {"bytes": png_bytes("chelsea"), "path": None}
    rows = [
        {"query": q1, "label": "41.5", "type": "human", "image": img1},
        {"query": q2, "label": "3", "type": "human", "image": img1},  # another question
        {"query": q1, "label": "7", "type": "human", "image": img2},  # another chart
        {"query": q1, "label": "41.5", "type": "human", "image": img1},
    ]  # a duplicate row
    data = write_parquet(tmp_path / "chartqa.parquet", rows)
    runs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", _IDS_SCRIPT, str(data)], env=env, capture_output=True, text=True, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert runs[0]["hash"] != runs[1]["hash"]  # the salt differs between the two processes
    ids = runs[0]["ids"]
    assert runs[1]["ids"] == ids and len(set(ids)) == 4
    digest = [i.rsplit("-", 1)[0] for i in ids]  # question and image part; the row index follows
    assert len(set(digest[:3])) == 3 and digest[3] == digest[0]
    assert ids == [s["id"] for s in B.load("chartqa", data)]
    assert B.load("chartqa", write_parquet(tmp_path / "one.parquet", [dict(rows[0], id=12)]))[0]["id"] == "12"


def test_reader_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.parquet"):
        B.load("pope", tmp_path / "missing.parquet")
    bad = write_parquet(tmp_path / "pope.parquet", [{"question": "x"}])
    with pytest.raises(ValueError, match="pope.*question_id"):
        B.load("pope", bad)[0]
    with pytest.raises(ValueError, match="unknown benchmark"):
        B.load("mmmu", bad)


def test_scorers():
    assert S.option_letter("(B) a dog") == "B" and S.option_letter("The answer is C.") == "C"
    assert S.option_letter("<answer>D</answer>") == "D" and S.option_letter("none") is None
    assert S.exact("The Square.", "square") == 1.0 and S.exact("3", "3.0") == 1.0 and S.exact("circle", "square") == 0.0
    assert S.relaxed("42", "41.5") == 1.0 and S.relaxed("45", "41.5") == 0.0 and S.relaxed("yes", "Yes") == 1.0
    assert S.anls("may 5, 1999", ["May 5, 1999"]) == 1.0
    assert 0 < S.anls("may 5 1999", ["May 5, 1999"]) < 1 and S.anls("xyz", ["May 5, 1999"]) == 0.0
    assert S.yes_no("Yes, there is.") == "yes" and S.yes_no("maybe") is None
    assert S.vqa("nike", ["nike"] * 2 + ["x"] * 8) == pytest.approx(2 / 3) and S.vqa("Nike", ["nike"] * 4) == 1.0


def test_grounded_generator_is_deterministic_and_boxed():
    a, b = generate_samples(10, seed=3), generate_samples(10, seed=3)
    assert [s["question"] for s in a] == [s["question"] for s in b]
    assert all(np.array_equal(np.asarray(x["image"]), np.asarray(y["image"])) for x, y in zip(a, b))
    assert {s["task"] for s in a} == {"recognition", "counting", "grounding", "ocr", "spatial"}
    for s in a:
        x0, y0, x1, y1 = s["box"]
        assert 0 <= x0 < x1 <= 224 and 0 <= y0 < y1 <= 224
    c = make_sample(1, seed=4, task="counting")
    assert c["answer"] in {"1", "2", "3", "4"} and c["task"] == "counting"
    assert make_sample(0, seed=3)["image"].size == (224, 224) and a[0]["id"] != make_sample(0, seed=4)["id"]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from chat_fixtures import build_tokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    path = tmp_path_factory.mktemp("evalmodel")
    tiny.save_hf_model("gqa_untied", path, seed=2)
    build_tokenizer(path)
    Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=112 * 112).save_pretrained(path)
    return path


def test_end_to_end_grid_report_and_figures(tiny_model_dir, tmp_path):
    cfg = EvalConfig(
        model=str(tiny_model_dir),
        out=str(tmp_path / "run"),
        benchmarks=[{"name": "grounded", "limit": 8}],
        methods=["baseline", "vrga", {"method": "avar", "alpha_sys": 0.05}],
        batch_size=4,
        max_new_tokens=6,
        heatmaps=2,
    )
    out = run(cfg, progress=False)
    rows = load_rows(out)
    assert len(rows) == 24 and all("error" not in r for r in rows)
    assert {r["method"] for r in rows} == {"baseline", "vrga", "avar:alpha_sys=0.05"}
    for r in rows:
        assert r["score"] in (0.0, 1.0) and r["vas"] is not None and r["region_ratio"] is not None
        assert len(r["visual_entropy_per_layer"]) == 3
    report = (out / "report.md").read_text()
    assert "| grounded |" in report and "vas_vs_accuracy.png" in report
    figs = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert "vas_vs_accuracy.png" in figs and "visual_entropy_per_layer.png" in figs
    assert sum(f.startswith("heatmap_") for f in figs) == 2 * 3
    # config order (not sorted), the benchmark's metric named, one grid per sample stacking 3 methods
    assert "| benchmark | metric (%) | baseline | vrga | avar:alpha_sys=0.05 |" in report
    assert "| grounded | exact match | " in report
    from PIL import Image

    grids = [f for f in figs if f.startswith("grid_grounded_")]
    assert len(grids) == 2 and all(f"figures/{g}" in report for g in grids)
    one = Image.open(out / "figures" / next(f for f in figs if f.startswith("heatmap_")))
    assert Image.open(out / "figures" / grids[0]).size == (one.width, 3 * one.height)


def test_the_score_table_names_each_metric_and_counts_unparsed_answers():
    """Each benchmark's row names its own metric; unparsed answers and errors are counted; the
    orders are the ones given."""
    row = lambda b, m, metric, score, parsed="x", **kw: dict(
        benchmark=b, method=m, metric=metric, score=score, parsed=parsed, **kw
    )
    rows = [
        row("mmstar", "baseline", "accuracy", 1.0, "A"),
        row("mmstar", "baseline", "accuracy", 0.0, None),
        row("mmstar", "pai", "accuracy", 1.0, "A"),
        row("mmstar", "pai", "accuracy", 1.0, "B"),
        row("chartqa", "baseline", "relaxed accuracy", 1.0),
        row("chartqa", "pai", "relaxed accuracy", 0.0),
        row("docvqa", "baseline", "ANLS", 0.75),
        row("docvqa", "pai", "ANLS", 0.5),
        dict(benchmark="docvqa", method="pai", error="ValueError: bad image"),
    ]
    t = table(summarize(rows), ["mmstar", "chartqa", "docvqa"], ["pai", "baseline"]).splitlines()
    assert t[0] == "| benchmark | metric (%) | pai | baseline |"
    assert t[2] == "| mmstar | accuracy | 100.0 (+50.0) | 50.0 [1 unparsed] |"
    assert t[3] == "| chartqa | relaxed accuracy | 0.0 (-100.0) | 100.0 |"
    assert t[4] == "| docvqa | ANLS | 50.0 (-25.0) [1 err] | 75.0 |"
    # per task, wide: a column per method, deltas against baseline, unparsed answers counted
    from jaxmm.eval.report import score_tables

    for r, task in zip(rows, ["coarse", "fine", "coarse", "fine"]):
        r["task"] = task
    text = score_tables(
        rows, {"benchmarks": [{"name": "mmstar"}, {"name": "chartqa"}, {"name": "docvqa"}], "methods": ["pai", "baseline"]}
    )
    assert "| mmstar | coarse | 1 | 100.0 (+0.0) | 100.0 |" in text
    assert "| mmstar | fine | 1 | 100.0 (+100.0) | 0.0 [1 unparsed] |" in text
    assert text.index("## Scores (%)") < text.index("## Scores per task (%)") and "POPE" not in text


def test_resume_after_a_kill_and_error_rows(tiny_model_dir, tmp_path):
    # a benchmark file whose second image is unreadable
    rows = [
        dict(SCHEMAS["pope"][0], question_id=str(i), image={"bytes": png_bytes() if i != 1 else b"not a png", "path": None})
        for i in range(6)
    ]
    data = write_parquet(tmp_path / "pope.parquet", rows)
    cfg = EvalConfig(
        model=str(tiny_model_dir),
        out=str(tmp_path / "run"),
        benchmarks=[{"name": "pope", "path": str(data)}],
        methods=["baseline", "pai"],
        batch_size=2,
        max_new_tokens=4,
        heatmaps=0,
    )
    out = run(cfg, progress=False)
    full = load_rows(out)
    assert len(full) == 12
    errors = [r for r in full if "error" in r]
    assert len(errors) == 2 and all(r["id"] == "1" for r in errors)
    assert "UnidentifiedImageError" in errors[0]["error"]
    # simulate a kill: keep the first 5 rows and half of the sixth line, then rerun
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text("\n".join(lines[:5]) + "\n" + lines[5][: len(lines[5]) // 2])
    run(cfg, progress=False)
    again = load_rows(out)
    keys = [(r["benchmark"], r["id"], r["method"]) for r in again]
    assert len(keys) == len(set(keys)) == 12
    by_key = {(r["id"], r["method"]): r.get("prediction") for r in again}
    assert by_key == {(r["id"], r["method"]): r.get("prediction") for r in full}


def test_eval_config_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("benchmarks:\n  - {name: grounded, limit: 40}\nmethods: [baseline]\n")
    cfg = EvalConfig.from_yaml(p, ["benchmarks.0.limit=8", "batch_size=2", "methods=[baseline, vrga]"])
    assert cfg.benchmarks[0]["limit"] == 8 and cfg.batch_size == 2 and cfg.methods == ["baseline", "vrga"]
    with pytest.raises(ValueError, match="unknown field"):
        EvalConfig.from_yaml(p, ["batchsize=2"])


def test_over_long_prompts_become_error_rows(tiny_model_dir, tmp_path):
    cfg = EvalConfig(
        model=str(tiny_model_dir),
        out=str(tmp_path / "run"),
        benchmarks=[{"name": "grounded", "limit": 3}],
        methods=["baseline"],
        batch_size=3,
        max_new_tokens=2,
        heatmaps=0,
        max_prompt_tokens=10,
    )
    rows = load_rows(run(cfg, progress=False))
    assert len(rows) == 3 and all("max_prompt_tokens" in r["error"] for r in rows)
    assert "[3 err]" in table(summarize(rows))


def test_stop_token_ids():
    from types import SimpleNamespace as NS

    from jaxmm.stopping import stop_token_ids

    assert stop_token_ids(NS(eos_token_id=(1, 7)), NS(eos_token_id=9)) == (1, 7, 9)
    assert stop_token_ids(NS(eos_token_id=(1, 7)), NS(eos_token_id=7)) == (1, 7)  # already there: once
    assert stop_token_ids(NS(eos_token_id=(1,)), NS(eos_token_id=None)) == (1,)  # no tokenizer eos
    assert stop_token_ids(NS(eos_token_id=(1,))) == (1,)
    assert stop_token_ids(NS(eos_token_id=None), NS(eos_token_id=3)) == (3,)
    assert stop_token_ids(NS(eos_token_id=[5, 5, 2]), object()) == (5, 2)  # HF-style list; no attribute
    ids = stop_token_ids(NS(eos_token_id=np.int64(4)), NS(eos_token_id=np.int32(6)))
    assert ids == (4, 6) and all(type(i) is int for i in ids)


def test_tokenizer_without_eos_evaluates(tmp_path):
    """A tokenizer with no eos token (eos_token_id None) stops on the config's eos alone: no error row."""
    import shutil

    from jaxmm import organism
    from jaxmm.processing.chat import load_tokenizer

    model = tmp_path / "organism"
    shutil.copytree(organism.default(), model)
    tc = json.loads((model / "tokenizer_config.json").read_text())
    tc.pop("eos_token")
    (model / "tokenizer_config.json").write_text(json.dumps(tc))
    assert load_tokenizer(model).eos_token_id is None
    cfg = EvalConfig(
        model=str(model),
        out=str(tmp_path / "run"),
        benchmarks=[{"name": "grounded", "limit": 1}],
        methods=["baseline"],
        batch_size=1,
        max_new_tokens=2,
        heatmaps=0,
    )
    rows = load_rows(run(cfg, progress=False))
    assert len(rows) == 1 and "error" not in rows[0], rows
    assert rows[0]["prediction"] is not None and 1 <= rows[0]["n_tokens"] <= 2


def test_resume_refuses_other_settings_and_a_second_concurrent_run(tiny_model_dir, tmp_path):
    cfg = EvalConfig(
        model=str(tiny_model_dir),
        out=str(tmp_path / "run"),
        benchmarks=[{"name": "grounded", "limit": 2}],
        methods=["baseline"],
        batch_size=2,
        max_new_tokens=3,
        heatmaps=0,
    )
    out = run(cfg, progress=False)
    assert len(load_rows(out)) == 2
    # more samples and another method extend the same run
    more = EvalConfig(**{**cfg.__dict__, "benchmarks": [{"name": "grounded", "limit": 3}], "methods": ["baseline", "pai"]})
    assert len(load_rows(run(more, progress=False))) == 6
    # a setting that changes rows is refused, naming the field and both values
    short = EvalConfig(**{**cfg.__dict__, "max_new_tokens": 1})
    with pytest.raises(SettingsChanged, match=r"max_new_tokens: 3 -> 1"):
        run(short, progress=False)
    styled = EvalConfig(**{**cfg.__dict__, "benchmarks": [{"name": "grounded", "limit": 2, "contrast": 0.9}]})
    with pytest.raises(SettingsChanged, match="benchmarks"):
        run(styled, progress=False)
    assert len(load_rows(out)) == 6  # nothing was written
    # ... or written beside it when asked
    new = run(EvalConfig(**{**short.__dict__, "if_changed": "new"}), progress=False)
    assert new != out and new.name.startswith("run-") and len(load_rows(new)) == 2
    assert json.loads((new / "settings.json").read_text())["settings"]["max_new_tokens"] == 1
    # a second run on a directory in use fails at once
    held = _Lock(out / ".lock.rank0")
    try:
        with pytest.raises(RuntimeError, match="in use by another jaxmm eval"):
            run(cfg, progress=False)
    finally:
        held.release()
    run(cfg, progress=False)  # free again


def test_duplicate_ids_and_wrong_schema_fail_at_load(tmp_path):
    rows = [dict(SCHEMAS["pope"][0], question_id=str(i), image={"bytes": png_bytes(), "path": None}) for i in (0, 1, 0)]
    with pytest.raises(ValueError, match=r"dup.parquet: id '0' appears in rows 0 and 2"):
        B.load("pope", write_parquet(tmp_path / "dup.parquet", rows))
    mmstar = write_parquet(tmp_path / "mmstar.parquet", [dict(SCHEMAS["mmstar"][0])])
    with pytest.raises(ValueError, match=r"mmstar.parquet: pope: a row lacks the field .* \(first row"):
        B.load("pope", mmstar)


def test_method_columns_carry_their_parameters():
    from jaxmm.interventions import KeyLogitShift

    assert method_name({"method": "avar", "alpha_sys": 0.05}) == "avar:alpha_sys=0.05"
    a, b = method_name(KeyLogitShift(delta=0.5)), method_name(KeyLogitShift(delta=50.0))
    assert a != b and "delta=0.5" in a and "delta=50.0" in b
    from jaxmm.interventions import HeadMask

    m1, m2 = np.zeros(12, np.float32), np.zeros(12, np.float32)
    m2[10] = 1.0  # differs only after the 8 shown entries
    n1, n2 = (method_name(HeadMask(mask=m, num_heads=4)) for m in (m1, m2))
    assert n1 != n2 and n1.startswith("headmask:mask=[0 0 0 0 0 0 0 0 … #")
    assert method_name(HeadMask(mask=m1.copy(), num_heads=4)) == n1


def test_an_intervention_object_with_array_fields_is_a_method_column(tiny_model_dir, tmp_path):
    """A HeadMask (an array field) in ``methods``: the run writes config.json and the report, the
    column is named by the object's fields, and masking every head changes the answers."""
    import json

    from jaxmm.eval.report import load_rows
    from jaxmm.interventions import HeadMask

    h = 4
    every = HeadMask(mask=np.ones(3 * h, np.float32), num_heads=h)  # 3 layers x 4 heads
    cfg = EvalConfig(
        model=str(tiny_model_dir),
        out=str(tmp_path / "run"),
        methods=["baseline", every],
        benchmarks=[{"name": "grounded", "limit": 3, "image_size": 56}],
        max_new_tokens=4,
        heatmaps=0,
    )
    rows = load_rows(run(cfg, progress=False))
    assert {r["method"] for r in rows} == {"baseline", method_name(every)} and all("error" not in r for r in rows)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["methods"] == ["baseline", method_name(every)]
    assert method_name(every) in (tmp_path / "run" / "report.md").read_text()
    by = {m: [r["prediction"] for r in rows if r["method"] == m] for m in ("baseline", method_name(every))}
    assert by["baseline"] != by[method_name(every)]


def test_pope_metrics_equal_a_hand_computation():
    from jaxmm.eval.report import pope_metrics, task_accuracy

    # (split, answer, parsed prediction): adversarial TP=2 FP=1 FN=1 TN=1 + 1 unparsed (gt yes)
    cases = [
        ("adversarial", "yes", "yes"),
        ("adversarial", "yes", "yes"),
        ("adversarial", "no", "yes"),
        ("adversarial", "yes", "no"),
        ("adversarial", "no", "no"),
        ("adversarial", "yes", None),
        ("random", "no", "no"),
        ("random", "yes", "yes"),
    ]
    rows = [
        {"benchmark": "pope", "id": str(i), "method": "baseline", "task": t, "answer": a, "parsed": p, "score": float(p == a)}
        for i, (t, a, p) in enumerate(cases)
    ]
    rows.append({"benchmark": "pope", "id": "e", "method": "baseline", "task": "random", "error": "x"})
    m = pope_metrics(rows)
    adv = m[("baseline", "adversarial")]
    prec, rec = 2 / 3, 2 / 3  # TP / (TP + FP), TP / (TP + FN): FN counts "no" only
    assert adv["n"] == 6 and adv["unparsed"] == 1
    np.testing.assert_allclose(
        [adv["accuracy"], adv["precision"], adv["recall"], adv["f1"], adv["yes_ratio"]],
        [3 / 6, prec, rec, 2 * prec * rec / (prec + rec), 3 / 6],
    )
    assert m[("baseline", "random")] == {
        "n": 2,
        "accuracy": 1.0,
        "precision": 1.0,
        "recall": 1.0,
        "f1": 1.0,
        "yes_ratio": 0.5,
        "unparsed": 0,
    }
    assert m[("baseline", "all")]["n"] == 8 and m[("baseline", "all")]["precision"] == 3 / 4
    t = task_accuracy(rows)
    assert t[("pope", "adversarial", "baseline")] == {"accuracy": 0.5, "n": 6, "unparsed": 1}


def test_packaged_config_resolves_by_name_from_any_directory(tmp_path, monkeypatch):
    from jaxmm.eval.harness import resolve_config

    monkeypatch.chdir(tmp_path)
    cfg = EvalConfig.from_yaml("organism", ["benchmarks.0.limit=3"])
    assert cfg.model is None and cfg.benchmarks[0]["limit"] == 3 and "ration" in cfg.methods
    assert EvalConfig.from_yaml(None) == EvalConfig.from_yaml("organism")  # no config = the README's job
    with pytest.raises(FileNotFoundError, match=r"'organsim'.*packaged: \[.*'organism'.*\]"):
        resolve_config("organsim")
    (tmp_path / "mine.yaml").write_text("methods: [baseline]\n")
    assert EvalConfig.from_yaml("mine.yaml").methods == ["baseline"]


def test_a_directory_or_glob_of_parquet_shards_is_one_benchmark(tmp_path):
    rows = [dict(SCHEMAS["pope"][0], question_id=str(i), image={"bytes": png_bytes(), "path": None}) for i in range(5)]
    d = tmp_path / "pope"
    d.mkdir()
    write_parquet(d / "test-00000-of-00002.parquet", rows[:3])
    write_parquet(d / "test-00001-of-00002.parquet", rows[3:])
    for path in (d, str(d / "test-*.parquet")):
        ds = B.load("pope", path)
        assert [ds[i]["id"] for i in range(len(ds))] == ["0", "1", "2", "3", "4"]
    write_parquet(d / "test-00002-of-00002.parquet", rows[1:2])  # a shard repeating an id
    with pytest.raises(ValueError, match="id '1' appears in rows 1 and 5"):
        B.load("pope", d)
    with pytest.raises(FileNotFoundError, match="no .parquet or .jsonl"):
        B.load("pope", str(tmp_path / "none-*.parquet"))


def test_weights_identity_tells_a_fine_tune_from_its_base(tiny_model_dir, tmp_path):
    import shutil

    from jaxmm.eval.harness import _weights_identity

    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    assert _weights_identity(copy) == _weights_identity(tiny_model_dir)  # a copy (other path, times)
    f = copy / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same header, one weight byte
    f.write_bytes(bytes(data))
    assert _weights_identity(copy) != _weights_identity(tiny_model_dir)


def test_a_mesh_run_equals_a_one_device_run_and_pixel_bounds_are_settings(tiny_model_dir, tmp_path):
    """``mesh:`` places the model on a data x fsdp x tensor mesh of the (8 fake CPU) devices and
    generates as one program: the rows equal a run on one device. Pixel bounds change the prompts,
    so they are run settings."""
    from jaxmm.eval.harness import mesh_axes

    rows = [
        dict(SCHEMAS["pope"][0], question_id=str(i), image={"bytes": png_bytes(size=(64 + 8 * i, 48)), "path": None})
        for i in range(5)
    ]
    data = write_parquet(tmp_path / "pope.parquet", rows)
    base = dict(
        model=str(tiny_model_dir),
        benchmarks=[{"name": "pope", "path": str(data)}],
        methods=["baseline", "pai", "pai:gamma=2"],
        batch_size=4,
        max_new_tokens=4,
        heatmaps=1,
    )
    one = load_rows(run(EvalConfig(out=str(tmp_path / "one"), **base), progress=False))
    sharded_out = run(EvalConfig(out=str(tmp_path / "mesh"), mesh={"data": 2, "fsdp": 2, "tensor": 2}, **base), progress=False)
    sharded = load_rows(sharded_out)
    key = lambda r: (r["id"], r["method"])
    assert len(one) == len(sharded) == 15 and all("error" not in r for r in sharded)
    assert sorted((key(r), r["prediction"], r["n_tokens"]) for r in one) == sorted(
        (key(r), r["prediction"], r["n_tokens"]) for r in sharded
    )
    np.testing.assert_allclose([r["vas"] for r in sorted(sharded, key=key)], [r["vas"] for r in sorted(one, key=key)], rtol=1e-4)
    assert len(list((sharded_out / "figures").glob("heatmap_pope_0_*.png"))) == 3
    with pytest.raises(ValueError, match=r"EvalConfig: mesh: unknown field\(s\) \['model'\]"):
        run(EvalConfig(out=str(tmp_path / "bad"), mesh={"model": 8}, **base), progress=False)
    with pytest.raises(ValueError, match=r"tensor = 6, but there are 8 devices"):
        run(EvalConfig(out=str(tmp_path / "bad"), mesh={"fsdp": 3, "tensor": 2}, **base), progress=False)
    assert mesh_axes({"fsdp": 4, "tensor": 2}) == {"data": 1, "fsdp": 4, "tensor": 2}
    assert mesh_axes({"fsdp": -1, "tensor": 2}, 8) == {"data": 1, "fsdp": 4, "tensor": 2}  # -1: the rest
    for bad, msg in [
        ({"fsdp": -1, "data": -1}, "only one axis may be -1"),
        ({"fsdp": -1, "tensor": 3}, "not a multiple"),
        ({"tensor": 0}, r"mesh.tensor=0: expected a positive integer"),
    ]:
        with pytest.raises(ValueError, match=msg):
            mesh_axes(bad, 8)
    # a smaller max_pixels: fewer image tokens per prompt, and a resume with it is refused
    small = EvalConfig(out=str(tmp_path / "one"), **{**base, "methods": ["baseline"]}, max_pixels=28 * 28 * 4)
    with pytest.raises(SettingsChanged, match=r"max_pixels: null -> 3136"):
        run(small, progress=False)
    fewer = load_rows(run(EvalConfig(**{**small.__dict__, "out": str(tmp_path / "small")}), progress=False))
    assert len(fewer) == 5 and all("error" not in r for r in fewer)
    tokens = {r["id"]: r["prompt_tokens"] for r in one if r["method"] == "baseline"}
    assert all(r["prompt_tokens"] <= tokens[r["id"]] for r in fewer)
    assert sum(r["prompt_tokens"] for r in fewer) < sum(tokens.values())


@pytest.mark.parametrize("name,benchmark", [("qwen2_5_vl_7b_mmstar", "mmstar"), ("qwen2_5_vl_7b_pope", "pope")])
def test_the_real_checkpoint_configs_validate_and_run(name, benchmark, tiny_model_dir, tmp_path, monkeypatch):
    """The packaged Qwen2.5-VL-7B configs: their methods build against the 7B config, their mesh
    fills any device count, and the job runs as shipped with only the model and data paths (and a
    small limit) overridden."""
    from pathlib import Path

    from jaxmm.eval.harness import mesh_axes
    from jaxmm.plan import _load_config

    cfg = EvalConfig.from_yaml(name)
    assert cfg.dtype == "bfloat16" and cfg.min_pixels < cfg.max_pixels and cfg.benchmarks[0]["name"] == benchmark
    assert mesh_axes(cfg.mesh, 8) == {"data": 1, "fsdp": 8, "tensor": 1} and mesh_axes(cfg.mesh, 1)["fsdp"] == 1
    _, config = _load_config(Path(__file__).parents[1] / "configs" / "models" / "qwen2_5_vl_7b.yaml")
    import jaxmm.interventions as I

    assert len(I.build([m for m in cfg.methods if m != "baseline"], config)) == len(cfg.methods) - 1
    ids = {"pope": ("question_id", str), "mmstar": ("index", int)}[benchmark]
    rows = [
        dict(SCHEMAS[benchmark][0], image={"bytes": png_bytes(size=(64 + 8 * i, 48)), "path": None}, **{ids[0]: ids[1](i)})
        for i in range(3)
    ]
    (tmp_path / "data").mkdir()
    write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", rows)
    monkeypatch.chdir(tmp_path)
    cfg = EvalConfig.from_yaml(
        name,
        [f"model={tiny_model_dir}", "benchmarks.0.path=data", "benchmarks.0.limit=3", "methods=[baseline,pai]", "heatmaps=1"],
    )
    got = load_rows(run(cfg, progress=False))
    assert len(got) == 6 and all("error" not in r for r in got), got
    assert (tmp_path / cfg.out / "report.md").exists()


def test_the_packaged_config_runs_from_another_directory_after_a_non_editable_install(tmp_path):
    """``pip install`` (not ``-e``) of the repository into a fresh target, then ``jaxmm eval
    --config organism`` from a directory without ``configs/``: the config ships in the package."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).parents[1]
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target", str(site), str(repo)],
        check=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert not (site / "jaxmm" / "__editable__").exists() and (site / "jaxmm" / "configs" / "eval" / "organism.yaml").exists()
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = (
        "import sys, jaxmm, jaxmm.cli; assert jaxmm.__file__.startswith(sys.argv[1]), jaxmm.__file__; "
        "sys.exit(jaxmm.cli.main(sys.argv[2:]))"
    )
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            str(site),
            "eval",
            "--config",
            "organism",
            "--no-progress",
            "benchmarks.0.limit=2",
            "methods=[baseline]",
            "heatmaps=0",
            "out=run",
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "grounded" in done.stdout and (work / "run" / "report.md").exists()
    assert len((work / "run" / "results.jsonl").read_text().splitlines()) == 2


def test_a_named_prompt_formats_the_question_and_is_a_run_setting(tiny_model_dir, tmp_path):
    """``prompt: vrga`` in a benchmark spec: the user text is the released template around the
    question without the benchmark's instruction; ``sayo`` adds its system turn; changing the prompt
    of a run is refused; an unknown name fails before anything is written."""
    from jaxmm.prompts import PROMPTS

    rows = [dict(SCHEMAS["pope"][0], question_id=str(i), image={"bytes": png_bytes(), "path": None}) for i in range(2)]
    data = str(write_parquet(tmp_path / "pope.parquet", rows))
    base = dict(model=str(tiny_model_dir), methods=["baseline"], batch_size=2, max_new_tokens=3, heatmaps=0)
    plain = load_rows(
        run(EvalConfig(out=str(tmp_path / "plain"), benchmarks=[{"name": "pope", "path": data}], **base), progress=False)
    )
    vrga = load_rows(
        run(
            EvalConfig(out=str(tmp_path / "vrga"), benchmarks=[{"name": "pope", "path": data, "prompt": "vrga"}], **base),
            progress=False,
        )
    )
    q = SCHEMAS["pope"][0]["question"]
    assert plain[0]["question"] == f"{q} {B.YES_NO_INSTRUCTION}"
    assert [r["question"] for r in vrga] == [PROMPTS["vrga"].user.format(question=q)] * 2
    sayo = load_rows(
        run(
            EvalConfig(out=str(tmp_path / "sayo"), benchmarks=[{"name": "pope", "path": data, "prompt": "sayo"}], **base),
            progress=False,
        )
    )
    assert sayo[0]["question"] == q
    extra = sayo[0]["prompt_tokens"] - plain[0]["prompt_tokens"]  # the system turn, less the instruction
    assert extra > 20, extra
    with pytest.raises(SettingsChanged, match="benchmarks"):
        run(
            EvalConfig(out=str(tmp_path / "vrga"), benchmarks=[{"name": "pope", "path": data, "prompt": "vrga_think"}], **base),
            progress=False,
        )
    with pytest.raises(ValueError, match="prompt 'vgra': unknown"):
        run(
            EvalConfig(out=str(tmp_path / "bad"), benchmarks=[{"name": "pope", "path": data, "prompt": "vgra"}], **base),
            progress=False,
        )
    assert not (tmp_path / "bad").exists()


def test_pai_gamma_decodes_with_the_contrast(tiny_model_dir, tmp_path):
    """``pai:gamma=γ`` is an eval setting: its rows are generate's tokens decoded with PAI's contrast
    against the same prompts without images (the PAI edit on), which differ from PAI alone here."""
    import jaxmm
    from jaxmm import interventions as I
    from jaxmm.generate import Contrast, generate, text_only
    from jaxmm.stopping import stop_token_ids

    spec = {"name": "grounded", "limit": 3, "image_size": 56}
    cfg = EvalConfig(
        model=str(tiny_model_dir),
        out=str(tmp_path / "run"),
        methods=["pai", "pai:gamma=3.0"],
        benchmarks=[spec],
        max_new_tokens=5,
        heatmaps=0,
        batch_size=3,
    )
    rows = load_rows(run(cfg, progress=False))
    assert all("error" not in r for r in rows) and len(rows) == 6
    model = jaxmm.load(tiny_model_dir)
    samples = list(B.load("grounded", None, 3, 0, image_size=56))
    convs = [
        [
            {
                "role": "user",
                "content": [{"type": "image", "image": B.decode_image(s["image"])}, {"type": "text", "text": s["question"]}],
            }
        ]
        for s in samples
    ]
    batch, _ = model.prepare_chat(convs)
    ivs = model.interventions(["pai"])
    stop = stop_token_ids(model.config, model.tokenizer)
    decode = lambda contrast: generate(
        model.params,
        model.config,
        batch,
        max_new_tokens=5,
        stop_tokens=stop,
        pad_token_id=model.tokenizer.pad_token_id or 0,
        interventions=ivs,
        contrast=contrast,
    )
    want = {}
    for name, contrast in (("pai", None), ("pai:gamma=3.0", Contrast(text_only(batch, model.config), gamma=3.0))):
        out = decode(contrast)
        toks, lens = np.asarray(out.tokens), np.asarray(out.lengths)
        want[name] = [model.tokenizer.decode(toks[b, : lens[b]], skip_special_tokens=True) for b in range(3)]
    got = {
        m: [r["prediction"] for r in sorted(rows, key=lambda r: r["id"]) if r["method"] == method_name(m)]
        for m in ("pai", "pai:gamma=3.0")
    }
    ids = sorted(s["id"] for s in samples)
    order = [ids.index(s["id"]) for s in samples]
    assert [got["pai:gamma=3.0"][k] for k in order] == want["pai:gamma=3.0"]
    assert [got["pai"][k] for k in order] == want["pai"]
    assert want["pai"] != want["pai:gamma=3.0"]
    with pytest.raises(ValueError, match=r"gamma=-1.*null or > 0"):
        model.interventions(["pai:gamma=-1"])
    with pytest.raises(ValueError, match="2 PAI interventions set gamma"):
        I.decoding_contrast(model.interventions(["pai:gamma=1.1", "pai:gamma=2"]))


def test_grounded_benchmark_tasks_choose_the_task_types():
    """``tasks`` of a grounded benchmark spec: sample i is of task tasks[i % len(tasks)] (as in the
    training data), validated by the eval config."""
    from jaxmm.config import ConfigError

    ds = B.load("grounded", limit=4, seed=1, image_size=112, tasks=["ocr", "counting"])
    assert [ds[i]["task"] for i in range(4)] == ["ocr", "counting", "ocr", "counting"]
    assert ds[0]["answer"] == make_sample(0, 1, (112, 112), "ocr")["answer"]
    assert [B.load("grounded", limit=5)[i]["task"] for i in range(5)] == list(TASKS)
    cfg = EvalConfig(benchmarks=[{"name": "grounded", "limit": 2, "tasks": ["ocr"]}])
    assert cfg.benchmarks[0]["tasks"] == ["ocr"]
    with pytest.raises(ConfigError, match=r"benchmarks.0.tasks.0: expected 'recognition'"):
        EvalConfig(benchmarks=[{"name": "grounded", "tasks": ["reading"]}])
    with pytest.raises(ValueError, match=r"tasks \[\]"):
        B.load("grounded", limit=2, tasks=[])
