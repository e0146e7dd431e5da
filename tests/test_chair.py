"""CHAIR (jaxmm.eval.chair) against a hand computation of PAI's chair.py definitions on a fixture
of COCO-style annotations and captions."""

import math

import pytest

from jaxmm.eval.chair import Chair, chair, load_synonyms, singular

INSTANCES = {
    "categories": [
        {"id": 1, "name": "person"},
        {"id": 18, "name": "dog"},
        {"id": 62, "name": "chair"},
        {"id": 70, "name": "toilet"},
        {"id": 67, "name": "dining table"},
    ],
    "annotations": [
        {"image_id": 1, "category_id": 1},
        {"image_id": 1, "category_id": 18},
        {"image_id": 2, "category_id": 70},
        {"image_id": 3, "category_id": 67},
    ],
}
GT_CAPTIONS = {
    "annotations": [
        {"image_id": 1, "caption": "A man walks his puppy past a bench."},
        {"image_id": 2, "caption": "A small bathroom with a white toilet."},
        {"image_id": 3, "caption": "Plates on a wooden table."},
    ]
}


def test_the_table_and_singulars():
    syn = load_synonyms()
    assert len(set(syn.values())) == 80 and syn["puppy"] == "dog" and syn["dining table"] == "dining table"
    assert syn["sofa"] == "couch" and syn["cellphone"] == "cell phone" and " motor bike" in syn  # verbatim quirk
    plurals = {
        "men": "man",
        "women": "woman",
        "children": "child",
        "policemen": "policeman",
        "knives": "knife",
        "mice": "mouse",
        "buses": "bus",
        "couches": "couch",
        "sandwiches": "sandwich",
        "boxes": "box",
        "puppies": "puppy",
        "ponies": "pony",
        "ties": "tie",
        "giraffes": "giraffe",
        "suitcases": "suitcase",
        "tvs": "tv",
        "skis": "ski",
        "glasses": "glass",
        "scissors": "scissors",
        "sheep": "sheep",
        "toothbrushes": "toothbrush",
        "oxen": "ox",
        "dress": "dress",
        "bus": "bus",
    }
    for word, want in plurals.items():
        assert singular(word) == want, word
    c = Chair()
    for word in syn:  # every single-word name's regular plural names its category
        if " " not in word and word.isalpha() and not word.endswith(("s", "y", "ch", "sh", "x", "man", "fe", "f")):
            assert syn[c.lemma(word + "s")] == syn[word], word


def test_caption_objects_follow_chairs_rules():
    c = Chair()
    assert c.objects("Two baby birds and a passenger jet near a hot dog stand.") == (
        ["bird", "jet", "hot dog"],
        ["bird", "airplane", "hot dog"],
    )
    assert c.objects("The seat of the toilet is up.")[1] == ["toilet"]  # not a chair
    assert c.objects("A man on a seat.")[1] == ["person", "chair"]
    assert c.objects("A bow tie and two teddy bears.")[1] == ["tie", "teddy bear"]


def test_scores_equal_a_hand_computation():
    caps = [
        "A man and his dog sit on a couch next to a cat.",  # couch, cat hallucinated; man, dog right
        "A toilet and a sink in a bathroom.",  # sink hallucinated
        "A table with plates.",
    ]  # no hallucination
    out = chair(caps, [1, 2, 3], INSTANCES, GT_CAPTIONS)
    # ground truth: 1 {person, dog, bench}, 2 {toilet}, 3 {dining table}
    mentions = [["person", "dog", "couch", "cat"], ["toilet", "sink"], ["dining table"]]
    assert [s["categories"] for s in out["sentences"]] == mentions
    assert out["CHAIR_i"] == pytest.approx(3 / 7) and out["CHAIR_s"] == pytest.approx(2 / 3)
    recalled, gt, generated = 2 + 1 + 1, 3 + 1 + 1, 4 + 2 + 1
    assert out["recall"] == pytest.approx(recalled / gt) and out["precision"] == pytest.approx(recalled / generated)
    r, p = recalled / gt, recalled / generated
    assert out["f1"] == pytest.approx(2 * r * p / (r + p))
    n_words = sum(len(Chair().words(c)) for c in caps)
    assert out["len"] == pytest.approx(0.01 * n_words / 3)
    assert out["sentences"][0]["hallucinated"] == [("couch", "couch"), ("cat", "cat")]
    assert out["sentences"][0]["CHAIR_i"] == pytest.approx(0.5)


def test_errors_and_empty_sets():
    c = Chair()
    c.add_instances(INSTANCES)
    with pytest.raises(ValueError, match="image 9 has no ground-truth objects"):
        c.score(["a dog"], [9])
    with pytest.raises(ValueError, match="2 captions but 1 image ids"):
        c.score(["a", "b"], [1])
    assert math.isnan(c.score(["an empty room ."], [1])["CHAIR_i"])
    with pytest.raises(ValueError, match="'unicorn' is not in the synonym table"):
        c.add_instances({"categories": [{"id": 5, "name": "unicorn"}], "annotations": [{"image_id": 1, "category_id": 5}]})


def test_the_chair_benchmark_scores_rows_and_reports_chair_i(tmp_path):
    """The eval side: the ``chair`` reader, the harness's per-row score (1 when a caption
    hallucinates) and the report's corpus-level CHAIR_s / CHAIR_i equal :class:`Chair`'s."""
    import json

    from jaxmm.eval import benchmarks as B
    from jaxmm.eval.chair import ground_truth_rows
    from jaxmm.eval.harness import score
    from jaxmm.eval.report import chair_metrics, score_tables

    rows = ground_truth_rows(INSTANCES, GT_CAPTIONS, tmp_path, [1, 2, 3], file_name="{}.png")
    assert rows[0] == {"image_id": 1, "image": str(tmp_path / "1.png"), "objects": ["bench", "dog", "person"]}
    f = tmp_path / "chair.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = B.load("chair", f)
    samples = [ds[i] for i in range(len(ds))]
    assert samples[0]["question"] == B.CHAIR_PROMPT and samples[0]["answer"] == ["bench", "dog", "person"]
    caps = ["A man and his dog sit on a couch next to a cat.", "A toilet and a sink in a bathroom.", "A table with plates."]
    results = []
    for s, cap in zip(samples, caps):
        parsed, sc = score(s, cap)
        results.append(
            {
                "benchmark": "chair",
                "id": s["id"],
                "method": "baseline",
                "parsed": parsed,
                "score": sc,
                "metric": "CHAIR_s (lower is better)",
            }
        )
    assert [r["score"] for r in results] == [1.0, 1.0, 0.0]
    want = chair(caps, [1, 2, 3], INSTANCES, GT_CAPTIONS)
    got = chair_metrics(results)["baseline"]
    assert got["CHAIR_s"] == pytest.approx(want["CHAIR_s"]) and got["CHAIR_i"] == pytest.approx(want["CHAIR_i"])
    assert "| baseline | 3 | 7 | 66.7 | 42.9 |" in score_tables(results)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image_id": 5, "image": "x.png", "objects": "dog"}) + "\n")
    with pytest.raises(ValueError, match="field 'objects' of image 5 must be a list"):
        B.load("chair", bad)
