"""Training on files: the ``vqa`` schema (question/answer, LLaVA/ShareGPT chats, EasyR1 columns via
``fields``) read into samples, SFT and GRPO steps on them, the eval harness on the same file, and
bad data named."""

import json

import numpy as np
import pytest
import tiny

from jaxmm.eval import benchmarks as B


def write_photos(folder, names=("coffee", "chelsea", "astronaut", "camera")):
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for i, name in enumerate(names):
        im = tiny.photos()[name].convert("RGB").resize((96 + 16 * i, 80))
        im.save(folder / f"{name}.png")
        sizes[name] = im.size
    return sizes


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def vqa_rows(names=("coffee", "chelsea", "astronaut", "camera")):
    return [
        {
            "id": f"q{i}",
            "image": f"img/{n}.png",
            "question": f"<image>\nWhat is in photo {i}?",
            "answer": n,
            "box": [8, 8, 64, 60],
        }
        for i, n in enumerate(names)
    ]


def sharegpt_rows(names=("coffee", "chelsea", "astronaut", "camera")):
    return [
        {
            "id": i,
            "images": [f"img/{n}.png"],
            "messages": [
                {"role": "system", "content": "You look closely."},
                {"role": "user", "content": "<image>Describe the photo."},
                {"role": "assistant", "content": f"It shows {n}."},
            ],
        }
        for i, n in enumerate(names)
    ]


def test_vqa_schema_layouts_read_alike(tmp_path):
    sizes = write_photos(tmp_path / "img")
    plain = B.load("vqa", write_jsonl(tmp_path / "plain.jsonl", vqa_rows()))
    s = plain[1]
    assert s["question"] == "What is in photo 1?" and s["answer"] == "chelsea" and s["box"] == (8.0, 8.0, 64.0, 60.0)
    assert s["score"] == "exact" and s["id"] == "q1" and B.decode_image(s["image"]).size == sizes["chelsea"]

    chat = B.load("vqa", write_jsonl(tmp_path / "chat.jsonl", sharegpt_rows()))
    c = chat[2]
    assert (
        c["question"] == "Describe the photo." and c["response"] == "It shows astronaut." and c["system"] == "You look closely."
    )
    assert c["answer"] == c["response"] and c["box"] is None and B.decode_image(c["image"]).size == sizes["astronaut"]

    listed = tmp_path / "llamafactory.json"  # LLaMA-Factory's sharegpt datasets: one JSON list
    listed.write_text(json.dumps(sharegpt_rows()))
    assert [r["response"] for r in B.load("vqa", listed)] == [r["response"] for r in chat]
    with pytest.raises(ValueError, match=r"row 0 is not a JSON object"):
        bad = tmp_path / "bad.json"
        bad.write_text("[[1, 2]]")
        B.load("vqa", bad)

    llava = [
        {
            "id": "l0",
            "image": "img/coffee.png",
            "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A."}],
        }
    ]
    lv = B.load("vqa", write_jsonl(tmp_path / "llava.jsonl", llava))[0]
    assert (lv["question"], lv["response"], lv["answer"]) == ("Q?", "A.", "A.")

    # EasyR1's columns (problem / answer / images) through fields
    r1 = [{"problem": "<image>How many cups?", "answer": "2", "images": ["img/coffee.png"]}]
    e = B.load("vqa", write_jsonl(tmp_path / "r1.jsonl", r1), fields={"question": "problem"})[0]
    assert e["question"] == "How many cups?" and e["answer"] == "2" and e["id"]  # a stable id of question + image
    assert B.decode_image(e["image"]).size == sizes["coffee"]
    again = B.load("vqa", tmp_path / "r1.jsonl", fields={"question": "problem"})[0]
    assert again["id"] == e["id"]

    # SAYO's parquet columns: question, answer (long), short_answer, focus_area (several boxes), type
    sayo = [{"id": "s0", "question": "Where is the cup?", "answer": "long…", "short_answer": "left", "type": "grounding",
             "focus_area": [[0, 0, 40, 40], [60, 30, 90, 70]], "image": "img/coffee.png"}]  # fmt: skip
    fields = {"answer": "short_answer", "box": "focus_area", "task": "type"}
    f = B.load("vqa", write_jsonl(tmp_path / "sayo.jsonl", sayo), fields=fields)[0]
    assert f["answer"] == "left" and f["task"] == "grounding" and f["box"] == ((0, 0, 40, 40), (60, 30, 90, 70))
    from jaxmm.processing.batch import boxes_of, sample_boxes

    assert boxes_of(f["box"]) == [(0, 0, 40, 40), (60, 30, 90, 70)] and boxes_of(s["box"]) == [s["box"]] and boxes_of(None) == []
    f["image"] = B.decode_image(f["image"])
    assert sample_boxes([f])[0] == {0: [(0, 0, 40, 40), (60, 30, 90, 70)]}


