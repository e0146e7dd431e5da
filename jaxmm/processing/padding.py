"""Padding, span shifting and length bucketing of token rows — the one implementation the host
pipeline (:mod:`jaxmm.processing.batch`) and :func:`jaxmm.processing.chat.batch_prompts` share.

Host side only (numpy). Spans are half-open ``(start, end)`` column ranges of one row; padding a row
on the left moves its tokens, so its spans move by the same offset.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

SIDES = ("left", "right")


def padded_length(lengths: Sequence[int], length: int | None = None, multiple_of: int | None = None) -> int:
    """The padded width S of rows of ``lengths`` tokens: ``length`` when given, else the longest row;
    then rounded up to a multiple of ``multiple_of`` (bucketing: batches of varying prompts reuse
    compiled shapes).

    Raises:
        ValueError: a row longer than ``length``, or ``multiple_of`` < 1.
    """
    longest = max(lengths) if len(lengths) else 0
    if length is not None and longest > length:
        raise ValueError(f"a row of {longest} tokens exceeds the padded length {length}")
    s = longest if length is None else int(length)
    if multiple_of:
        if int(multiple_of) < 1:
            raise ValueError(f"multiple_of={multiple_of}: expected a positive integer")
        s += -s % int(multiple_of)
    return s


def pad_rows(
    rows: Sequence,
    padding_side: str = "left",
    pad_value: int = 0,
    length: int | None = None,
    multiple_of: int | None = None,
    dtype=np.int64,
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """B 1-D rows of varying lengths -> one padded array.

    Args:
        rows: B 1-D sequences (token ids, labels, ...).
        padding_side: ``"left"`` (prompts to generate from) or ``"right"``.
        pad_value: the value at padded positions.
        length, multiple_of: the padded width, as :func:`padded_length`.
        dtype: of the padded values.

    Returns:
        ``(values, mask, offsets)``: ``values`` ``dtype`` [B,S]; ``mask`` int64 [B,S], 1 on a row's
        own entries and 0 on padding; ``offsets`` the B column offsets of each row's first entry
        (the left padding; 0 for right padding), to shift the row's spans by
        (:func:`shift_spans`).

    Raises:
        ValueError: ``padding_side`` not left/right, a row that is not 1-D, and
            :func:`padded_length`'s errors.
    """
    if padding_side not in SIDES:
        raise ValueError(f"padding_side={padding_side!r}; expected 'left' or 'right'")
    rows = [np.asarray(r) for r in rows]
    for i, r in enumerate(rows):
        if r.ndim != 1:
            raise ValueError(f"row {i}: expected a 1-D sequence, got shape {r.shape}")
    lengths = [len(r) for r in rows]
    s = padded_length(lengths, length, multiple_of)
    values = np.full((len(rows), s), pad_value, dtype)
    mask = np.zeros((len(rows), s), np.int64)
    offsets = []
    for i, (r, n) in enumerate(zip(rows, lengths)):
        off = s - n if padding_side == "left" else 0
        values[i, off : off + n] = r
        mask[i, off : off + n] = 1
        offsets.append(off)
    return values, mask, offsets


def shift_spans(spans: Sequence, offsets: Sequence[int]) -> list[list[tuple[int, int]]]:
    """Per row, its half-open ``(start, end)`` spans moved by the row's offset (Python ints).

    Raises:
        ValueError: a different number of span rows and offsets.
    """
    if len(spans) != len(offsets):
        raise ValueError(f"{len(spans)} rows of spans but {len(offsets)} offsets")
    return [[(int(a) + int(off), int(b) + int(off)) for a, b in row] for row, off in zip(spans, offsets)]


def nonempty(span) -> list[tuple[int, int]]:
    """``[span]`` when the half-open span holds a token, else ``[]`` (one row's span list)."""
    a, b = span
    return [(a, b)] if b > a else []
