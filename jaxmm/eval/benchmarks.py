"""Benchmark readers: the files benchmarks are published in -> grain datasets of uniform samples.

A sample is a dict: ``id``, ``image`` (PIL, decoded lazily by the grain map), ``question`` (the
prompt text, with the benchmark's standard instruction), ``raw_question`` (the same without that
instruction: what a named prompt of :mod:`jaxmm.prompts` formats), ``answer`` (reference: a string, or a list
for TextVQA/DocVQA), ``score`` (name of the rule in :mod:`jaxmm.eval.scoring`), optional ``box``
and ``task``, and for training data ``response`` (the full assistant turn SFT learns, when it is
more than the answer) and ``system``. Files: parquet with image bytes (HF datasets' export: an
``image`` column holding bytes or ``{"bytes": …}``) or JSONL plus an image folder (``image``, or
``images`` as a list of one, holds a path relative to the JSONL file). Field names follow each
benchmark's published schema; ``fields`` maps a schema field to the file's own column name
(``{"question": "problem", "image": "images"}``) for files that name them differently.

The ``vqa`` schema is the generic one for your own data (training, or a benchmark jaxmm has no
reader for), one image per row:

* ``question`` and ``answer`` (a string, or a list of accepted answers), or a chat in the
  LLaVA/ShareGPT layout: ``conversations: [{"from": "human", "value": "<image>Q"}, {"from": "gpt",
  "value": "A"}]`` or ``messages: [{"role": "user", "content": …}, {"role": "assistant", …}]`` (the
  first user turn is the question, the first assistant turn after it the response; a ``system`` turn
  is kept). ``<image>`` placeholders are removed: jaxmm places the image itself.
* optional ``id`` (else a stable hash of question and image), ``answer`` beside a chat (what the
  response is scored against; default the response), ``response``, ``box`` ``[x0, y0, x1, y1]`` in
  image pixels, or a list of such boxes (the region SAYO's reward and the region ratio use; SAYO's
  ``focus_area`` column, through ``fields``), ``task``, ``score`` (a rule of
  :data:`jaxmm.eval.scoring.METRIC`; default ``"exact"``).

Ids are the benchmark's own (question id, index, …) and must be the same in every process: the
harness resumes and merges hosts' rows by ``(benchmark, id, method)``. A row without one (ChartQA's
HF exports have none) gets :func:`stable_id` of its question and image plus its row index — never
Python's ``hash``, which is salted per process.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Callable

import grain
from PIL import Image

from jaxmm.eval.scoring import METRIC

LETTER_INSTRUCTION = "Answer with the option's letter from the given choices directly."
YES_NO_INSTRUCTION = "Answer yes or no."
SHORT_INSTRUCTION = "Answer the question using a single word or phrase."


def shards(path: str | Path) -> list[Path]:
    """The files of a benchmark: one file, every ``*.parquet`` / ``*.jsonl`` in a directory (HF
    datasets' shards, e.g. ``test-00000-of-00003.parquet``), or a glob (``/data/pope/*.parquet``);
    in name order.

    Raises:
        FileNotFoundError: no such file, or a directory/glob that matches no data file.
    """
    import glob

    text = str(path)
    if any(c in text for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(text))
    elif Path(text).is_dir():
        files = sorted(p for p in Path(text).iterdir() if p.suffix in (".parquet", ".jsonl"))
    else:
        return [Path(text)]
    if not files:
        raise FileNotFoundError(f"benchmark path {text}: no .parquet or .jsonl files there")
    return files


def read_table(path: str | Path, fields: dict[str, str] | None = None) -> list[dict]:
    """Rows of a ``.parquet`` or ``.jsonl`` file, or of every shard of a directory or glob
    (:func:`shards`, concatenated in name order), as dicts (a ``.json`` file: JSON lines, or one
    JSON list of rows as LLaMA-Factory writes them); ``fields`` (schema name -> the file's
    column name) renames columns first; JSONL image paths (``image``, ``images``) are made absolute.

    Raises:
        FileNotFoundError: no such file (see :func:`shards`).
        ValueError: a line that is not JSON, or a column named in ``fields`` that a row lacks (naming
            the file, the row, the missing columns and the columns found).
    """
    return [row for f in shards(path) for row in _read_file(f, fields or {})]


def _renamed(row: dict, fields: dict[str, str], path: Path, i: int) -> dict:
    missing = sorted(src for src in fields.values() if src not in row)
    if missing:
        raise ValueError(f"{path}: row {i} has no column(s) {missing} named in fields; columns found: {sorted(row)}")
    taken = set(fields.values())
    out = {k: v for k, v in row.items() if k not in taken}
    out.update({name: row[src] for name, src in fields.items()})
    return out


def _absolute(value, folder: Path):
    """JSONL image paths relative to the file: a path, or a list of them."""
    if isinstance(value, str):
        return str(folder / value)
    if isinstance(value, list):
        return [str(folder / v) if isinstance(v, str) else v for v in value]
    return value


def _read_file(path: Path, fields: dict[str, str]) -> list[dict]:
    if not path.exists():
        raise FileNotFoundError(f"benchmark file {path} does not exist")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return [_renamed(r, fields, path, i) if fields else r for i, r in enumerate(pq.read_table(path).to_pylist())]
    if path.suffix in (".jsonl", ".json"):
        text = path.read_text()
        if path.suffix == ".json" and text.lstrip().startswith("["):  # one JSON list (LLaMA-Factory's datasets)
            try:
                listed = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not JSON ({e})") from None
            lines = list(enumerate(listed))
        else:
            lines = []
            for i, line in enumerate(text.splitlines()):
                if not line.strip():
                    continue
                try:
                    lines.append((i, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i + 1}: not JSON ({e})") from None
        rows = []
        for i, row in lines:
            if not isinstance(row, dict):
                raise ValueError(f"{path}: row {i} is not a JSON object: {row!r:.80}")
            if fields:
                row = _renamed(row, fields, path, i)
            for key in ("image", "images"):
                if key in row:
                    row[key] = _absolute(row[key], path.parent)
            rows.append(row)
        return rows
    raise ValueError(f"{path}: expected a .parquet, .jsonl or .json file")


def decode_image(value):
    """bytes / {"bytes": …} / a path / a PIL image, or a list of exactly one of these (the
    ``images`` column of LLaVA/EasyR1 data) -> RGB PIL image (None stays None).

    Raises:
        ValueError: a list of no or several images (a sample holds one image).
    """
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise ValueError(f"expected one image per sample, got a list of {len(value)}")
        value = value[0]
    if value is None:
        return None
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return Image.open(io.BytesIO(value)).convert("RGB")
    return Image.open(value).convert("RGB")


def stable_id(*parts) -> str:
    """16 hex digits of the sha1 of ``parts`` (bytes, or anything ``str`` writes): the same in every
    process and on every host."""
    h = hashlib.sha1()
    for p in parts:
        h.update(bytes(p) if isinstance(p, (bytes, bytearray)) else str(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _image_ref(value):
    """What identifies a row's image across hosts: its encoded bytes, or its file name (not the
    absolute path, which depends on where each host keeps the data)."""
    if isinstance(value, (list, tuple)):
        return b"".join(r if isinstance(r, bytes) else str(r).encode() for r in map(_image_ref, value))
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return value
    return "" if value is None else Path(str(value)).name


def _options(row, letters="ABCDEFGH"):
    return "\n".join(f"{l}. {row[l]}" for l in letters if row.get(l) not in (None, "", "nan"))


def _mmstar(row):
    return dict(
        id=str(row["index"]),
        question=f"{row['question']}\n{LETTER_INSTRUCTION}",
        raw_question=row["question"],
        answer=row["answer"],
        score="option_letter",
        task=row.get("category"),
    )


def _mmbench(row):
    hint = f"{row['hint']}\n" if row.get("hint") not in (None, "", "nan") else ""
    raw = f"{hint}{row['question']}\n{_options(row)}"
    return dict(
        id=str(row["index"]),
        question=f"{raw}\n{LETTER_INSTRUCTION}",
        raw_question=raw,
        answer=row["answer"],
        score="option_letter",
        task=row.get("category"),
    )


def _mathvista(row):
    choices = row.get("choices")
    if row.get("question_type") == "multi_choice" and choices:
        letter = "ABCDEFGH"[list(choices).index(row["answer"])]
        q = row.get("query") or f"{row['question']}\n" + "\n".join(f"({'ABCDEFGH'[i]}) {c}" for i, c in enumerate(choices))
        return dict(id=str(row["pid"]), question=q, answer=letter, score="option_letter", task=row.get("task"))
    return dict(
        id=str(row["pid"]),
        question=row.get("query") or row["question"],
        answer=str(row["answer"]),
        score="exact",
        task=row.get("task"),
    )


def _pope(row):
    return dict(
        id=str(row["question_id"]),
        question=f"{row['question']} {YES_NO_INSTRUCTION}",
        raw_question=row["question"],
        answer=row["answer"].strip().lower(),
        score="yes_no",
        task=row.get("category"),
    )


def _hallusion(row):
    gt = "yes" if str(row["gt_answer"]).strip() in ("1", "yes") else "no"
    rid = "-".join(str(row.get(k, "")) for k in ("category", "subcategory", "set_id", "figure_id", "question_id"))
    return dict(
        id=rid,
        question=f"{row['question']} {YES_NO_INSTRUCTION}",
        raw_question=row["question"],
        answer=gt,
        score="yes_no",
        task=row.get("category"),
    )


def _chartqa(row):
    rid = row.get("id") if row.get("id") is not None else row.get("question_id")
    raw = row.get("query", row.get("question"))
    return dict(
        id=None if rid is None else str(rid),  # None: to_sample derives a stable one
        question=f"{raw}\n{SHORT_INSTRUCTION}",
        raw_question=raw,
        answer=str(row.get("label", row.get("answer"))),
        score="relaxed",
        task=row.get("type"),
    )


def _textvqa(row):
    return dict(
        id=str(row["question_id"]),
        question=f"{row['question']}\n{SHORT_INSTRUCTION}",
        raw_question=row["question"],
        answer=list(row["answers"]),
        score="vqa",
    )


def _docvqa(row):
    return dict(
        id=str(row["questionId"]),
        question=f"{row['question']}\n{SHORT_INSTRUCTION}",
        raw_question=row["question"],
        answer=list(row["answers"]),
        score="anls",
    )


#: PAI's CHAIR prompt (chair_eval.py)
CHAIR_PROMPT = "Please describe this image in detail."


def _chair(row):
    """A COCO image to caption, with its ground-truth objects: ``image_id``, ``objects`` (COCO
    categories, e.g. from :func:`jaxmm.eval.chair.ground_truth_rows`), optional ``question``."""
    objects = row["objects"]
    if isinstance(objects, str) or not all(isinstance(o, str) for o in objects):
        raise ValueError(
            f"chair: field 'objects' of image {row.get('image_id')!r} must be a list of COCO categories, got {objects!r}"
        )
    q = row.get("question") or CHAIR_PROMPT
    return dict(id=str(row["image_id"]), question=q, answer=sorted(objects), score="chair")


def _grounded(row):
    return dict(
        id=row["id"], question=row["question"], answer=row["answer"], score="exact", task=row["task"], box=tuple(row["box"])
    )


def _turns(turns, key: str) -> dict:
    """A LLaVA/ShareGPT (``from``/``value``) or OpenAI (``role``/``content``) chat -> its system
    text, first user turn and the first assistant turn after it."""
    roles = {"human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant", "system": "system"}
    out: dict = {}
    for t in turns:
        if not isinstance(t, dict):
            raise ValueError(f"vqa: {key} must be a list of turns (dicts), got {t!r}")
        role = roles.get(t.get("role", t.get("from")))
        text = t.get("content", t.get("value"))
        if isinstance(text, list):  # OpenAI content parts: keep the text ones
            text = "".join(p.get("text", "") for p in text if isinstance(p, dict))
        if role == "system" and "question" not in out:
            out["system"] = text
        elif role == "user" and "question" not in out:
            out["question"] = text
        elif role == "assistant" and "question" in out:
            out["response"] = text
            break
    if "question" not in out or "response" not in out:
        raise ValueError(f"vqa: {key} has no user turn followed by an assistant turn")
    return out


def _box(v):
    """One ``[x0, y0, x1, y1]`` or a list of them (SAYO's ``focus_area``) -> a tuple, or a tuple of tuples."""
    if v is None:
        return None
    several = isinstance(v, (list, tuple)) and len(v) > 0 and isinstance(v[0], (list, tuple))
    boxes = []
    for b in v if several else [v]:
        try:
            box = tuple(float(x) for x in b)
        except (TypeError, ValueError):
            box = ()
        if len(box) != 4 or not (box[0] < box[2] and box[1] < box[3]):
            raise ValueError(
                f"vqa: box must be [x0, y0, x1, y1] (or a list of them) with x0 < x1 and y0 < y1, in image pixels; got {v!r}"
            )
        boxes.append(box)
    return tuple(boxes) if several else boxes[0]


def _vqa(row):
    """jaxmm's generic schema (module docstring): question/answer, or a chat."""
    chat_key = next((k for k in ("messages", "conversations") if k in row), None)
    if "question" in row or chat_key is None:
        s = dict(question=row["question"], answer=row["answer"])
        if row.get("response") is not None:
            s["response"] = row["response"]
    else:
        s = _turns(row[chat_key], chat_key)
        s["answer"] = row["answer"] if row.get("answer") is not None else s["response"]
    s["question"] = s["question"].replace("<image>", "").strip()
    if row.get("system") is not None:
        s["system"] = row["system"]
    rule = row.get("score") or "exact"
    if rule not in METRIC:
        raise ValueError(f"vqa: score {rule!r} is not a scoring rule; known: {sorted(METRIC)}")
    if not isinstance(s["answer"], (str, list)):
        s["answer"] = str(s["answer"])
    s.update(id=None if row.get("id") is None else str(row["id"]), score=rule, task=row.get("task"), box=_box(row.get("box")))
    return s


READERS: dict[str, Callable[[dict], dict]] = {
    "mmstar": _mmstar,
    "mmbench": _mmbench,
    "mathvista": _mathvista,
    "pope": _pope,
    "hallusionbench": _hallusion,
    "chartqa": _chartqa,
    "textvqa": _textvqa,
    "docvqa": _docvqa,
    "grounded": _grounded,
    "chair": _chair,
    "vqa": _vqa,
}


def to_sample(name: str, row: dict, index: int | None = None) -> dict:
    """``row`` (number ``index`` of its file) -> a sample. A reader that finds no id in the row
    returns ``id=None``; the id is then ``{stable_id(question, image)}-{index}``."""
    try:
        s = READERS[name](row)
    except KeyError as e:
        raise ValueError(f"{name}: a row lacks the field {e} of the benchmark's schema") from None
    s["benchmark"] = name
    s.setdefault("raw_question", s["question"])  # MathVista's query and grounded: no added instruction
    s["image"] = next((row[k] for k in ("image", "decoded_image", "images") if k in row), None)
    if s["id"] is None:
        s["id"] = stable_id(s["question"], _image_ref(s["image"])) + ("" if index is None else f"-{index}")
    return s


def load(
    name: str,
    path: str | Path | None = None,
    limit: int | None = None,
    seed: int = 0,
    image_size: int = 224,
    fields: dict[str, str] | None = None,
    **style,
) -> grain.MapDataset:
    """A grain ``MapDataset`` of samples of benchmark ``name`` read from ``path`` (``fields``: the
    file's own names for schema fields, :func:`read_table`).

    ``name="grounded"`` needs no file: jaxmm generates it (``limit`` samples, ``seed``, square
    images of ``image_size`` pixels, ``style``: ``shape_scale`` and ``contrast`` of
    :func:`jaxmm.data.grounded.make_sample`, and ``tasks``: sample ``i`` is of task
    ``tasks[i % len(tasks)]``; default the five in turn).
    Images are decoded lazily (in the dataset's map) and may fail per sample: the harness records
    such a sample as an error row.
    """
    if name not in READERS:
        raise ValueError(f"unknown benchmark {name!r}; known: {sorted(READERS)}")
    if name == "grounded" and path is None:
        from jaxmm.data.grounded import TASKS, make_sample

        unknown = set(style) - {"shape_scale", "contrast", "tasks"} | ({"fields"} if fields else set())
        if unknown:
            raise ValueError(f"benchmark 'grounded': unknown field(s) {sorted(unknown)}")
        tasks = style.pop("tasks", None)
        if tasks is not None and (not tasks or set(tasks) - set(TASKS)):
            raise ValueError(f"benchmark 'grounded': tasks {tasks!r}; expected a non-empty list of {list(TASKS)}")
        n = limit or 64
        size = (image_size, image_size)
        task = lambda i: None if tasks is None else tasks[i % len(tasks)]
        return grain.MapDataset.range(n).map(
            lambda i: {**to_sample("grounded", make_sample(int(i), seed, size, task(int(i)), **style)), "benchmark": "grounded"}
        )
    if style:
        raise ValueError(f"benchmark {name!r}: unknown field(s) {sorted(style)}")
    if path is None:
        raise ValueError(f"benchmark {name!r} needs a data file (parquet or jsonl)")
    rows = read_table(path, fields)
    rows = rows[:limit] if limit else rows
    check_ids(name, path, rows)
    return grain.MapDataset.source(rows).map_with_index(lambda i, row: to_sample(name, row, i))


def check_ids(name: str, path, rows: list[dict]) -> None:
    """Fails fast on a file that is not benchmark ``name``'s schema (its first row lacks a field)
    or that repeats an id (rows are resumed and merged by id, so a repeat would be dropped).

    Raises:
        ValueError: naming the file, the missing field or the repeated id and its two rows.
    """
    first = {}
    for i, row in enumerate(rows):
        try:
            sid = to_sample(name, row, i)["id"]
        except ValueError as e:
            if i == 0:
                raise ValueError(f"{path}: {e} (first row; fields found: {sorted(row)})") from None
            continue  # one malformed row later in the file: an error row at run time
        if sid in first:
            raise ValueError(
                f"{path}: id {sid!r} appears in rows {first[sid]} and {i}; benchmark ids must be "
                "unique (results are resumed and merged by id)"
            )
        first[sid] = i
