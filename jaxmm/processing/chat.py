"""Chat messages -> prompt token ids, through the checkpoint's own tokenizer and chat template.

Mirrors ``Qwen2_5_VLProcessor`` (``transformers/models/qwen2_5_vl/processing_qwen2_5_vl.py``): the
template renders each image as ``<|vision_start|><|image_pad|><|vision_end|>``, then every
``<|image_pad|>`` is expanded to the image's number of merged tokens (t·h·w / merge²) before
tokenising. Also returns the spans attention methods need:

* ``system_span``: tokens from the start of the prompt up to (not including) the first
  ``<|im_start|>user`` marker — the system turn, or the template's default system turn (AVAR's
  "S = positions from 0 to the user marker");
* ``question_span``: the text of the last user turn (after its ``<|im_start|>user\\n`` header, up to
  its ``<|im_end|>``), the vision tokens excluded; a (start, end) pair covering the first to the last
  question token.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np

IMAGE_PAD = "<|image_pad|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
USER_MARKER = "<|im_start|>user"


def load_tokenizer(model_dir: str | Path):
    """The checkpoint's tokenizer (``tokenizer.json`` + ``tokenizer_config.json``), local files only."""
    d = Path(model_dir)
    if not (d / "tokenizer.json").exists() and not (d / "tokenizer_config.json").exists():
        raise FileNotFoundError(f"{d}: no tokenizer.json / tokenizer_config.json (the chat layer needs the "
                                f"checkpoint's tokenizer)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(d), local_files_only=True)


def _check_messages(messages):
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages: expected a non-empty list of {'role': ..., 'content': ...} dicts")
    n_images = 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"messages[{i}]: expected a dict with 'role' and 'content'")
        if m["role"] not in ("system", "user", "assistant"):
            raise ValueError(f"messages[{i}]['role']: {m['role']!r} is not system, user or assistant")
        c = m["content"]
        if isinstance(c, str):
            continue
        if not isinstance(c, (list, tuple)):
            raise ValueError(f"messages[{i}]['content']: expected a string or a list of parts")
        for j, part in enumerate(c):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image":
                n_images += 1
            elif kind != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"messages[{i}]['content'][{j}]: expected {{'type': 'image'}} or "
                                 f"{{'type': 'text', 'text': str}}, got {part!r}")
    return n_images


def images_of(messages) -> list:
    """The ``image`` objects of the image parts, in order (parts may carry ``"image": PIL/path``)."""
    return [p.get("image") for m in messages if not isinstance(m["content"], str)
            for p in m["content"] if p.get("type") == "image"]


def build_prompt(messages, tokenizer, image_token_counts: Sequence[int] = (), *,
                 add_generation_prompt: bool = True) -> dict:
    """Renders and tokenises one conversation.

    Returns:
        ``text`` (str, image pads expanded), ``input_ids`` int64 [S], ``system_span`` and
        ``question_span`` (half-open token ranges; (0, 0) when absent).

    Raises:
        ValueError: malformed messages (naming the message and field), or a number of image parts
            different from ``len(image_token_counts)``.
    """
    n_images = _check_messages(messages)
    if n_images != len(image_token_counts):
        raise ValueError(f"messages hold {n_images} images but image_token_counts has {len(image_token_counts)}")
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)
    pieces = text.split(IMAGE_PAD)
    if len(pieces) - 1 != n_images:
        raise ValueError(f"the chat template rendered {len(pieces) - 1} {IMAGE_PAD} for {n_images} images")
    text = pieces[0] + "".join(IMAGE_PAD * int(n) + p for n, p in zip(image_token_counts, pieces[1:]))
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    ids = np.asarray(enc["input_ids"], np.int64)
    offsets = np.asarray(enc["offset_mapping"]).reshape(-1, 2)
    system_span = _system_span(text, offsets)
    question_span = _question_span(text, offsets, ids, tokenizer)
    return {"text": text, "input_ids": ids, "system_span": system_span, "question_span": question_span}


def _system_span(text, offsets):
    k = text.find(USER_MARKER)
    if k < 0:
        return (0, 0)
    return (0, int(np.searchsorted(offsets[:, 0], k, side="left")))


def _question_span(text, offsets, ids, tokenizer):
    starts = [m.end() for m in re.finditer(re.escape(USER_MARKER) + r"\n?", text)]
    if not starts:
        return (0, 0)
    a = starts[-1]
    b = text.find("<|im_end|>", a)
    b = len(text) if b < 0 else b
    skip = {tokenizer.convert_tokens_to_ids(t) for t in (IMAGE_PAD, VISION_START, VISION_END)}
    inside = [i for i, (s, e) in enumerate(offsets) if s >= a and e <= b and e > s and int(ids[i]) not in skip]
    return (inside[0], inside[-1] + 1) if inside else (0, 0)


def batch_prompts(conversations, tokenizer, image_token_counts_per_prompt, *, padding_side: str = "left",
                  pad_token_id: int | None = None, add_generation_prompt: bool = True) -> dict:
    """Several conversations -> padded ``input_ids``/``attention_mask`` int64 [B,S] and per-row
    ``system_spans``/``question_spans`` (lists of one (start, end) each, shifted by the padding)."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side={padding_side!r}; expected 'left' or 'right'")
    pad = pad_token_id if pad_token_id is not None else (tokenizer.pad_token_id or 0)
    prompts = [build_prompt(c, tokenizer, n, add_generation_prompt=add_generation_prompt)
               for c, n in zip(conversations, image_token_counts_per_prompt)]
    s = max(len(p["input_ids"]) for p in prompts)
    ids = np.full((len(prompts), s), pad, np.int64)
    am = np.zeros((len(prompts), s), np.int64)
    sys_spans, q_spans = [], []
    for i, p in enumerate(prompts):
        n = len(p["input_ids"])
        off = s - n if padding_side == "left" else 0
        ids[i, off:off + n] = p["input_ids"]
        am[i, off:off + n] = 1
        shift = lambda span: [(span[0] + off, span[1] + off)] if span[1] > span[0] else []
        sys_spans.append(shift(p["system_span"]))
        q_spans.append(shift(p["question_span"]))
    return {"input_ids": ids, "attention_mask": am, "system_spans": sys_spans, "question_spans": q_spans,
            "texts": [p["text"] for p in prompts]}


def decode(tokenizer, ids, skip_special_tokens: bool = True) -> str:
    return tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def extract_think(text: str) -> str | None:
    """Content of the first ``<think>…</think>`` (stripped), or None."""
    m = re.search(r"<think>(.*?)</think>", text, flags=re.S)
    return m.group(1).strip() if m else None


def extract_answer(text: str) -> str | None:
    """Content of the LAST ``<answer>…</answer>`` (stripped), or None."""
    found = re.findall(r"<answer>(.*?)</answer>", text, flags=re.S)
    return found[-1].strip() if found else None
