"""Chat messages -> prompt token ids, through the checkpoint's own tokenizer and chat template.

Host side only (numpy + transformers' tokenizer; no jax). Mirrors what ``Qwen2_5_VLProcessor``
(``transformers/models/qwen2_5_vl/processing_qwen2_5_vl.py``, with ``ProcessorMixin.__call__`` /
``get_text_with_replacements`` / ``apply_chat_template`` in ``transformers/processing_utils.py``,
transformers 5.x) does to the text:

1. render the messages with the checkpoint's ``chat_template`` (``tokenizer.apply_chat_template(...,
   tokenize=False)``); the Qwen2.5-VL template writes each image part as
   ``<|vision_start|><|image_pad|><|vision_end|>`` and, without a system message, a default
   ``<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n`` turn;
2. replace the i-th ``<|image_pad|>`` of the text by ``image_token_counts[i]`` copies of it
   (``replace_image_token``: ``image_grid_thw[i].prod() // merge_size**2``, the merged tokens the
   LLM sees);
3. tokenise the expanded text (special tokens added only as the processor would: none for Qwen,
   whose tokenizer has no BOS).

The result's ``input_ids`` are identical to ``Qwen2_5_VLProcessor(text=..., images=...)["input_ids"]``
(tested in ``tests/test_chat.py``). Besides the ids, :func:`build_prompt` returns token spans that
attention methods use (all half-open ``(start, end)`` token ranges, ``(0, 0)`` when empty):

* ``system_span``: from token 0 up to, not including, the ``<|im_start|>`` of the FIRST user turn
  (``<|im_start|>user``). With the Qwen2.5-VL template this is the whole system turn, header,
  ``<|im_end|>`` and trailing newline included: the explicit system message, or the template's
  default one when there is none (AVAR's "S = positions from 0 to the user marker"). For a template
  without a default system turn (e.g. Qwen3-VL) and no system message it is ``(0, 0)``; it is also
  ``(0, 0)`` when the prompt has no user turn.
* ``question_spans``: the text tokens of the LAST user turn, after its ``<|im_start|>user\\n`` header
  and before its ``<|im_end|>``, as maximal runs of consecutive tokens: vision tokens
  (``<|vision_start|>``, ``<|image_pad|>``, ``<|video_pad|>``, ``<|vision_end|>``) and other special
  tokens excluded, so an image between two text parts splits the question into two runs.
* ``question_span``: one range from the first to the last question token (``question_spans[0][0]``,
  ``question_spans[-1][1]``); it contains the image tokens of an image placed between text parts.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from jaxmm.processing.padding import SIDES, nonempty, pad_rows, shift_spans

IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
USER_MARKER = IM_START + "user"
ROLES = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True)
class ChatFormat:
    """What a family's chat template writes, for expanding images and finding the spans.

    image_pad: the text the template writes for each image part, expanded to the image's tokens.
    user_marker: the text that opens a user turn (the system span ends before the first one).
    turn_end: the text that ends a user turn's text (the question span ends before it).
    special_tokens: tokens never counted as question text (besides the tokenizer's own specials).
    """

    image_pad: str
    user_marker: str
    turn_end: str
    special_tokens: tuple[str, ...] = ()


#: Qwen2-VL / Qwen2.5-VL / Qwen3-VL: ``<|im_start|>user\n ... <|im_end|>``
QWEN = ChatFormat(IMAGE_PAD, USER_MARKER, IM_END, (IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END, IM_START, IM_END))
#: LLaVA-1.5 (llava-hf): ``USER: <image>\n ... ASSISTANT:``
LLAVA = ChatFormat("<image>", "USER:", "ASSISTANT:", ("<image>",))


# ----------------------------------------------------------------------------- tokenizer
def load_tokenizer(model_dir: str | Path):
    """The checkpoint's tokenizer: ``AutoTokenizer.from_pretrained(model_dir, local_files_only=True)``.

    Needs ``tokenizer_config.json`` and ``tokenizer.json`` (or the ``vocab.json`` + ``merges.txt`` a
    fast tokenizer can be converted from). When the tokenizer config carries no ``chat_template``,
    the one of ``chat_template.json`` (processor format) or ``chat_template.jinja`` is attached.

    Raises:
        FileNotFoundError: naming ``model_dir`` and the missing files.
    """
    d = Path(model_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: no such checkpoint directory (the chat layer needs its tokenizer)")
    missing = [f for f in ("tokenizer_config.json",) if not (d / f).is_file()]
    if not (d / "tokenizer.json").is_file() and not ((d / "vocab.json").is_file() and (d / "merges.txt").is_file()):
        missing.append("tokenizer.json")
    if missing:
        raise FileNotFoundError(
            f"{d}: no {' / '.join(missing)} (the chat layer needs the checkpoint's tokenizer "
            f"files: tokenizer.json and tokenizer_config.json)"
        )
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    if getattr(tok, "chat_template", None) is None:
        if (d / "chat_template.json").is_file():
            tok.chat_template = json.loads((d / "chat_template.json").read_text()).get("chat_template")
        elif (d / "chat_template.jinja").is_file():
            tok.chat_template = (d / "chat_template.jinja").read_text()
    return tok


# ----------------------------------------------------------------------------- messages
def check_messages(messages) -> int:
    """Validates the HF chat format (a non-empty list of ``{'role', 'content'}`` dicts); returns the
    number of image parts. Raises ValueError naming the offending message or part."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(
            f"messages: expected a non-empty list of {{'role': ..., 'content': ...}} dicts, "
            f"got {type(messages).__name__}{'' if messages else ' (empty)'}"
        )
    n_images = 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}]: expected a dict with 'role' and 'content', got {type(m).__name__}")
        for key in ("role", "content"):
            if key not in m:
                raise ValueError(f"messages[{i}]: missing '{key}'")
        if m["role"] not in ROLES:
            raise ValueError(f"messages[{i}]['role']: {m['role']!r} is not one of {', '.join(ROLES)}")
        c = m["content"]
        if isinstance(c, str):
            continue
        if not isinstance(c, (list, tuple)):
            raise ValueError(
                f"messages[{i}]['content']: expected a string or a list of "
                f"{{'type': 'image'|'text', ...}} parts, got {type(c).__name__}"
            )
        for j, part in enumerate(c):
            where = f"messages[{i}]['content'][{j}]"
            if not isinstance(part, dict) or "type" not in part:
                raise ValueError(f"{where}: expected a dict with 'type' ('image' or 'text'), got {part!r}")
            if part["type"] == "image":
                n_images += 1
            elif part["type"] == "text":
                if not isinstance(part.get("text"), str):
                    raise ValueError(f"{where}['text']: expected a string, got {part.get('text')!r}")
            else:
                raise ValueError(f"{where}['type']: {part['type']!r} is not supported (use 'image' or 'text')")
    return n_images