def test_training_dataset_from_file_yields_decoded_samples(tmp_path):
    from jaxmm.train.sft import TrainConfig, dataset, target

    write_photos(tmp_path / "img")
    path = write_jsonl(tmp_path / "train.jsonl", sharegpt_rows())
    cfg = TrainConfig(data={"name": "vqa", "path": str(path), "seed": 3})
    ds = dataset(cfg)
    seen = [ds[i] for i in range(8)]  # two epochs of 4
    assert sorted(s["id"] for s in seen[:4]) == ["0", "1", "2", "3"] and sorted(s["id"] for s in seen[4:]) == ["0", "1", "2", "3"]
    assert all(s["image"].mode == "RGB" for s in seen)
    assert target(seen[0]) == seen[0]["response"]
    assert target({"answer": ["b", "a", "b"]}) == "b" and target({"answer": 3}) == "3"
    limited = dataset(TrainConfig(data={"name": "vqa", "path": str(path), "limit": 2}))
    assert {limited[i]["id"] for i in range(6)} == {"0", "1"}


def test_sft_on_a_sharegpt_file(tmp_path, monkeypatch):
    """Two SFT steps on a chat file: the labels are the assistant response, the loss is finite."""
    import jaxmm
    from jaxmm import organism
    from jaxmm.train.sft import TrainConfig, dataset, sft_example, train

    monkeypatch.setenv("JAXMM_HOME", str(tmp_path / "home"))
    write_photos(tmp_path / "img")
    path = write_jsonl(tmp_path / "train.jsonl", sharegpt_rows())
    cfg = TrainConfig(
        out=str(tmp_path / "run"), steps=2, batch_size=2, seq_len=200, save_every=2, log_every=1, tensorboard=False,
        data={"name": "vqa", "path": str(path)}, max_pixels=56 * 56,
    )  # fmt: skip
    model = jaxmm.load(organism.resolve(None))
    model.set_pixels(max_pixels=cfg.max_pixels)
    ds = dataset(cfg)
    ex = sft_example(model, ds[0], cfg.seq_len)
    assert np.sum(np.asarray(ex["input_ids"]) == model.config.image_token_id) <= 4  # ≤ 56×56 px: ≤ 2×2 merged tokens
    labels = np.asarray(ex["labels"])
    text = model.tokenizer.decode(labels[labels != -100])
    assert text.startswith(ds[0]["response"]), text
    prompt = model.tokenizer.decode(np.asarray(ex["input_ids"])[np.asarray(ex["attention_mask"]) > 0])
    assert "You look closely." in prompt and "<image>" not in prompt.replace("<|image_pad|>", "")
    out = train(cfg, progress=False)
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)

    # jaxmm export: the run's last checkpoint as an HF checkpoint that loads back to the same parameters
    from jaxmm.cli import main
    from jaxmm.train.sft import final_params, flat_params

    assert main(["export", str(out), str(tmp_path / "hf")]) == 0
    back = flat_params(jaxmm.load(tmp_path / "hf").params)
    want = flat_params(final_params(out)[0])
    assert set(back) == set(want) and all(np.array_equal(back[k], want[k]) for k in want)
    assert main(["export", str(tmp_path / "nowhere"), str(tmp_path / "hf2")]) == 2


def test_grpo_on_a_vqa_file_with_boxes(tmp_path, monkeypatch):
    """GRPO steps on a question/answer file with evidence boxes: accuracy scored against the file's
    answers, SAYO's r_att over the boxes, the region ratio logged."""
    from jaxmm.train.grpo import GRPOConfig, train

    monkeypatch.setenv("JAXMM_HOME", str(tmp_path / "home"))
    write_photos(tmp_path / "img")
    path = write_jsonl(tmp_path / "train.jsonl", vqa_rows())
    cfg = GRPOConfig(
        out=str(tmp_path / "grpo"), steps=2, prompts_per_step=2, group_size=2, max_new_tokens=6, save_every=100,
        tensorboard=False, log_every=1, data={"name": "vqa", "path": str(path)}, rewards={"accuracy": 1.0, "r_att": 1.0},
    )  # fmt: skip
    out = train(cfg, progress=False)
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for r in rows:  # r_att without a box in use would be tanh(log(1e-8 / ā_V)) = -1.0
        assert 0.0 <= r["reward/accuracy"] <= 1.0 and -1.0 < r["reward/r_att"] < 1.0 and r["reward/r_att"] != 0.0, r
        assert np.isfinite(r["region_ratio"]) and np.isfinite(r["loss"]), r


def test_rewards_score_against_the_file_answers():
    """rewards_of's accuracy is the sample's own rule on its own answer (a list: any accepted one)."""
    from jaxmm.eval.harness import score

    s = B.to_sample("vqa", {"question": "Q", "answer": ["two", "2"], "image": None})
    assert score(s, "2")[1] == 1.0 and score(s, "two")[1] == 1.0 and score(s, "3")[1] == 0.0
    r = B.to_sample("vqa", {"question": "Q", "answer": "41.5", "score": "relaxed", "image": None})
    assert score(r, "42")[1] == 1.0 and score(r, "50")[1] == 0.0


