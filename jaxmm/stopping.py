"""The token ids that end a generated row — one rule for the whole library.

``generate``/``stream`` stop a row at the first of these ids. Chat checkpoints often name the turn's
end token only in the tokenizer (``<|im_end|>``) while ``config.json`` names another (or none), so
callers that decode chat prompts pass both: :func:`stop_token_ids` (eval harness, ``jaxmm generate``
and ``jaxmm inspect``, GRPO rollouts, ``Model.generate``).
"""

from __future__ import annotations


def _ids(value) -> list[int]:
    """None, an int or a sequence of ints -> a list of ints."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if v is not None]
    return [int(value)]


def stop_token_ids(config, tokenizer=None) -> tuple[int, ...]:
    """The config's ``eos_token_id`` (an int, a sequence or None), then the tokenizer's
    ``eos_token_id`` when it has one that is not already there.

    Args:
        config: a jaxmm model config (``eos_token_id``: tuple of ints) or anything with an
            ``eos_token_id`` attribute (an HF config or generation config).
        tokenizer: optional; a tokenizer whose ``eos_token_id`` is None (or absent) adds nothing.

    Returns:
        The ids in that order, deduplicated, as Python ints (possibly empty).
    """
    ids = _ids(getattr(config, "eos_token_id", None))
    if tokenizer is not None:
        ids += _ids(getattr(tokenizer, "eos_token_id", None))
    return tuple(dict.fromkeys(ids))