def images_of(messages) -> list:
    """The ``image`` entries of the image parts, in prompt order (``None`` for parts without one).

    Image parts may carry the image itself: ``{"type": "image", "image": PIL image | array | path}``.
    """
    return [
        p.get("image") for m in messages if not isinstance(m["content"], str) for p in m["content"] if p.get("type") == "image"
    ]


def _expand_image_pads(text: str, counts: Sequence[int], pad: str = IMAGE_PAD) -> str:
    """The i-th ``pad`` -> ``counts[i]`` copies (``ProcessorMixin.get_text_with_replacements``)."""
    pieces = text.split(pad)
    return pieces[0] + "".join(pad * n + p for n, p in zip(counts, pieces[1:]))


def _special_ids(tokenizer, chat: ChatFormat) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", ()) or ())
    for t in chat.special_tokens:
        i = tokenizer.convert_tokens_to_ids(t)
        if i is not None and i != getattr(tokenizer, "unk_token_id", None):
            ids.add(int(i))
    return ids


def build_prompt(
    messages,
    tokenizer,
    image_token_counts: Sequence[int] | None = None,
    *,
    add_generation_prompt: bool = True,
    chat: ChatFormat = QWEN,
    **template_kwargs,
) -> dict:
    """Renders, expands and tokenises one conversation (see the module docstring).

    Args:
        messages: HF chat format, ``[{"role": "system"|"user"|"assistant", "content": str | [parts]}]``
            with parts ``{"type": "image"}`` (optionally ``"image": ...``) or ``{"type": "text",
            "text": str}``.
        tokenizer: the checkpoint's fast tokenizer (:func:`load_tokenizer`), with a ``chat_template``.
        image_token_counts: per image part, in prompt order, the number of ``<|image_pad|>`` tokens
            (``t·h·w // merge²`` of its ``image_grid_thw``); ``None`` or empty for text-only prompts.
            May also be given by keyword.
        add_generation_prompt: append the ``<|im_start|>assistant\\n`` header.
        chat: the family's :class:`ChatFormat` (:data:`QWEN`, :data:`LLAVA`).
        **template_kwargs: passed to the template (e.g. ``add_vision_id=True``).

    Returns:
        dict with ``text`` (str, image pads expanded), ``input_ids`` np.int64 [S], ``system_span``
        and ``question_span`` ((start, end) ints, half-open, ``(0, 0)`` when empty), and
        ``question_spans`` (list of (start, end) runs of question text tokens).

    Raises:
        ValueError: malformed messages (naming the message index and field); a number of image parts
            different from ``len(image_token_counts)``, or a count < 1; a template that renders a
            different number of ``<|image_pad|>`` than there are image parts; no chat template.
    """
    n_images = check_messages(messages)
    counts = [] if image_token_counts is None else list(image_token_counts)
    if n_images != len(counts):
        raise ValueError(f"messages hold {n_images} images but image_token_counts has {len(counts)}")
    for k, n in enumerate(counts):
        if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"image_token_counts[{k}]: expected a positive integer, got {n!r}")
    counts = [int(n) for n in counts]
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"{type(tokenizer).__name__} has no chat_template (load the checkpoint's tokenizer "
            f"with jaxmm.processing.chat.load_tokenizer)"
        )
    text = tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=add_generation_prompt, **template_kwargs
    )
    rendered = text.count(chat.image_pad)
    if rendered != n_images:
        raise ValueError(
            f"the chat template rendered {rendered} {chat.image_pad} for {n_images} image parts "
            f"(does a text part contain {chat.image_pad}?)"
        )
    text = _expand_image_pads(text, counts, chat.image_pad)
    # ProcessorMixin.apply_chat_template(tokenize=True): no special tokens when the text starts with BOS.
    bos = getattr(tokenizer, "bos_token", None)
    add_special = not (bos is not None and text.startswith(bos))
    enc = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], np.int64).reshape(-1)
    offsets = np.asarray(enc["offset_mapping"], np.int64).reshape(-1, 2)
    system_span = _system_span(text, offsets, chat)
    question_spans = _question_spans(text, offsets, ids, _special_ids(tokenizer, chat), chat)
    question_span = (question_spans[0][0], question_spans[-1][1]) if question_spans else (0, 0)
    return {
        "text": text,
        "input_ids": ids,
        "system_span": system_span,
        "question_span": question_span,
        "question_spans": question_spans,
    }


