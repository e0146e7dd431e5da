"""CHAIR: object hallucination in image captions (Rohrbach et al., EMNLP 2018), as PAI (ECCV 2024)
computes it in its ``chair.py`` / ``chair_eval.py``.

A caption's MSCOCO objects are found by: lower-casing and tokenising it, reducing each word to its
lemma, merging two-word names (``"hot dog"``, ``"traffic light"``; ``"baby bird"`` → ``bird``,
``"passenger jet"`` → ``jet``, ``"bow tie"`` → ``tie``, ``"toilet seat"`` → ``toilet``), dropping
``seat`` from captions that name a toilet, and keeping the words of the synonym table
(``jaxmm/eval/data/coco_synonyms.txt``), each mapped to its category (its *node word*). An image's
ground-truth objects are the categories of its COCO instance annotations and of the objects named
in its ground-truth captions (found the same way). Then, over a set of generated captions:

* ``CHAIR_i`` = hallucinated object mentions / all object mentions (a mention is hallucinated when
  its category is not among the image's ground-truth objects; repeats count);
* ``CHAIR_s`` = captions with at least one hallucinated mention / all captions;
* ``recall`` = Σ |ground-truth categories mentioned| / Σ |ground-truth categories|; ``precision`` =
  Σ |ground-truth categories mentioned| / Σ |distinct categories mentioned|; ``f1``; ``len`` =
  0.01 · mean number of words (PAI's "Len").

Lemmas: PAI's script lemmatises with NLTK's POS tagger and WordNet (data files this package does not
download); jaxmm singularises nouns by rule (:func:`singular`: irregular plurals, ``-ies``,
``-men``, ``-ches``/``-shes``/``-xes``/``-sses``, ``-oes``, a final ``-s``), which gives the same lemma for
the plural nouns of the synonym table (tested) but also turns a verb like "ties" into "tie", as
WordNet does for nouns. Quantities undefined for an empty set (no mentions, no captions) are NaN.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Sequence

SYNONYMS = Path(__file__).with_name("data") / "coco_synonyms.txt"

#: two-word object names treated as one word (CHAIR's ``coco_double_words``)
DOUBLE_WORDS = (
    "motor bike",
    "motor cycle",
    "air plane",
    "traffic light",
    "street light",
    "traffic signal",
    "stop light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "suit case",
    "sports ball",
    "baseball bat",
    "baseball glove",
    "tennis racket",
    "wine glass",
    "hot dog",
    "cell phone",
    "mobile phone",
    "teddy bear",
    "hair drier",
    "potted plant",
    "bow tie",
    "laptop computer",
    "stove top oven",
    "home plate",
    "train track",
)
#: "baby X" / "adult X" name the animal X, not a person; "passenger X" the vehicle X
ANIMAL_WORDS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub")
VEHICLE_WORDS = ("jet", "train")

_IRREGULAR = {
    "men": "man",
    "women": "woman",
    "children": "child",
    "mice": "mouse",
    "geese": "goose",
    "feet": "foot",
    "teeth": "tooth",
    "oxen": "ox",
    "knives": "knife",
    "wives": "wife",
    "leaves": "leaf",
    "shelves": "shelf",
    "calves": "calf",
    "halves": "half",
    "loaves": "loaf",
    "wolves": "wolf",
    "scarves": "scarf",
    "buses": "bus",
    "people": "people",
    "police": "police",
    "sheep": "sheep",
    "scissors": "scissors",
    "glasses": "glass",
    "skis": "ski",
    "taxis": "taxi",
    "series": "series",
    "species": "species",
}
_KEEP = ("ss", "us", "is", "ous")


def singular(word: str) -> str:
    """A noun's singular by rule (see the module docstring); other words pass through mostly unchanged."""
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if word.endswith("men") and len(word) > 4:  # policemen, gentlemen, servicemen
        return word[:-3] + "man"
    if len(word) <= 2 or not word.endswith("s") or word.endswith(_KEEP):
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("ches", "shes", "xes", "sses", "zzes")):
        return word[:-2]
    if word.endswith("oes") and word not in ("shoes", "canoes", "toes"):
        return word[:-2]
    return word[:-1]