def test_eval_harness_on_a_vqa_file(tmp_path, monkeypatch):
    from jaxmm.eval.harness import EvalConfig, run
    from jaxmm.eval.report import load_rows

    monkeypatch.setenv("JAXMM_HOME", str(tmp_path / "home"))
    write_photos(tmp_path / "img")
    r1 = [{"pid": f"p{i}", **{k: v for k, v in r.items() if k != "id"}} for i, r in enumerate(vqa_rows())]
    for r in r1:
        r["problem"] = r.pop("question")
    path = write_jsonl(tmp_path / "r1.jsonl", r1)
    cfg = EvalConfig(
        out=str(tmp_path / "ev"), methods=["baseline"], batch_size=4, max_new_tokens=4, heatmaps=0,
        benchmarks=[{"name": "vqa", "path": str(path), "fields": {"question": "problem", "id": "pid"}}],
    )  # fmt: skip
    rows = load_rows(run(cfg, progress=False))
    assert sorted(r["id"] for r in rows) == ["p0", "p1", "p2", "p3"]
    assert all("error" not in r and r["score"] in (0.0, 1.0) and r["region_ratio"] is not None for r in rows), rows


IMG = {"image": "img/coffee.png"}
BAD_FILES = [
    ([{"problem": "Q", "answer": "a", **IMG}], {"question": "text"}, r"no column\(s\) \['text'\].*columns found"),
    ([{"question": "Q", "answer": "a", **IMG, "box": [5, 5, 2, 9]}], None, r"box must be \[x0, y0, x1, y1\]"),
    ([{"question": "Q", "answer": "a", **IMG, "score": "bleu"}], None, r"score 'bleu' is not a scoring rule"),
    ([{"answer": "a", **IMG}], None, r"lacks the field 'question'"),
    ([{"messages": [{"role": "user", "content": "Q"}], **IMG}], None, r"no user turn followed by an assistant"),
]


@pytest.mark.parametrize("rows, fields, match", BAD_FILES)
def test_bad_files_are_named(tmp_path, rows, fields, match):
    from jaxmm.train.sft import TrainConfig, dataset

    write_photos(tmp_path / "img")
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    data = {"name": "vqa", "path": str(path), **({"fields": fields} if fields else {})}
    with pytest.raises(ValueError, match=match) as e:
        dataset(TrainConfig(data=data))
    assert "bad.jsonl" in str(e.value)


@pytest.mark.parametrize(
    "image, match",
    [(["img/coffee.png", "img/chelsea.png"], "got a list of 2"), (None, "no image"), ("img/missing.png", "missing.png")],
)
def test_bad_images_name_the_file_and_sample(tmp_path, image, match):
    from jaxmm.train.sft import TrainConfig, dataset

    write_photos(tmp_path / "img")
    row = {"id": "s7", "question": "Q", "answer": "a"}
    if image is not None:
        row["images" if isinstance(image, list) else "image"] = image
    path = write_jsonl(tmp_path / "imgs.jsonl", [row])
    ds = dataset(TrainConfig(data={"name": "vqa", "path": str(path)}))
    with pytest.raises(ValueError, match=match) as e:
        ds[0]
    assert "imgs.jsonl" in str(e.value) and "'s7'" in str(e.value)


def test_data_config_errors_name_the_fields():
    from jaxmm.config import ConfigError
    from jaxmm.train.sft import TrainConfig

    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['size'\]; known: \['fields', 'limit', 'name', 'path', 'seed'\]"):
        TrainConfig.from_yaml(None, ["data={name: vqa, path: t.jsonl, size: 3}"])
    with pytest.raises(ConfigError, match=r"data.path: missing"):
        TrainConfig.from_yaml(None, ["data={name: vqa}"])
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['path'\]; known: \['contrast'"):
        TrainConfig.from_yaml(None, ["data={name: grounded, path: t.jsonl}"])
    with pytest.raises(ConfigError, match=r"data.name: expected 'vqa'"):
        TrainConfig.from_yaml(None, ["data={name: coco, path: t.jsonl}"])


def test_set_pixels_bounds_the_resize():
    import jaxmm
    from jaxmm import organism

    model = jaxmm.load(organism.resolve(None))
    before = model.image_processor.min_pixels
    model.set_pixels(max_pixels=28 * 28 * 4)
    assert model.image_processor.max_pixels == 3136 and model.image_processor.min_pixels == before
    model.set_pixels()  # no bound given: unchanged
    assert model.image_processor.max_pixels == 3136
    with pytest.raises(ValueError, match="min_pixels=10000 > max_pixels=3136"):
        model.set_pixels(min_pixels=10_000)