def _system_span(text: str, offsets: np.ndarray, chat: ChatFormat) -> tuple[int, int]:
    k = text.find(chat.user_marker)
    if k < 0:
        return (0, 0)
    # first token starting at or after the marker (tokens added by the tokenizer have offsets (0, 0))
    real = offsets[:, 1] > offsets[:, 0]
    after = np.flatnonzero(real & (offsets[:, 0] >= k))
    return (0, int(after[0]) if len(after) else len(offsets))


def _question_spans(
    text: str, offsets: np.ndarray, ids: np.ndarray, special: set[int], chat: ChatFormat
) -> list[tuple[int, int]]:
    headers = list(re.finditer(re.escape(chat.user_marker) + r"\n?", text))
    if not headers:
        return []
    a = headers[-1].end()
    b = text.find(chat.turn_end, a)
    b = len(text) if b < 0 else b
    keep = (
        (offsets[:, 0] >= a)
        & (offsets[:, 1] <= b)
        & (offsets[:, 1] > offsets[:, 0])
        & ~np.isin(ids, np.fromiter(special, np.int64, len(special)))
    )
    runs, start = [], None
    for i, k in enumerate(keep.tolist() + [False]):
        if k and start is None:
            start = i
        elif not k and start is not None:
            runs.append((start, i))
            start = None
    return runs


