"""Answer parsing and scoring rules of the field's benchmarks.

* ``option_letter``: the chosen option letter (MMStar, MMBench, MathVista multi-choice).
* ``exact``: normalised exact match (lower case, articles/punctuation stripped; numbers compared
  as numbers) — the grounded benchmark, MathVista free-form, TextVQA single-answer fallback.
* ``relaxed``: ChartQA's relaxed accuracy (numeric answers within 5 % relative error).
* ``anls``: DocVQA's average normalised Levenshtein similarity (τ = 0.5), max over references.
* ``yes_no``: POPE / HallusionBench yes-no answers.
* ``vqa``: TextVQA's soft accuracy min(1, #matching references / 3).

The text scored is the ``<answer>`` span when the model produced one, else the whole completion.
:data:`METRIC` names the score each rule gives, as the benchmark's authors name it.
"""

from __future__ import annotations

import re

from jaxmm.processing.chat import extract_answer

METRIC = {"option_letter": "accuracy", "yes_no": "accuracy", "exact": "exact match", "relaxed": "relaxed accuracy",
          "anls": "ANLS", "vqa": "VQA accuracy", "chair": "CHAIR_s (lower is better)"}

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = re.compile(r"[^\w\s.\-]")


def answer_text(completion: str) -> str:
    a = extract_answer(completion)
    return (a if a is not None else completion).strip()


def normalize(s: str) -> str:
    s = _PUNCT.sub(" ", s.lower())
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split()).strip(" .")


def _number(s: str):
    try:
        return float(s.replace(",", "").rstrip("%"))
    except ValueError:
        return None


def option_letter(text: str, letters: str = "ABCDEFGHIJ") -> str | None:
    """The option letter a completion chooses: "(B)", "B.", "Answer: B", a lone "B"."""
    t = answer_text(text)
    for pat in (r"^\(?([A-J])\)?(?:[.:)\s]|$)", r"answer(?: is)?[:\s]*\(?([A-J])\)?\b", r"\(([A-J])\)", r"\b([A-J])\b"):
        m = re.search(pat, t, flags=re.I if "answer" in pat else 0)
        if m and m.group(1).upper() in letters:
            return m.group(1).upper()
    return None


def exact(prediction: str, answer: str) -> float:
    p, a = normalize(answer_text(prediction)), normalize(answer)
    pn, an = _number(p), _number(a)
    if pn is not None and an is not None:
        return float(pn == an)
    return float(p == a or (len(a) > 0 and p.split(" ")[:len(a.split())] == a.split() and len(p.split()) <= len(a.split()) + 1))


def relaxed(prediction: str, answer: str, tolerance: float = 0.05) -> float:
    p, a = normalize(answer_text(prediction)), normalize(answer)
    pn, an = _number(p), _number(a)
    if pn is not None and an is not None:
        return float(pn == an if an == 0 else abs(pn - an) / abs(an) <= tolerance)
    return float(p == a)


def _levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def anls(prediction: str, answers: list[str], tau: float = 0.5) -> float:
    p = " ".join(answer_text(prediction).lower().split())
    best = 0.0
    for a in answers:
        a = " ".join(a.lower().split())
        nl = _levenshtein(p, a) / max(len(p), len(a), 1)
        best = max(best, 1 - nl if nl < tau else 0.0)
    return best


def yes_no(prediction: str) -> str | None:
    t = normalize(answer_text(prediction))
    m = re.search(r"\b(yes|no)\b", t)
    return m.group(1) if m else None


def vqa(prediction: str, answers: list[str]) -> float:
    p = normalize(answer_text(prediction))
    return min(1.0, sum(normalize(a) == p for a in answers) / 3.0)
