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

METRIC = {
    "option_letter": "accuracy",
    "yes_no": "accuracy",
    "exact": "exact match",
    "relaxed": "relaxed accuracy",
    "anls": "ANLS",
    "vqa": "VQA accuracy",
    "chair": "CHAIR_s (lower is better)",
}

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = re.compile(r"[^\w\s.\-]")


def answer_text(completion: str) -> str:
    """The answer part of a completion: the text inside ``<answer>…</answer>`` when there is one
    (reasoning prompts), else the whole completion; stripped."""
    a = extract_answer(completion)
    return (a if a is not None else completion).strip()


def normalize(s: str) -> str:
    """Lower case, punctuation other than ``.`` and ``-`` replaced by spaces, articles (a, an, the)
    dropped, whitespace collapsed, leading/trailing spaces and dots stripped (the VQA-style
    normalisation the exact, relaxed, yes/no and VQA scorers share)."""
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
    """Exact match, 1.0 or 0.0, after :func:`normalize`: numbers compare by value ("1,000" = "1000");
    otherwise equal text, or the answer's words followed by at most one more word ("red car" for
    "red")."""
    p, a = normalize(answer_text(prediction)), normalize(answer)
    pn, an = _number(p), _number(a)
    if pn is not None and an is not None:
        return float(pn == an)
    return float(p == a or (len(a) > 0 and p.split(" ")[: len(a.split())] == a.split() and len(p.split()) <= len(a.split()) + 1))


def relaxed(prediction: str, answer: str, tolerance: float = 0.05) -> float:
    """ChartQA's relaxed accuracy, 1.0 or 0.0: a number within ``tolerance`` (relative, 5 %) of a
    numeric answer (exactly 0 for an answer of 0); other answers by equal normalised text."""
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
    """DocVQA's ANLS in [0, 1]: the best over ``answers`` of 1 − (Levenshtein distance / longer
    length), lower-cased with whitespace collapsed; 0 where the normalised distance is ≥ ``tau``
    (0.5; Biten et al., ICCV 2019)."""
    p = " ".join(answer_text(prediction).lower().split())
    best = 0.0
    for a in answers:
        a = " ".join(a.lower().split())
        nl = _levenshtein(p, a) / max(len(p), len(a), 1)
        best = max(best, 1 - nl if nl < tau else 0.0)
    return best


def yes_no(prediction: str) -> str | None:
    """``"yes"`` or ``"no"``: the first of the two words in the normalised answer text (POPE,
    HallusionBench), or None when neither appears."""
    t = normalize(answer_text(prediction))
    m = re.search(r"\b(yes|no)\b", t)
    return m.group(1) if m else None


def vqa(prediction: str, answers: list[str]) -> float:
    """VQA accuracy in [0, 1] (TextVQA): min(1, #annotators whose normalised answer equals the
    prediction / 3) over the (usually ten) ``answers``."""
    p = normalize(answer_text(prediction))
    return min(1.0, sum(normalize(a) == p for a in answers) / 3.0)
