"""Generation: prefill, then a jit-compiled decode loop over a static KV cache.

The whole of :func:`generate` is one ``jax.jit`` program: prefill over the (left-padded) prompt,
``after_prefill`` re-planning of interventions, then ``lax.scan`` over ``max_new_tokens`` decode
steps. Interventions apply at prefill and at every step; probes are collected at every step.
:func:`prefill_and_plan` and :func:`decode_step` are the same pieces, jitted one by one, for
:func:`stream`. PAI's contrast decodes a text-only stream in lockstep (:class:`Contrast`).

Positions follow transformers' Qwen2.5-VL generation exactly: generated token ``t`` (0-based) of a
row gets M-RoPE position ``max(prompt positions) + 1 + t`` on all three axes (HF: text position
``attention_mask.cumsum − 1`` plus ``rope_deltas``).

The cache length is bucketed (:func:`bucket`) so that prompts of similar length share one compiled
program. Rows that emitted a stop token keep decoding (static shapes) but their later tokens are
replaced by ``pad_token_id``, as transformers does.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxmm.models.qwen2_5_vl.modeling import Batch, KVCache, forward

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Sampling:
    """Decoding rule. ``temperature == 0`` is greedy; otherwise logits / temperature, then top-k
    (0 = off), then top-p (1.0 = off), then a categorical draw (transformers' warper order)."""

    temperature: float = dataclasses.field(default=0.0, metadata=dict(static=True))
    top_k: int = dataclasses.field(default=0, metadata=dict(static=True))
    top_p: float = dataclasses.field(default=1.0, metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GenerateOutput:
    """tokens [B,T_new] int32 (pad after a stop token); lengths [B] int32 (tokens up to and
    including the first stop token); logits [B,T_new,V] float32 of each step (if requested, else
    None); probes ``{name: {tower: LayerStack(values [B, T_new, L_probed, ...], layers)}}`` from the
    decode steps (the query axis of size 1 removed); prefill_probes as the forward returns them;
    text: the decoded completions when generating from chat messages (``Model.generate``)."""

    tokens: Any
    lengths: Any
    logits: Any = None
    probes: Any = None
    prefill_probes: Any = None
    text: tuple[str, ...] | None = dataclasses.field(default=None, metadata=dict(static=True))


def bucket(n: int, multiple: int = 64) -> int:
    """Rounds a cache length up to a multiple of ``multiple``."""
    return -(-n // multiple) * multiple


def select_token(logits: Array, sampling: Sampling, key: Array | None) -> Array:
    """logits [B,V] -> token ids [B] int32."""
    logits = logits.astype(jnp.float32)
    if sampling.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    neg = jnp.finfo(jnp.float32).min
    if sampling.top_k:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if sampling.top_p < 1.0:
        order = jnp.argsort(logits, axis=-1)                          # ascending, as HF
        sorted_logits = jnp.take_along_axis(logits, order, -1)
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, -1), -1)
        remove_sorted = cum <= 1.0 - sampling.top_p
        remove_sorted = remove_sorted.at[:, -1].set(False)             # keep at least one token
        remove = jnp.zeros_like(remove_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(remove_sorted)
        logits = jnp.where(remove, neg, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def extend_for_decoding(batch: Batch, max_len: int) -> Batch:
    """Host side: pads ``attention_mask`` and the layout from S prompt positions to ``max_len`` key
    positions (future positions count as valid, generated tokens; causality hides them)."""
    b, s = batch.input_ids.shape
    n_new = max_len - s
    if n_new < 0:
        raise ValueError(f"prompt of {s} tokens does not fit a cache of {max_len}")
    am = np.concatenate([np.asarray(batch.attention_mask), np.ones((b, n_new), np.int32)], 1)
    layout = batch.layout.extend(n_new) if batch.layout is not None else None
    return dataclasses.replace(batch, attention_mask=am, layout=layout)


def _squeeze_query(results: dict, probes) -> dict:
    """Per decode step: drop the query axis (length 1, at each probe's ``query_axis``) of the values."""
    axes = {p.name: p.query_axis for p in probes if p.kind == "attention"}
    return {name: {tower: r if axes.get(name) is None else
                   dataclasses.replace(r, values=jnp.squeeze(r.values, axes[name]))
                   for tower, r in towers.items()}
            for name, towers in results.items()}


def prefill(params, config, batch: Batch, max_len: int, interventions=(), probes=()):
    """Runs the prompt through the model into an empty cache of ``max_len`` positions.

    ``batch`` holds S prompt tokens and positions, its attention mask and layout already extended to
    ``max_len`` key positions (:func:`extend_for_decoding`). Returns
    ``(last_logits [B,V], cache, next_pos [B] int32, prefill ModelOutput)``.
    """
    b, s = batch.input_ids.shape
    dtype = jax.tree_util.tree_leaves(params)[0].dtype
    pre_rope = any(getattr(iv, "reads_pre_rope_keys", False) for iv in interventions)
    cache = KVCache.empty(config, b, max_len, dtype, pre_rope=pre_rope)
    out = forward(params, config, batch, interventions, probes, False, cache)
    valid = batch.attention_mask[None, :, :s] > 0            # prompt positions only
    next_pos = jnp.max(jnp.where(valid, batch.position_ids, -1), axis=(0, 2)) + 1
    return out.logits[:, -1], out.cache, next_pos.astype(jnp.int32), out


def decode_step(params, config, decode_batch: Batch, cache: KVCache, token: Array, pos: Array,
                interventions=(), probes=()):
    """One token per row: ``token`` [B] at M-RoPE position ``pos`` [B]. Returns the model output
    (logits [B,1,V], probes, updated cache)."""
    step = dataclasses.replace(decode_batch, input_ids=token[:, None],
                               position_ids=jnp.broadcast_to(pos[None, :, None], (3,) + token.shape + (1,)),
                               pixel_values=None, vision=None)
    return forward(params, config, step, interventions, probes, False, cache)


def prefill_and_plan(params, config, batch: Batch, full_batch: Batch, max_len: int, interventions=(), probes=(),
                     reprefill: bool = False):
    """Prefill with the probes the caller and the interventions ask for, then ``after_prefill``.

    Returns ``(last_logits, cache, next_pos, prefill_output, planned_interventions)``.
    """
    names = {p.name for p in probes}
    plan_probes = tuple(p for iv in interventions for p in iv.prefill_probes() if p.name not in names)
    last, cache, next_pos, pre = prefill(params, config, batch_with(batch, full_batch), max_len,
                                         interventions, tuple(probes) + plan_probes)
    interventions = tuple(iv.after_prefill(pre.probes, full_batch.layout) for iv in interventions)
    if plan_probes and reprefill:
        # Methods whose plan also governs the prompt (RATION: "every later query, prefill and
        # decode") run the prefill again under the plan, so the cache holds the edited keys' effect.
        last, cache, next_pos, _ = prefill(params, config, batch_with(batch, full_batch), max_len,
                                           interventions, ())
    return last, cache, next_pos, pre, interventions


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Contrast:
    """PAI's logit contrast against a text-only pass (:func:`jaxmm.interventions.pai_contrast`):
    ``batch`` is the same prompts without their images (:func:`text_only`), decoded in lockstep
    with its own cache; each step's token is chosen from
    γ(log p_mm − log p_text) + log p_text, with tokens below log(cutoff) + max log p_mm excluded."""

    batch: Any
    gamma: float = dataclasses.field(default=1.1, metadata=dict(static=True))
    cutoff: float = dataclasses.field(default=0.1, metadata=dict(static=True))


def text_only(batch: Batch, config) -> Batch:
    """Host side: the prompts of ``batch`` with their image spans (vision start, pads, end) removed,
    left-padded again, as a text-only batch."""
    from jaxmm.models.qwen2_5_vl.inputs import prepare_batch

    ids, am = np.asarray(batch.input_ids), np.asarray(batch.attention_mask)
    drop = np.isin(ids, [config.image_token_id, config.vision_start_token_id, config.vision_end_token_id])
    rows = [r[(m > 0) & ~d] for r, m, d in zip(ids, am, drop)]
    s = max(len(r) for r in rows)
    new_ids = np.zeros((len(rows), s), np.int64)
    new_am = np.zeros((len(rows), s), np.int64)
    for i, r in enumerate(rows):
        new_ids[i, s - len(r):], new_am[i, s - len(r):] = r, 1
    return prepare_batch(config, new_ids, new_am)


@partial(jax.jit, static_argnames=("config", "max_len", "max_new_tokens", "output_logits", "reprefill", "mesh"))
def _generate(params, config, batch: Batch, full_batch: Batch, max_len: int, max_new_tokens: int,
              sampling: Sampling, key, stop_tokens, pad_token_id, interventions, probes, output_logits,
              reprefill=False, contrast=None, mesh=None):
    last, cache, next_pos, pre, interventions = prefill_and_plan(
        params, config, batch, full_batch, max_len, interventions, probes, reprefill)
    constrain = lambda c: c
    if mesh is not None:   # the KV cache split as jaxmm.sharding.cache_shardings declares, every step
        from jaxmm.sharding import cache_shardings

        constrain = lambda c: jax.lax.with_sharding_constraint(c, cache_shardings(c, mesh))
        cache = constrain(cache)
    keys = jax.random.split(key, max_new_tokens)
    b = last.shape[0]
    text = None
    if contrast is not None:
        t_last, t_cache, t_pos, _ = prefill(params, config, contrast.batch, max_len, (), ())
        text = (t_last, t_cache, t_pos)

    def choose(logits, text_logits):
        if text_logits is None:
            return logits
        from jaxmm.interventions.pai import pai_contrast

        return pai_contrast(logits, text_logits, contrast.gamma, contrast.cutoff)

    def body(carry, xs):
        logits, cache, done, text = carry
        t, k = xs
        tok = select_token(choose(logits, None if text is None else text[0]), sampling, k)
        tok = jnp.where(done, pad_token_id, tok)
        done = done | jnp.isin(tok, stop_tokens)
        out = decode_step(params, config, full_batch, cache, tok, next_pos + t, interventions, probes)
        out = dataclasses.replace(out, cache=constrain(out.cache))
        if text is not None:
            t_out = decode_step(params, config, contrast.batch, text[1], tok, text[2] + t, (), ())
            text = (t_out.logits[:, 0], t_out.cache, text[2])
        ys = (tok, logits if output_logits else None, _squeeze_query(out.probes, probes))
        return (out.logits[:, 0], out.cache, done, text), ys

    init = (last, cache, jnp.zeros((b,), bool), text)
    _, (tokens, logits, step_probes) = jax.lax.scan(body, init, (jnp.arange(max_new_tokens), keys))
    # Step t's forward consumed generated token t: its probes describe token t as the query.
    # Stacked over steps the values are [T_new, L, B, ...]; return [B, T_new, L, ...].
    step_probes = jax.tree_util.tree_map(lambda v: jnp.moveaxis(v, 2, 0), step_probes)
    tokens = tokens.T
    return GenerateOutput(tokens=tokens, lengths=_lengths(tokens, stop_tokens),
                          logits=None if logits is None else jnp.moveaxis(logits, 0, 1),
                          probes=step_probes, prefill_probes=pre.probes)


def _lengths(tokens: Array, stop_tokens: Array) -> Array:
    """Tokens up to and including the first stop token (all if none)."""
    is_stop = jnp.isin(tokens, stop_tokens)
    first = jnp.argmax(is_stop, axis=1)
    return jnp.where(is_stop.any(1), first + 1, tokens.shape[1]).astype(jnp.int32)


def batch_with(prompt: Batch, full: Batch) -> Batch:
    """The prefill batch: prompt tokens and positions, key-side mask/layout over the whole cache."""
    return dataclasses.replace(prompt, attention_mask=full.attention_mask, layout=full.layout)


def generate(params, config, batch: Batch, *, max_new_tokens: int = 32, sampling: Sampling = Sampling(),
             key: Array | None = None, stop_tokens: Sequence[int] | None = None, pad_token_id: int = 0,
             interventions: Sequence = (), probes: Sequence = (), output_logits: bool = False,
             max_len: int | None = None, reprefill: bool = False, contrast: Contrast | None = None,
             mesh=None) -> GenerateOutput:
    """Generates ``max_new_tokens`` tokens for every row of a left-padded prompt ``batch``.

    Args:
        params, config: the model (``model.params``, ``model.config``).
        batch: a prepared prompt batch (``model.prepare``), padded on the LEFT.
        sampling: :class:`Sampling`; greedy by default.
        key: PRNG key, required when sampling (temperature > 0).
        stop_tokens: ids that end a row (default: the config's ``eos_token_id``).
        pad_token_id: written after a row stopped.
        interventions, probes: as in the forward; applied at prefill and every decode step.
        output_logits: also return each step's logits [B,T_new,V].
        max_len: cache length (default: prompt + max_new_tokens rounded up by :func:`bucket`).
        reprefill: for two-phase interventions, run the prompt again under the re-planned
            interventions before decoding (default: the plan applies to generated tokens only).
        contrast: PAI's contrast with a text-only pass (:class:`Contrast`; its batch from
            :func:`text_only`), applied to every step's next-token choice.
        mesh: a ``jax.sharding.Mesh``: the prompt batch is placed by
            :func:`jaxmm.sharding.batch_shardings` and the KV cache kept as
            :func:`jaxmm.sharding.cache_shardings` declares (parameters as they are placed).

    Raises:
        ValueError: right-padded prompts, or sampling without a key.
    """
    am = np.asarray(batch.attention_mask)
    if (am[:, -1] == 0).any():
        raise ValueError("generate() needs LEFT-padded prompts (attention_mask[:, -1] is 0 in some row)")
    if sampling.temperature > 0 and key is None:
        raise ValueError("sampling with temperature > 0 needs an explicit PRNG key (key=jax.random.PRNGKey(...))")
    s = batch.input_ids.shape[1]
    max_len = max_len or bucket(s + max_new_tokens)
    stop = tuple(config.eos_token_id) if stop_tokens is None else tuple(stop_tokens)
    full = extend_for_decoding(batch, max_len)
    key = jax.random.PRNGKey(0) if key is None else key
    if contrast is not None:
        contrast = dataclasses.replace(contrast, batch=extend_for_decoding(contrast.batch, max_len))
    if mesh is not None:
        from jaxmm.sharding import batch_shardings

        batch = jax.device_put(batch, batch_shardings(batch, mesh))
        full = jax.device_put(full, batch_shardings(full, mesh))
    return _generate(params, config, batch, full, max_len, max_new_tokens, sampling, key,
                     jnp.asarray(stop or (-1,), jnp.int32), jnp.int32(pad_token_id), tuple(interventions),
                     tuple(probes), output_logits, reprefill, contrast, mesh)


_prefill_jit = jax.jit(prefill_and_plan, static_argnames=("config", "max_len", "reprefill"))
_step_jit = jax.jit(decode_step, static_argnames=("config",))
_select_jit = jax.jit(select_token, static_argnames=("sampling",))


def stream(params, config, batch: Batch, *, max_new_tokens: int = 32, sampling: Sampling = Sampling(),
           key: Array | None = None, stop_tokens: Sequence[int] | None = None, pad_token_id: int = 0,
           interventions: Sequence = (), max_len: int | None = None, reprefill: bool = False):
    """Like :func:`generate`, one jitted step at a time: yields each step's tokens [B] (numpy) as
    they are chosen, stopping early once every row has stopped. Same tokens as :func:`generate` for
    the same key (the per-step keys are ``jax.random.split(key, max_new_tokens)``)."""
    if sampling.temperature > 0 and key is None:
        raise ValueError("sampling with temperature > 0 needs an explicit PRNG key")
    s = batch.input_ids.shape[1]
    max_len = max_len or bucket(s + max_new_tokens)
    stop = np.asarray(tuple(config.eos_token_id) if stop_tokens is None else tuple(stop_tokens), np.int64)
    full = extend_for_decoding(batch, max_len)
    last, cache, next_pos, _, ivs = _prefill_jit(params, config, batch, full, max_len, tuple(interventions), (),
                                                 reprefill)
    keys = jax.random.split(jax.random.PRNGKey(0) if key is None else key, max_new_tokens)
    done = np.zeros(batch.input_ids.shape[0], bool)
    for t in range(max_new_tokens):
        tok = np.asarray(_select_jit(last, sampling, keys[t]))
        tok = np.where(done, pad_token_id, tok)
        done |= np.isin(tok, stop)
        yield tok
        if done.all():
            return
        out = _step_jit(params, config, full, cache, jnp.asarray(tok, jnp.int32), next_pos + t, ivs, ())
        last, cache = out.logits[:, 0], out.cache