def load_synonyms(path: str | Path = SYNONYMS) -> dict[str, str]:
    """The synonym table -> ``{word or phrase: category}``. Lines are split as CHAIR splits them (on
    ``", "``, after stripping the line), so an entry written with a doubled space keeps its leading
    space and never matches, as in the original.

    Raises:
        FileNotFoundError: no such file. ValueError: a line without a category (names the file and line).
    """
    table = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        names = line.strip().split(", ")
        if not names[0]:
            raise ValueError(f"{path}:{n}: no category name")
        for name in names:
            table[name] = names[0]
    return table


class Chair:
    """CHAIR with a synonym table (default: the shipped one) and per-image ground truth.

    Attributes:
        synonyms: ``{word or phrase: category}``.
        ground_truth: ``{image_id: set of categories}`` (:meth:`add_instances`, :meth:`add_captions`).
    """

    def __init__(self, synonyms: dict[str, str] | None = None):
        self.synonyms = load_synonyms() if synonyms is None else dict(synonyms)
        self.double = {w: w for w in DOUBLE_WORDS}
        for a in ANIMAL_WORDS:
            self.double[f"baby {a}"] = a
            self.double[f"adult {a}"] = a
        for v in VEHICLE_WORDS:
            self.double[f"passenger {v}"] = v
        self.double.update({"bow tie": "tie", "toilet seat": "toilet", "wine glas": "wine glass"})
        self.ground_truth: dict = defaultdict(set)

    # ------------------------------------------------------------------ captions
    def words(self, caption: str) -> list[str]:
        """The caption's lemmas with two-word names merged (CHAIR's ``double_words``)."""
        toks = [self.lemma(t) for t in re.findall(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]", caption.lower())]
        out, i = [], 0
        while i < len(toks):
            pair = " ".join(toks[i : i + 2])
            if pair in self.double:
                out.append(self.double[pair])
                i += 2
            else:
                out.append(toks[i])
                i += 1
        return out

    def lemma(self, word: str) -> str:
        """A table word as it is; a table word plus ``s`` as that word (``magpies``, ``collies``);
        else :func:`singular`."""
        if word in self.synonyms:
            return word
        if word.endswith("s") and word[:-1] in self.synonyms:
            return word[:-1]
        return singular(word)

    def objects(self, caption: str, words: list[str] | None = None) -> tuple[list[str], list[str]]:
        """``(mentions, categories)``: the caption's object words in order and the category of each
        (``words``: the caption's :meth:`words`, when already computed)."""
        words = self.words(caption) if words is None else words
        if "toilet" in words and "seat" in words:
            words = [w for w in words if w != "seat"]
        mentions = [w for w in words if w in self.synonyms]
        return mentions, [self.synonyms[w] for w in mentions]

    # ------------------------------------------------------------------ ground truth
    def add_instances(self, instances: dict | str | Path) -> None:
        """Adds the categories of COCO instance annotations (``instances_*.json``: ``categories`` and
        ``annotations`` with ``image_id`` and ``category_id``).

        Raises:
            ValueError: a category name the synonym table does not know (names it).
        """
        d = _json(instances)
        names = {c["id"]: c["name"] for c in d["categories"]}
        for a in d["annotations"]:
            name = names[a["category_id"]]
            if name not in self.synonyms:
                raise ValueError(f"instance category {name!r} is not in the synonym table")
            self.ground_truth[a["image_id"]].add(self.synonyms[name])

    def add_captions(self, captions: dict | str | Path) -> None:
        """Adds the objects named in ground-truth captions (``captions_*.json``: ``annotations`` with
        ``image_id`` and ``caption``)."""
        for a in _json(captions)["annotations"]:
            self.ground_truth[a["image_id"]].update(self.objects(a["caption"])[1])

    # ------------------------------------------------------------------ the metric
    def score(self, captions: Sequence[str], image_ids: Sequence) -> dict:
        """CHAIR over generated ``captions`` of ``image_ids`` (same length).

        Returns:
            ``{"CHAIR_s", "CHAIR_i", "recall", "precision", "f1", "len"}`` (fractions, NaN where
            undefined) and ``"sentences"``: per caption its ``image_id``, ``mentions``,
            ``categories``, ``hallucinated`` ((word, category) pairs) and ``CHAIR_i``.

        Raises:
            ValueError: different numbers of captions and image ids, or an image without ground truth.
        """
        if len(captions) != len(image_ids):
            raise ValueError(f"{len(captions)} captions but {len(image_ids)} image ids")
        n_hall_caps = n_hall = n_mentions = n_words = 0
        n_recalled = n_gt = n_generated = 0
        sentences = []
        for cap, imid in zip(captions, image_ids):
            if imid not in self.ground_truth:
                raise ValueError(f"image {imid!r} has no ground-truth objects (add its instances and captions)")
            gt = self.ground_truth[imid]
            words = self.words(cap)
            mentions, cats = self.objects(cap, words)
            hall = [(w, c) for w, c in zip(mentions, cats) if c not in gt]
            n_mentions += len(cats)
            n_hall += len(hall)
            n_hall_caps += bool(hall)
            n_words += len(words)
            n_gt += len(gt)
            n_generated += len(set(cats))
            n_recalled += len(set(cats) & gt)
            sentences.append(
                {
                    "image_id": imid,
                    "mentions": mentions,
                    "categories": cats,
                    "hallucinated": hall,
                    "CHAIR_i": len(hall) / len(cats) if cats else 0.0,
                }
            )
        div = lambda a, b: a / b if b else math.nan
        recall, precision = div(n_recalled, n_gt), div(n_recalled, n_generated)
        f1 = div(2 * recall * precision, recall + precision) if not math.isnan(recall + precision) else math.nan
        return {
            "CHAIR_s": div(n_hall_caps, len(captions)),
            "CHAIR_i": div(n_hall, n_mentions),
            "recall": recall,
            "precision": precision,
            "f1": f1,
            "len": div(0.01 * n_words, len(captions)),
            "sentences": sentences,
        }


def _json(x):
    if isinstance(x, dict):
        return x
    return json.loads(Path(x).read_text())


def chair(captions: Iterable[str], image_ids: Iterable, instances, gt_captions=None) -> dict:
    """One call: :class:`Chair` with the shipped synonyms, ground truth from COCO ``instances`` (and
    ``gt_captions``) annotation dicts or files, scored on ``captions`` of ``image_ids``."""
    c = Chair()
    c.add_instances(instances)
    if gt_captions is not None:
        c.add_captions(gt_captions)
    return c.score(list(captions), list(image_ids))


def ground_truth_rows(
    instances, gt_captions, image_dir: str | Path, image_ids: Iterable | None = None, file_name: str = "COCO_val2014_{:012d}.jpg"
) -> list[dict]:
    """The rows of a ``chair`` benchmark file (write them as JSONL): per COCO image ``image_id``,
    ``image`` (its path, ``image_dir / file_name.format(image_id)``) and ``objects`` (its
    ground-truth categories from ``instances`` and ``gt_captions``, sorted). PAI samples 500 images
    of COCO val2014; pass their ids as ``image_ids`` (default: every annotated image)."""
    c = Chair()
    c.add_instances(instances)
    c.add_captions(gt_captions)
    ids = sorted(c.ground_truth) if image_ids is None else list(image_ids)
    return [
        {"image_id": i, "image": str(Path(image_dir) / file_name.format(i)), "objects": sorted(c.ground_truth[i])} for i in ids
    ]