def batch_prompts(
    list_of_messages,
    tokenizer,
    image_token_counts_per_prompt=None,
    padding_side: str = "left",
    pad_token_id: int | None = None,
    *,
    add_generation_prompt: bool = True,
    chat: ChatFormat = QWEN,
    pad_to_multiple_of: int | None = None,
    **template_kwargs,
) -> dict:
    """Several conversations -> one padded batch (each row built by :func:`build_prompt`, padded by
    :func:`jaxmm.processing.padding.pad_rows`).

    Args:
        list_of_messages: B conversations.
        image_token_counts_per_prompt: B lists of image token counts (``None``: all text-only).
        padding_side: ``"left"`` (generation) or ``"right"``.
        chat: the family's :class:`ChatFormat`.
        pad_token_id: id at padded positions; default the tokenizer's pad token, else 0.
        pad_to_multiple_of: pad S up to a multiple of this many tokens (bucketing), on
            ``padding_side``.

    Returns:
        dict with ``input_ids`` and ``attention_mask`` np.int64 [B, S] (S the longest prompt, rounded
        up to ``pad_to_multiple_of``; mask 1 on tokens, 0 on padding), ``system_spans`` (per row a
        list holding the row's ``system_span``, or empty when that span is empty) and
        ``question_spans`` (per row the ``question_spans`` runs), all shifted by the row's left
        padding, ``texts`` (B rendered prompts) and ``lengths`` (B ints).

    Raises:
        ValueError: an empty batch, ``padding_side`` not left/right, B conversations but a different
            number of count lists, or any :func:`build_prompt` error (prefixed with the row index).
    """
    if padding_side not in SIDES:
        raise ValueError(f"padding_side={padding_side!r}; expected 'left' or 'right'")
    convs = list(list_of_messages)
    if not convs:
        raise ValueError("batch_prompts: no conversations")
    counts = [None] * len(convs) if image_token_counts_per_prompt is None else list(image_token_counts_per_prompt)
    if len(counts) != len(convs):
        raise ValueError(f"{len(convs)} conversations but {len(counts)} image_token_counts lists")
    pad = pad_token_id if pad_token_id is not None else getattr(tokenizer, "pad_token_id", None)
    pad = 0 if pad is None else int(pad)
    prompts = []
    for row, (c, n) in enumerate(zip(convs, counts)):
        try:
            prompts.append(
                build_prompt(c, tokenizer, n, add_generation_prompt=add_generation_prompt, chat=chat, **template_kwargs)
            )
        except ValueError as e:
            raise ValueError(f"conversation {row}: {e}") from e
    ids, am, offsets = pad_rows([p["input_ids"] for p in prompts], padding_side, pad, multiple_of=pad_to_multiple_of)
    return {
        "input_ids": ids,
        "attention_mask": am,
        "system_spans": shift_spans([nonempty(p["system_span"]) for p in prompts], offsets),
        "question_spans": shift_spans([p["question_spans"] for p in prompts], offsets),
        "texts": [p["text"] for p in prompts],
        "lengths": [len(p["input_ids"]) for p in prompts],
    }


# ----------------------------------------------------------------------------- outputs
def decode(tokenizer, ids, skip_special_tokens: bool = True) -> str:
    """Token ids (1-D list / np / jax array) -> text, as ``Qwen2_5_VLProcessor.post_process_image_text_to_text``
    (``clean_up_tokenization_spaces=False``)."""
    flat = np.asarray(ids)
    if flat.ndim > 1:
        raise ValueError(f"decode: expected 1-D token ids, got shape {flat.shape}")
    return tokenizer.decode(
        [int(i) for i in flat.reshape(-1)], skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
    )


_THINK = re.compile(r"<\s*think\s*>(.*?)<\s*/\s*think\s*>", re.S | re.I)
_ANSWER = re.compile(r"<\s*answer\s*>((?:(?!<\s*answer\s*>).)*?)<\s*/\s*answer\s*>", re.S | re.I)


def extract_think(text: str) -> str | None:
    """Content of the FIRST ``<think>…</think>``, stripped of surrounding whitespace/newlines; None when
    there is no closed pair (e.g. a generation cut before ``</think>``). Tags are matched
    case-insensitively and may hold spaces (``< think >``, ``</ think>``); content may span lines.
    An empty pair gives ``""``."""
    m = _THINK.search(text)
    return m.group(1).strip() if m else None


def extract_answer(text: str) -> str | None:
    """Content of the LAST ``<answer>…</answer>``, stripped; None when there is no closed pair. Tags as
    in :func:`extract_think`; an ``<answer>`` reopened before its ``</answer>`` restarts the span
    (``<answer>a <answer>b</answer>`` gives ``"b"``)."""
    found = _ANSWER.findall(text)
    return found[-1].strip() if found else None
