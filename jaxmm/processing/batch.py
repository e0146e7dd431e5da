"""The host pipeline: everything that becomes a model input ``Batch``, in one place.

Host side (numpy). Four kinds of input, one function each, all ending in the family's
``prepare_batch`` (checks, M-RoPE positions, the vision tower's index arrays, the
:class:`~jaxmm.processing.layout.TokenLayout`):

(a) chat messages with images: :func:`chat_batch` (``Model.prepare_chat``, the eval harness, GRPO
    rollouts, the CLI);
(b) HF-processor tensors (``input_ids``, ``attention_mask``, ``pixel_values``, ``image_grid_thw``, …):
    :func:`tensor_batch` (``Model.prepare``, ``Model.forward``);
(c) supervised examples, a prompt plus its answer with labels: :func:`sft_example` per example,
    :func:`sft_batch` for a batch (SFT);
(d) prompts plus sampled completions, teacher-forced: :func:`completion_batch` (GRPO scoring).

Padding, span shifting and bucketing are :mod:`jaxmm.processing.padding`'s; region weights from
boxes are :func:`region_weights` (over the family's ``region_weights``); the ids that end a
generated row and the id generation pads with are :func:`stop_tokens` and :func:`pad_token_id`.

``model`` below is anything with ``family`` (a :class:`~jaxmm.models.registry.Family`),
``config``, ``tokenizer`` and ``image_processor``: a :class:`jaxmm.loading.Model`.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from jaxmm.processing.chat import batch_prompts, build_prompt, check_messages, images_of
from jaxmm.processing.image import open_image, pixel_inputs
from jaxmm.processing.padding import nonempty, pad_rows, shift_spans
from jaxmm.stopping import stop_token_ids

#: label of positions the loss ignores (HF convention)
IGNORE_INDEX = -100


# ----------------------------------------------------------------------------- messages
def vqa_messages(question: str, images: Sequence = (), system: str | None = None, answer: str | None = None) -> list[dict]:
    """One visual question as chat messages: an optional system turn, a user turn of one image
    part per entry of ``images`` (``{"type": "image", "image": ...}``) then the question text, and
    with ``answer`` an assistant turn (an SFT example)."""
    msgs = [] if system is None else [{"role": "system", "content": system}]
    msgs.append(
        {"role": "user", "content": [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": question}]}
    )
    if answer is not None:
        msgs.append({"role": "assistant", "content": answer})
    return msgs


def conversations_of(conversations) -> list:
    """One conversation (a list of message dicts) or several -> a list of conversations.

    Raises:
        TypeError: a bare string (or not a list) instead of chat messages, or a conversation that
            is a string.
    """
    if isinstance(conversations, (str, bytes)) or not isinstance(conversations, (list, tuple)):
        raise TypeError(
            f"expected chat messages, a list of {{'role': ..., 'content': ...}} dicts (or a list "
            f"of such lists), got {type(conversations).__name__} {str(conversations)[:60]!r}; "
            f"e.g. [{{'role': 'user', 'content': 'Describe the image.'}}]"
        )
    if conversations and isinstance(conversations[0], dict):
        conversations = [conversations]
    several = len(conversations) > 1
    for ci, c in enumerate(conversations):
        if isinstance(c, (str, bytes)):
            where = f"conversation {ci}, " if several else ""
            raise TypeError(
                f"{where or 'conversation 0, '}got a string {c[:60]!r} instead of a list of "
                f"{{'role': ..., 'content': ...}} messages"
            )
    return list(conversations)


def encode_images(model, conversations: Sequence) -> tuple[list[list[int]], list[np.ndarray], list]:
    """Checks the conversations' messages and runs the image processor on their image parts.

    Returns:
        ``(counts, patches, grids)``: per conversation the image-token count of each of its images
        (prompt order); per image, in order over the batch, the processor's patches (float32
        [n_patches, patch_dim]) and grid ``(t, h, w)``.

    Raises:
        ValueError: malformed messages (naming the conversation and message), an image part without
            an image, an image that cannot be read or processed; image errors name the image's index
            in the prompt (and ``conversation i`` when there are several) and its file path.
        TypeError, FileNotFoundError: an image of a type the processor cannot read, a missing file.
    """
    several = len(conversations) > 1
    counts, patches, grids = [], [], []
    for ci, c in enumerate(conversations):
        where = f"conversation {ci}, " if several else ""
        try:
            check_messages(c)
        except ValueError as e:
            raise ValueError(f"{where}{e}") from None
        counts.append([])
        for j, src in enumerate(images_of(c)):
            if src is None:
                raise ValueError(f"{where}image {j}: an image part has no 'image' entry (give the PIL image, array or path)")
            try:
                x, grid = model.image_processor.preprocess_one(open_image(src, j), j)
            except (ValueError, TypeError, FileNotFoundError) as e:
                raise type(e)(f"{where}{e}") from None
            patches.append(x)
            grids.append(grid)
            counts[-1].append(model.image_processor.num_image_tokens(grid))
    return counts, patches, grids


# ----------------------------------------------------------------------------- (b) tensors
def tensor_batch(
    model, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, position_ids=None, **layout_spans
):
    """HF-processor tensors (numpy or torch) -> the family's ``Batch`` (its ``prepare_batch``).

    Args:
        input_ids: int [B,S] (1-D: B = 1). attention_mask: {0,1} [B,S], left or right padding.
        pixel_values, image_grid_thw, position_ids: as the family's processor and model name them.
        **layout_spans: ``system_spans``/``question_spans`` (per row, half-open spans), and
            ``image_sizes`` [n_images, 2] for LLaVA-NeXT.

    Returns:
        ``Batch``: ``input_ids``/``attention_mask`` int32 [B,S], ``position_ids`` int32 [3,B,S],
        ``pixel_values`` float32 or None, the vision index arrays and the ``layout``.

    Raises:
        ValueError: naming the tensor whose shape, dtype or content is inconsistent.
    """
    return model.family.prepare_batch(
        model.config, input_ids, attention_mask, pixel_values, image_grid_thw, position_ids, **layout_spans
    )


# ----------------------------------------------------------------------------- (a) chat
def chat_batch(
    model, conversations, add_generation_prompt: bool = True, pad_to_multiple_of: int | None = None, padding_side: str = "left"
):
    """Chat messages (one conversation or several; image parts carry the image) -> ``(Batch, info)``.

    Renders each conversation with the checkpoint's template, expands each image to its tokens,
    pads the rows on ``padding_side`` with the tokenizer's pad id (0 when it has none) up to the
    longest row rounded up to ``pad_to_multiple_of`` (bucketing), and carries each row's system and
    question spans, shifted by its padding, into the layout.

    Returns:
        ``(batch, info)``: the family's ``Batch`` (``input_ids``/``attention_mask`` int32 [B,S], …)
        and ``info = {"texts": B rendered prompts, "image_grid_thw": int64 [n_images, 3] or None}``.

    Raises:
        TypeError: ``conversations`` is a bare string (or not a list) instead of chat messages.
        ValueError: malformed messages, bad images (see :func:`encode_images`), ``padding_side``
            not left/right, and the family's ``prepare_batch`` errors.
        FileNotFoundError: an image path that does not exist.
    """
    conversations = conversations_of(conversations)
    counts, patches, grids = encode_images(model, conversations)
    enc = batch_prompts(
        conversations,
        model.tokenizer,
        counts,
        padding_side=padding_side,
        add_generation_prompt=add_generation_prompt,
        chat=model.family.chat_format,
        pad_to_multiple_of=pad_to_multiple_of,
    )
    pix = pixel_inputs(patches, grids) if patches else {}
    batch = tensor_batch(
        model,
        enc["input_ids"],
        enc["attention_mask"],
        pix.get("pixel_values"),
        pix.get("image_grid_thw"),
        system_spans=enc["system_spans"],
        question_spans=enc["question_spans"],
    )
    return batch, {"texts": enc["texts"], "image_grid_thw": pix.get("image_grid_thw")}


# ----------------------------------------------------------------------------- (c) SFT
def sft_example(model, messages, seq_len: int, name: str = "example") -> dict:
    """One supervised example: prompt turns then the answer as the last (assistant) turn ->
    left-padded (with id 0) rows of ``seq_len`` tokens, labelled on the answer.

    Labels are the answer's tokens and the template's turn end (``<|im_end|>``), not a trailing
    whitespace-only token the template writes after it; −100 (:data:`IGNORE_INDEX`) elsewhere.

    Returns:
        dict with ``input_ids``, ``attention_mask``, ``labels`` int64 [seq_len]; ``pixel_values``
        float32 [n_patches, patch_dim] and ``image_grid_thw`` int64 [n_images, 3] (None without
        images); ``system_spans`` and ``question_spans``: the prompt's spans (lists of half-open
        ``(start, end)``), shifted by the left padding.

    Raises:
        ValueError: the last message is not an assistant turn, the example is longer than
            ``seq_len`` (naming ``name``), and :func:`encode_images`'s / ``build_prompt``'s errors.
    """
    messages = list(messages)
    if not messages or not isinstance(messages[-1], dict) or messages[-1].get("role") != "assistant":
        raise ValueError(f"{name}: the last message must be the assistant's answer")
    tok, chat = model.tokenizer, model.family.chat_format
    (counts,), patches, grids = encode_images(model, [messages])
    enc = build_prompt(messages[:-1], tok, counts, chat=chat)
    prompt = enc["input_ids"]
    full = build_prompt(messages, tok, counts, add_generation_prompt=False, chat=chat)["input_ids"]
    if len(full) > seq_len:
        raise ValueError(f"{name}: {len(full)} tokens exceed seq_len={seq_len}")
    labels = np.full(len(full), IGNORE_INDEX, np.int64)
    answer_end = len(full) - 1 if tok.decode(full[-1:]).strip() == "" else len(full)  # template's trailing "\n"
    labels[len(prompt) : answer_end] = full[len(prompt) : answer_end]
    (ids,), (am,), offsets = pad_rows([full], "left", 0, length=seq_len)
    (lab,), _, _ = pad_rows([labels], "left", IGNORE_INDEX, length=seq_len)
    pix = pixel_inputs(patches, grids) if patches else {}
    (sys_spans,), (q_spans,) = (
        shift_spans([nonempty(enc["system_span"])], offsets),
        shift_spans([enc["question_spans"]], offsets),
    )
    return {
        "input_ids": ids,
        "attention_mask": am,
        "labels": lab,
        "pixel_values": pix.get("pixel_values"),
        "image_grid_thw": pix.get("image_grid_thw"),
        # the layout's system and question spans (AVAR's S and Q)
        "system_spans": sys_spans,
        "question_spans": q_spans,
    }


def sft_batch(model, examples: Sequence[dict]):
    """:func:`sft_example` outputs (all of one ``seq_len``) -> ``(Batch, labels int64 [B,S])``.

    Raises:
        ValueError: no examples, and the family's ``prepare_batch`` errors.
    """
    if not examples:
        raise ValueError("sft_batch: no examples")
    stack = lambda k: np.stack([e[k] for e in examples])
    pv = [e["pixel_values"] for e in examples if e.get("pixel_values") is not None]
    grid = [e["image_grid_thw"] for e in examples if e.get("image_grid_thw") is not None]
    batch = tensor_batch(
        model,
        stack("input_ids"),
        stack("attention_mask"),
        np.concatenate(pv) if pv else None,
        np.concatenate(grid) if grid else None,
        system_spans=[e["system_spans"] for e in examples],
        question_spans=[e["question_spans"] for e in examples],
    )
    return batch, stack("labels")


# ----------------------------------------------------------------------------- (d) completions
def completion_batch(model, prompt, image_grid_thw, tokens, lengths, region_weight=None):
    """Prompts plus sampled completions as one teacher-forced ``Batch`` (GRPO scoring).

    Args:
        prompt: the prompts' ``Batch`` (left-padded, as :func:`chat_batch` builds it), B rows of S.
        image_grid_thw: int [n_images, 3] of the prompts' images (``chat_batch``'s info), or None.
        tokens: int [B,T] completions; lengths: int [B], tokens of each row up to and including
            its stop token (later positions are masked out).
        region_weight: float [B,S] over the prompt (:func:`region_weights`), or None (zeros).

    Returns:
        ``(batch, mask)``: ``batch`` over S+T columns with the prompt's system/question masks, the
        completion as ``generated_mask``, ``region_weight`` padded with 0 (layout fields as jax
        arrays); ``mask`` bool [B,T] of the completion tokens.

    Raises:
        ValueError: the family's ``prepare_batch`` errors.
    """
    import jax.numpy as jnp

    b, s = prompt.input_ids.shape
    t = tokens.shape[1]
    mask = np.arange(t)[None, :] < np.asarray(lengths)[:, None]
    ids = np.concatenate([np.asarray(prompt.input_ids), np.asarray(tokens)], 1)
    am = np.concatenate([np.asarray(prompt.attention_mask), mask.astype(np.asarray(prompt.attention_mask).dtype)], 1)
    pv = None if prompt.pixel_values is None else np.asarray(prompt.pixel_values)
    batch = tensor_batch(model, ids, am, pv, None if image_grid_thw is None else np.asarray(image_grid_thw))
    pl = prompt.layout
    region = np.zeros((b, s), np.float32) if region_weight is None else region_weight
    pad = lambda x, fill: np.concatenate([np.asarray(x), np.full((b, t), fill, np.asarray(x).dtype)], 1)
    lay = dataclasses.replace(
        batch.layout,
        system_mask=jnp.asarray(pad(pl.system_mask, False)),
        question_mask=jnp.asarray(pad(pl.question_mask, False)),
        generated_mask=jnp.asarray(np.concatenate([np.zeros((b, s), bool), mask], 1)),
        region_weight=jnp.asarray(pad(region, 0.0)),
    )
    return dataclasses.replace(batch, layout=lay), mask


# ----------------------------------------------------------------------------- regions
def boxes_of(box) -> list[tuple]:
    """A sample's ``box``: one ``(x0, y0, x1, y1)``, several (SAYO's ``focus_area``), or None ->
    a list of boxes (empty for None)."""
    if box is None:
        return []
    if len(box) and isinstance(box[0], (int, float)):
        return [tuple(box)]
    return [tuple(b) for b in box]


def sample_boxes(samples: Sequence[dict]) -> tuple[dict[int, list], dict[int, tuple[int, int]]]:
    """Samples of one image each (``image`` a PIL image, optional ``box``: ``(x0, y0, x1, y1)`` or a
    list of such boxes, :func:`boxes_of`) -> ``(boxes_per_image, image_sizes)`` for
    :func:`region_weights`: image ``i`` is sample ``i``'s; samples without a box have no entry in
    ``boxes_per_image``; sizes are ``(height, width)``."""
    boxes = {i: boxes_of(s["box"]) for i, s in enumerate(samples) if s.get("box") is not None}
    sizes = {i: s["image"].size[::-1] for i, s in enumerate(samples)}
    return boxes, sizes


def region_weights(model, layout, image_grid_thw, boxes_per_image: dict, image_sizes: dict) -> np.ndarray:
    """float32 [B,S]: 1 on the image tokens inside any box of their image, else 0 (the family's
    ``region_weights``: :func:`jaxmm.processing.regions.region_weights`, LLaVA-NeXT's own).

    Args:
        layout: the batch's ``TokenLayout``. image_grid_thw: int [n_images, 3] (``chat_batch``'s info).
        boxes_per_image: ``{image index: [(x0, y0, x1, y1), ...]}`` in original-image pixels.
        image_sizes: ``{image index: (height, width)}``.

    Raises:
        ValueError: a reversed box, one outside its image, boxes for an image the batch lacks.
    """
    vc = model.config.vision
    return model.family.region_weights(
        np.asarray(layout.image_index),
        np.asarray(layout.grid_pos),
        np.asarray(layout.grid_hw),
        boxes_per_image,
        image_sizes,
        np.asarray(image_grid_thw),
        vc.patch_size,
        vc.spatial_merge_size,
    )


def with_region_weights(batch, weights):
    """``batch`` with its layout's ``region_weight`` replaced by ``weights`` [B,S]."""
    return dataclasses.replace(batch, layout=dataclasses.replace(batch.layout, region_weight=weights))


# ----------------------------------------------------------------------------- generation ids
def stop_tokens(model, chat: bool = True) -> tuple[int, ...]:
    """The ids that end a generated row (:func:`jaxmm.stopping.stop_token_ids`): the config's
    ``eos_token_id`` and, for chat prompts (``chat``), the tokenizer's."""
    return stop_token_ids(model.config, model.tokenizer if chat else None)


def pad_token_id(model) -> int:
    """The id generation writes after a row's stop token: the tokenizer's pad id, 0 when it has none."""
    return model.tokenizer.pad_token_id or 0
