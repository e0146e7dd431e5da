"""Generation: prefill, then a jit-compiled decode loop over a static KV cache.

One engine serves every entry point. Its pieces: :func:`start` (prefill into an empty cache, then
the ``after_prefill`` re-planning of interventions from the prefill's probe results, by
:func:`jaxmm.attention.run_and_plan`, the one planner that a plain forward's
:func:`jaxmm.attention.plan` also runs, and, with ``reprefill``, the prompt again under the plan),
then per step :func:`choose` (the token: PAI's contrast, suppressed ids, the decoding rule, pad
after a stop) and :func:`advance` (the forward that consumes it, interventions and probes at every
step). :func:`generate` runs them as one ``jax.jit`` program (:func:`run_generation`: a
``lax.while_loop`` of at most ``max_new_tokens`` steps that ends once every row has stopped);
:func:`jit_generate` jits that same program with explicit shardings; :func:`stream` jits each
piece and loops in Python, yielding each step's tokens. PAI's contrast decodes a text-only stream
in lockstep (:class:`Contrast`).

Positions follow transformers' Qwen2.5-VL generation exactly: generated token ``t`` (0-based) of a
row gets M-RoPE position ``max(prompt positions) + 1 + t`` on all three axes (HF: text position
``attention_mask.cumsum − 1`` plus ``rope_deltas``).

Prompts of similar size share one compiled program: the prompt's S tokens run as a bucketed
number of query rows (:data:`PROMPT_BUCKET`; the rows past S are padding that the first decode
steps overwrite in the cache, and that no real query ever sees), the packed vision patches are
padded to bucketed shapes (:func:`~jaxmm.models.core.vision_inputs.pad_vision`; not when a probe
or intervention reads the vision tower), and the cache length is bucketed (:func:`bucket`). None of
this changes a value: tokens, logits and probe values equal an unbucketed run at every real
position (tested); probe axes over prompt rows may be longer (the extra rows are padding).
Rows that emitted a stop token keep decoding (static shapes) but their later tokens are replaced
by ``pad_token_id``, as transformers does.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from functools import partial
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxmm.attention import run_and_plan
from jaxmm.models.core.decoder import KVCache
from jaxmm.models.core.model import Batch, forward
from jaxmm.models.core.vision import VisionInputs
from jaxmm.stopping import stop_token_ids

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Sampling:
    """Decoding rule. ``temperature == 0`` is greedy; otherwise logits / temperature, then top-k
    (0 = off), then top-p (1.0 = off), then a categorical draw (transformers' warper order)."""

    temperature: float = dataclasses.field(default=0.0, metadata=dict(static=True))
    top_k: int = dataclasses.field(default=0, metadata=dict(static=True))
    top_p: float = dataclasses.field(default=1.0, metadata=dict(static=True))

    def __post_init__(self):
        """Raises ValueError: a negative or non-finite temperature, a top_k that is not an integer
        ≥ 0, a top_p outside (0, 1] (transformers refuses the same values)."""
        t, k, p = self.temperature, self.top_k, self.top_p
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(t) or t < 0:
            raise ValueError(f"Sampling: temperature={t!r}; expected a finite number >= 0 (0 = greedy)")
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0:
            raise ValueError(f"Sampling: top_k={k!r}; expected an integer >= 0 (0 = off)")
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 < p <= 1:
            raise ValueError(f"Sampling: top_p={p!r}; expected a number in (0, 1] (1 = off)")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GenerateOutput:
    """tokens [B,T_new] int32 (pad after a stop token); lengths [B] int32 (tokens up to and
    including the first stop token); logits [B,T_new,V] float32 of each step (if requested, else
    None); probes ``{name: {tower: LayerStack(values [B, T_new, L_probed, ...], layers)}}`` from the
    decode steps (the query axis of size 1 removed); prefill_probes as the forward returns them;
    text: the decoded completions when generating from chat messages (``Model.generate``);
    steps: int32 scalar, the decode steps run (≤ T_new: decoding ends once every row has stopped;
    the steps not run hold pad tokens and zero logits and probe values)."""

    tokens: Any
    lengths: Any
    logits: Any = None
    probes: Any = None
    prefill_probes: Any = None
    text: tuple[str, ...] | None = dataclasses.field(default=None, metadata=dict(static=True))
    steps: Any = None


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
        order = jnp.argsort(logits, axis=-1)  # ascending, as HF
        sorted_logits = jnp.take_along_axis(logits, order, -1)
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, -1), -1)
        remove_sorted = cum <= 1.0 - sampling.top_p
        remove_sorted = remove_sorted.at[:, -1].set(False)  # keep at least one token
        remove = jnp.zeros_like(remove_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(remove_sorted)
        logits = jnp.where(remove, neg, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def suppress_tokens(logits: Array, ids: Array | None) -> Array:
    """logits [B,V] with the entries of token ``ids`` [n] set to −inf, so that no decoding rule
    picks them (transformers' ``SuppressTokensLogitsProcessor``); ``ids`` None: unchanged."""
    if ids is None:
        return logits
    return logits.at[:, ids].set(-jnp.inf)


def _suppress_ids(config, suppress) -> Array | None:
    """``suppress_tokens`` of :func:`generate` as int32 ids (None: none).

    Raises:
        ValueError: an id outside the vocabulary.
    """
    if suppress is None or len(suppress) == 0:
        return None
    ids = np.asarray(list(suppress), np.int64)
    v = config.text.vocab_size
    if ids.ndim != 1 or ((ids < 0) | (ids >= v)).any():
        raise ValueError(f"suppress_tokens={list(suppress)}: expected token ids in [0, {v}) (the vocabulary)")
    return jnp.asarray(ids, jnp.int32)


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


def decode_side(full: Batch) -> Batch:
    """The decode steps' batch: the key-side fields over the cache (``attention_mask``, layout) of
    ``full`` (:func:`extend_for_decoding`), without the prompt's tokens, positions and vision inputs
    (each step brings its own token and position), so that every prompt of one bucket decodes with
    one compiled program."""
    return dataclasses.replace(full, input_ids=None, position_ids=None, pixel_values=None, vision=None)


def _squeeze_query(results: dict, probes) -> dict:
    """Per decode step: drop the query axis (length 1, at each probe's ``query_axis``) of the values."""
    axes = {p.name: p.query_axis for p in probes if p.kind == "attention"}
    return {
        name: {
            tower: r if axes.get(name) is None else dataclasses.replace(r, values=jnp.squeeze(r.values, axes[name]))
            for tower, r in towers.items()
        }
        for name, towers in results.items()
    }


def _prefill_forward(params, config, batch: Batch, max_len: int, interventions=(), probes=(), prompt_len=None):
    """The prompt's forward into an empty cache: the ModelOutput (logits [B,1,V] of row S−1, cache at
    index S); see :func:`prefill`."""
    b, t = batch.input_ids.shape
    dtype = jax.tree_util.tree_leaves(params)[0].dtype
    pre_rope = any(getattr(iv, "reads_pre_rope_keys", False) for iv in interventions)
    cache = KVCache.empty(config, b, max_len, dtype, pre_rope=pre_rope)
    s = _prompt_len(batch, prompt_len)
    out = forward(params, config, batch, interventions, probes, False, cache, logits_index=s - 1)
    return dataclasses.replace(out, cache=dataclasses.replace(out.cache, index=s))


def _prompt_len(batch: Batch, prompt_len) -> Array:
    """int32 scalar S: ``prompt_len``, or all T rows of ``batch``."""
    return jnp.int32(batch.input_ids.shape[1]) if prompt_len is None else jnp.asarray(prompt_len, jnp.int32)


def _next_positions(batch: Batch, prompt_len) -> Array:
    """[B] int32: the M-RoPE position of generated token 0 of each row, max(prompt positions) + 1."""
    t = batch.input_ids.shape[1]
    rows = jnp.arange(t) < _prompt_len(batch, prompt_len)
    valid = (batch.attention_mask[None, :, :t] > 0) & rows[None, None]  # the prompt's real tokens
    return (jnp.max(jnp.where(valid, batch.position_ids, -1), axis=(0, 2)) + 1).astype(jnp.int32)


def prefill(params, config, batch: Batch, max_len: int, interventions=(), probes=(), prompt_len=None):
    """Runs the prompt through the model into an empty cache of ``max_len`` positions.

    ``batch`` holds the prompt's T query rows (tokens, positions) with its attention mask and layout
    already extended to ``max_len`` key positions (:func:`extend_for_decoding`, :func:`batch_with`
    or :func:`prefill_batch`). ``prompt_len`` (int32 scalar, may be traced; default T): the prompt's
    length S ≤ T; rows S … T−1 are bucket padding (attention_mask 0 there), whose cache slots the
    decode steps overwrite. Returns ``(last_logits [B,V] of row S−1, cache (index S), next_pos [B]
    int32, prefill ModelOutput)``; the lm head runs on row S−1 only (the ModelOutput's logits are
    [B,1,V], that row). No planning: :func:`start` plans two-phase interventions around it.
    """
    out = _prefill_forward(params, config, batch, max_len, interventions, probes, prompt_len)
    return out.logits[:, 0], out.cache, _next_positions(batch, prompt_len), out


def decode_step(params, config, decode_batch: Batch, cache: KVCache, token: Array, pos: Array, interventions=(), probes=()):
    """One token per row: ``token`` [B] at M-RoPE position ``pos`` [B]. Returns the model output
    (logits [B,1,V], probes, updated cache)."""
    step = dataclasses.replace(
        decode_batch,
        input_ids=token[:, None],
        position_ids=jnp.broadcast_to(pos[None, :, None], (3,) + token.shape + (1,)),
        pixel_values=None,
        vision=None,
    )
    return forward(params, config, step, interventions, probes, False, cache)


def replans_prompt(interventions) -> bool:
    """Whether any intervention's plan also governs the prompt (``replans_prompt``, e.g. RATION:
    "every later query, prefill and decode"): then ``generate`` runs the prompt again under it."""
    return any(getattr(iv, "replans_prompt", False) for iv in interventions)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Contrast:
    """PAI's logit contrast against a text-only pass (:func:`jaxmm.interventions.pai_contrast`):
    ``batch`` is the same prompts without their images (:func:`text_only`), decoded in lockstep
    with its own cache; each step's token is chosen from
    γ(log p_mm − log p_text) + log p_text, with tokens below log(cutoff) + max log p_mm excluded
    (``variant``: as in :func:`~jaxmm.interventions.pai_contrast`)."""

    batch: Any
    gamma: float = dataclasses.field(default=1.1, metadata=dict(static=True))
    cutoff: float = dataclasses.field(default=0.1, metadata=dict(static=True))
    variant: str = dataclasses.field(default="paper", metadata=dict(static=True))
    prompt_len: Any = None  # set by generate (its bucketed prefill batch holds more rows)
    full: Any = None  # its decode-side batch over the cache (set by generate)


def pai_contrast_for(batch: Batch, config, interventions=(), gamma: float | None = None) -> Contrast | None:
    """PAI's contrast for generating ``batch``: at ``gamma`` when given (``Model.generate(...,
    pai_contrast=γ)``, ``jaxmm generate --pai-contrast γ``), else at the γ a PAI among
    ``interventions`` asks for (``pai:gamma=γ``, :func:`jaxmm.interventions.decoding_contrast`,
    with its variant); None when neither asks.

    Raises:
        ValueError: two PAI interventions set gamma.
    """
    from jaxmm.interventions.pai import decoding_contrast

    asked = decoding_contrast(interventions)
    if gamma is None and asked is None:
        return None
    gamma, variant = (gamma, asked[1] if asked else "paper") if gamma is not None else asked
    return Contrast(text_only(batch, config), gamma=gamma, variant=variant)


def text_only(batch: Batch, config) -> Batch:
    """Host side: the prompts of ``batch`` with their image spans (vision start, pads, end) removed,
    left-padded again, as a text-only batch."""
    from jaxmm.models.core.inputs import prepare_batch

    ids, am = np.asarray(batch.input_ids), np.asarray(batch.attention_mask)
    drop = np.isin(ids, [config.image_token_id, config.vision_start_token_id, config.vision_end_token_id])
    rows = [r[(m > 0) & ~d] for r, m, d in zip(ids, am, drop)]
    s = max(len(r) for r in rows)
    new_ids = np.zeros((len(rows), s), np.int64)
    new_am = np.zeros((len(rows), s), np.int64)
    for i, r in enumerate(rows):
        new_ids[i, s - len(r) :], new_am[i, s - len(r) :] = r, 1
    return prepare_batch(config, new_ids, new_am)


# ----------------------------------------------------------------------------- the engine
# generate, stream and jit_generate run these three pieces: start (prefill and plan) once, then per
# step choose (the token) and advance (the forward that consumes it). generate and jit_generate run
# them inside one jitted program (run_generation's while loop), stream jits each and loops in Python.
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """What the decode loop carries from one step to the next.

    logits [B,V]: the last forward's logits of each row (they choose the next token; the model's,
    before suppression or contrast); cache: the :class:`KVCache` (index = keys written); next_pos
    [B] int32: the M-RoPE position of generated token 0 (step t's token sits at ``next_pos + t``);
    done [B] bool: rows that have emitted a stop token; text: PAI's text-only stream
    ``(logits [B,V], cache, next_pos [B])`` with a :class:`Contrast`, else None."""

    logits: Any
    cache: Any
    next_pos: Any
    done: Any
    text: Any = None


def _cache_constraint(mesh):
    """The cache kept split as :func:`jaxmm.sharding.cache_shardings` declares (identity without a mesh)."""
    if mesh is None:
        return lambda c: c
    from jaxmm.sharding import cache_shardings

    return lambda c: jax.lax.with_sharding_constraint(c, cache_shardings(c, mesh))


def start(
    params,
    config,
    batch: Batch,
    max_len: int,
    interventions=(),
    probes=(),
    reprefill: bool = False,
    prompt_len=None,
    contrast=None,
    mesh=None,
):
    """Prefill and plan, the first piece of every generation: the prompt runs into an empty cache
    of ``max_len`` positions (:func:`prefill`) with ``probes`` plus every intervention's
    ``prefill_probes()``, the interventions re-plan from its probe results
    (:func:`jaxmm.attention.run_and_plan`: ``after_prefill`` on ``batch.layout``, the keys' layout
    over the cache) and, with ``reprefill``, the prompt runs again under the plan, whose cache the
    decode steps then read. With a :class:`Contrast` (fields set as :func:`generate` sets them) its
    text-only prompt is prefilled too; with a ``mesh`` the cache is constrained to
    :func:`jaxmm.sharding.cache_shardings`.

    ``batch``: the prefill batch (T prompt rows, key-side fields over the cache: :func:`prefill_batch`
    or :func:`batch_with`); ``prompt_len``: int32 S ≤ T (default T).

    Returns ``(state, planned, pre)``: the :class:`DecodeState` before step 0 (``done`` all False),
    the planned interventions (tuple) every decode step runs under, and the first prefill's
    ModelOutput (``pre.probes``: the caller's and the plans' probes over the prompt rows).
    """
    run = lambda ivs, prs: _prefill_forward(params, config, batch, max_len, ivs, prs, prompt_len)
    pre, last, planned = run_and_plan(run, interventions, batch.layout, probes, reprefill)
    text = None
    if contrast is not None:
        t_last, t_cache, t_pos, _ = prefill(params, config, contrast.batch, max_len, (), (), contrast.prompt_len)
        text = (t_last, t_cache, t_pos)
    state = DecodeState(
        logits=last.logits[:, 0],
        cache=_cache_constraint(mesh)(last.cache),
        next_pos=_next_positions(batch, prompt_len),
        done=jnp.zeros((batch.input_ids.shape[0],), bool),
        text=text,
    )
    return state, planned, pre


def choose(state: DecodeState, key, sampling: Sampling, stop_tokens: Array, pad_token_id, contrast=None, suppress=None):
    """One step's tokens from ``state.logits``: PAI's contrast with ``state.text`` (with a
    :class:`Contrast`), ``suppress`` ids [n] int32 set to −inf (or None), then the decoding rule
    (:func:`select_token`, ``key`` the step's PRNG key); a row already done gets ``pad_token_id``.

    Returns ``(tokens [B] int32, state)`` with ``state.done`` updated (a row is done once it has
    emitted one of ``stop_tokens`` [n] int32)."""
    logits = state.logits
    if contrast is not None:
        from jaxmm.interventions.pai import pai_contrast

        logits = pai_contrast(logits, state.text[0], contrast.gamma, contrast.cutoff, contrast.variant)
    tok = select_token(suppress_tokens(logits, suppress), sampling, key)
    tok = jnp.where(state.done, pad_token_id, tok)
    return tok, dataclasses.replace(state, done=state.done | jnp.isin(tok, stop_tokens))


def advance(
    params,
    config,
    decode_batch: Batch,
    state: DecodeState,
    token: Array,
    t,
    interventions=(),
    probes=(),
    contrast=None,
    mesh=None,
):
    """Step ``t``'s forward (:func:`decode_step`): ``token`` [B] at position ``state.next_pos + t``
    (``t`` int32, may be traced) under the planned ``interventions``, with ``probes``; PAI's text
    stream takes the same token. ``decode_batch``: :func:`decode_side` of the batch over the cache.

    Returns ``(state, probes)``: the state for step t+1 (logits, cache; kept split over ``mesh``)
    and this step's probe results ``{name: {tower: LayerStack(values [L_probed, B, ...])}}`` with the
    query axis of size 1 removed: they describe token ``t`` as the query."""
    out = decode_step(params, config, decode_batch, state.cache, token, state.next_pos + t, interventions, probes)
    text = state.text
    if text is not None:
        t_out = decode_step(params, config, contrast.full, text[1], token, text[2] + t, (), ())
        text = (t_out.logits[:, 0], t_out.cache, text[2])
    state = dataclasses.replace(state, logits=out.logits[:, 0], cache=_cache_constraint(mesh)(out.cache), text=text)
    return state, _squeeze_query(out.probes, probes)


@partial(jax.jit, static_argnames=("config", "max_len", "max_new_tokens", "output_logits", "reprefill", "mesh"))
def run_generation(
    params,
    config,
    batch: Batch,
    full_batch: Batch,
    max_len: int,
    max_new_tokens: int,
    sampling: Sampling,
    key,
    stop_tokens,
    pad_token_id,
    interventions,
    probes,
    output_logits,
    reprefill=False,
    contrast=None,
    mesh=None,
    prompt_len=None,
    suppress=None,
):
    """The one jitted generation program behind :func:`generate` and :func:`jit_generate`:
    :func:`start`, then a ``lax.while_loop`` of :func:`choose` and :func:`advance` (the pieces
    :func:`stream` runs one by one) for at most ``max_new_tokens`` steps, ending once every row is
    done.

    ``batch``: the prefill batch (prompt rows, key-side fields over the cache); ``full_batch``:
    the decode-side batch (:func:`decode_side` of :func:`extend_for_decoding`); ``prompt_len``: the
    prompt's length S (traced; default: all rows of ``batch``); ``stop_tokens`` [n] int32;
    ``pad_token_id`` int32; ``key`` the PRNG key split into one per step; ``suppress``: int32 [n]
    token ids never chosen (:func:`suppress_tokens`), or None. Returns a :class:`GenerateOutput`."""
    state, interventions, pre = start(
        params, config, batch, max_len, interventions, probes, reprefill, prompt_len, contrast, mesh
    )
    keys = jax.random.split(key, max_new_tokens)

    def body(state, t):
        tok, chosen = choose(state, keys[t], sampling, stop_tokens, pad_token_id, contrast, suppress)
        nxt, step_probes = advance(params, config, full_batch, chosen, tok, t, interventions, probes, contrast, mesh)
        return nxt, (tok, state.logits if output_logits else None, step_probes)

    # A while loop, not a scan: decoding ends once every row has stopped. Step t's outputs go to row t
    # of buffers; the steps never run keep pad_token_id tokens and zero logits / probe values.
    ys_shape = jax.eval_shape(lambda c: body(c, jnp.int32(0))[1], state)
    bufs = jax.tree_util.tree_map(lambda y: jnp.zeros((max_new_tokens,) + y.shape, y.dtype), ys_shape)
    bufs = (jnp.full_like(bufs[0], pad_token_id),) + bufs[1:]

    def cond(loop_state):
        t, state, _ = loop_state
        return (t < max_new_tokens) & ~jnp.all(state.done)

    def loop(loop_state):
        t, state, bufs = loop_state
        state, ys = body(state, t)
        return t + 1, state, jax.tree_util.tree_map(lambda buf, y: buf.at[t].set(y), bufs, ys)

    steps, _, (tokens, logits, step_probes) = jax.lax.while_loop(cond, loop, (jnp.int32(0), state, bufs))
    # Step t's forward consumed generated token t: its probes describe token t as the query.
    # Stacked over steps the values are [T_new, L, B, ...]; return [B, T_new, L, ...].
    step_probes = jax.tree_util.tree_map(lambda v: jnp.moveaxis(v, 2, 0), step_probes)
    tokens = tokens.T
    return GenerateOutput(
        tokens=tokens,
        lengths=_lengths(tokens, stop_tokens),
        logits=None if logits is None else jnp.moveaxis(logits, 0, 1),
        probes=step_probes,
        prefill_probes=pre.probes,
        steps=steps,
    )


def _lengths(tokens: Array, stop_tokens: Array) -> Array:
    """Tokens up to and including the first stop token (all if none)."""
    is_stop = jnp.isin(tokens, stop_tokens)
    first = jnp.argmax(is_stop, axis=1)
    return jnp.where(is_stop.any(1), first + 1, tokens.shape[1]).astype(jnp.int32)


def batch_with(prompt: Batch, full: Batch) -> Batch:
    """The prefill batch: prompt tokens and positions, key-side mask/layout over the whole cache."""
    return dataclasses.replace(prompt, attention_mask=full.attention_mask, layout=full.layout)


PROMPT_BUCKET = 32  # the prompt's query rows are rounded up to a multiple of this


def _reads_vision(objs) -> bool:
    return any("vision" in getattr(o, "towers", ()) for o in objs)


def prefill_batch(prompt: Batch, full: Batch, rows: int, config=None) -> Batch:
    """Host side: the prefill batch of a left-padded prompt of S tokens run as ``rows`` ≥ S query
    rows (bucketing): tokens and positions padded on the right with zeros, the key-side mask and
    layout of ``full`` (over the cache) with ``attention_mask`` 0 at the padding rows S … rows−1 (no
    real query sees them: they are later keys, and the decode steps overwrite their cache slots).
    With ``config``, packed :class:`VisionInputs` are bucketed too (:func:`pad_vision`; a tower that
    reads other inputs, such as LLaVA-NeXT's packing index, keeps its shapes)."""
    b, s = prompt.input_ids.shape
    if rows < s:
        raise ValueError(f"prefill_batch: rows={rows} < prompt length {s}")
    grow = lambda x: np.concatenate([np.asarray(x), np.zeros(x.shape[:-1] + (rows - s,), np.asarray(x).dtype)], -1)
    am = np.array(full.attention_mask)
    am[:, s:rows] = 0
    lay = full.layout
    if lay is not None:
        lam = np.array(lay.attention_mask)
        lam[:, s:rows] = 0
        lay = dataclasses.replace(lay, attention_mask=lam)
    out = dataclasses.replace(
        prompt, input_ids=grow(prompt.input_ids), position_ids=grow(prompt.position_ids), attention_mask=am, layout=lay
    )
    if config is not None and prompt.pixel_values is not None and isinstance(prompt.vision, VisionInputs):
        from jaxmm.models.core.vision_inputs import pad_vision

        pv, vis = pad_vision(prompt.pixel_values, prompt.vision, config.vision)
        out = dataclasses.replace(out, pixel_values=pv, vision=vis)
    return out


def check_max_new_tokens(max_new_tokens) -> int:
    """``max_new_tokens`` as an int.

    Raises:
        ValueError: not a positive integer (bools, floats, strings, 0 and negatives are refused;
            transformers also refuses 0).
    """
    if isinstance(max_new_tokens, (bool, np.bool_)) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {type(max_new_tokens).__name__} {max_new_tokens!r}")
    return int(max_new_tokens)


def _warn_past_positions(config, batch: Batch, max_new_tokens: int) -> None:
    """Warns, as transformers' ``MaxLengthCriteria`` does (it warns and goes on), when the longest
    prompt row plus ``max_new_tokens`` exceeds ``config.text.max_position_embeddings`` (called by
    :func:`_prepare` from ``generate``/``stream``: the warning names their caller)."""
    limit = getattr(getattr(config, "text", None), "max_position_embeddings", None)
    if limit is None:
        return
    longest = int(np.asarray(batch.attention_mask).sum(1).max())
    if longest + max_new_tokens > limit:
        what = (
            f"the prompt ({longest} tokens) is longer than"
            if longest > limit
            else f"the prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds"
        )
        warnings.warn(
            f"{what} the model's max_position_embeddings ({limit}, from config.json); as in "
            f"transformers, generation goes on, but depending on the model you may observe "
            f"degraded output or nothing at all",
            stacklevel=4,
        )


def plan_shapes(batch: Batch, max_new_tokens: int, max_len: int | None = None) -> tuple[int, int, int]:
    """``(S, rows, max_len)`` of a generation from a prompt ``batch`` [B,S]: S, the prefill's query
    rows (S rounded up to :data:`PROMPT_BUCKET`, at most ``max_len``) and the cache length (default:
    ``bucket(max(rows, S + max_new_tokens))``).

    Raises:
        ValueError: a ``max_len`` shorter than S + ``max_new_tokens``.
    """
    s = batch.input_ids.shape[1]
    if max_len is None:
        rows = bucket(s, PROMPT_BUCKET)
        max_len = bucket(max(rows, s + max_new_tokens))
    else:
        if max_len < s + max_new_tokens:
            raise ValueError(f"max_len={max_len} is shorter than the prompt ({s}) + max_new_tokens ({max_new_tokens})")
        rows = min(bucket(s, PROMPT_BUCKET), max_len)
    return s, rows, max_len


def _stop_array(config, stop_tokens) -> Array:
    """int32 [n] stop ids (default: the config's, :func:`jaxmm.stopping.stop_token_ids`; −1 for none).

    Raises:
        ValueError: a stop token that is not a token id of the vocabulary (0 … vocab_size − 1).
    """
    stop = stop_token_ids(config) if stop_tokens is None else tuple(stop_tokens)
    vocab = config.text.vocab_size
    bad = [t for t in stop if isinstance(t, bool) or not isinstance(t, numbers.Integral) or not 0 <= t < vocab]
    if bad:
        raise ValueError(f"stop_tokens: {bad} not token ids of this model (integers 0 … {vocab - 1})")
    return jnp.asarray(stop or (-1,), jnp.int32)


def _prepare(
    who,
    config,
    batch: Batch,
    max_new_tokens,
    sampling: Sampling,
    key,
    stop_tokens,
    pad_token_id,
    interventions,
    probes,
    max_len,
    reprefill,
    contrast,
    mesh,
    suppress_tokens,
) -> dict:
    """Host side of :func:`generate` and :func:`stream` alike: checks, bucketed shapes, the prefill
    and decode-side batches (placed on ``mesh``), the contrast's batches; returns the keyword
    arguments of :func:`run_generation` (less params, config, output_logits). Raises and warns as
    :func:`generate` documents."""
    max_new_tokens = check_max_new_tokens(max_new_tokens)
    suppress = _suppress_ids(config, suppress_tokens)
    am = np.asarray(batch.attention_mask)
    if (am[:, -1] == 0).any():
        raise ValueError(f"{who}() needs LEFT-padded prompts (attention_mask[:, -1] is 0 in some row)")
    if sampling.temperature > 0 and key is None:
        raise ValueError("sampling with temperature > 0 needs an explicit PRNG key (key=jax.random.PRNGKey(...))")
    if reprefill is None:
        reprefill = replans_prompt(interventions)
    s, rows, max_len = plan_shapes(batch, max_new_tokens, max_len)
    _warn_past_positions(config, batch, max_new_tokens)
    full = extend_for_decoding(batch, max_len)
    vision_read = _reads_vision(interventions) or _reads_vision(probes)
    pre = prefill_batch(batch, full, rows, None if vision_read else config)
    if contrast is not None:
        c_s, c_rows, _ = plan_shapes(contrast.batch, max_new_tokens, max_len)
        c_full = extend_for_decoding(contrast.batch, max_len)
        contrast = dataclasses.replace(
            contrast, batch=prefill_batch(contrast.batch, c_full, c_rows), full=decode_side(c_full), prompt_len=np.int32(c_s)
        )
    full = decode_side(full)
    if mesh is not None:
        from jaxmm.sharding import batch_shardings

        pre = jax.device_put(pre, batch_shardings(pre, mesh))
        full = jax.device_put(full, batch_shardings(full, mesh))
    return dict(
        batch=pre,
        full_batch=full,
        max_len=max_len,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        key=jax.random.PRNGKey(0) if key is None else key,
        stop_tokens=_stop_array(config, stop_tokens),
        pad_token_id=jnp.int32(pad_token_id),
        interventions=tuple(interventions),
        probes=tuple(probes),
        reprefill=reprefill,
        contrast=contrast,
        mesh=mesh,
        prompt_len=jnp.int32(s),
        suppress=suppress,
    )


def generate(
    params,
    config,
    batch: Batch,
    *,
    max_new_tokens: int = 32,
    sampling: Sampling = Sampling(),
    key: Array | None = None,
    stop_tokens: Sequence[int] | None = None,
    pad_token_id: int = 0,
    interventions: Sequence = (),
    probes: Sequence = (),
    output_logits: bool = False,
    max_len: int | None = None,
    reprefill: bool | None = None,
    contrast: Contrast | None = None,
    mesh=None,
    suppress_tokens: Sequence[int] | None = None,
) -> GenerateOutput:
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
        max_len: cache length (default: the bucketed prompt rows + max_new_tokens, rounded up by
            :func:`bucket`); must hold prompt + max_new_tokens.
        reprefill: for two-phase interventions, run the prompt again under the re-planned
            interventions before decoding. Default: when an intervention's plan governs the prompt
            too (:func:`replans_prompt`: RATION), else the plan applies to generated tokens only.
        contrast: PAI's contrast with a text-only pass (:class:`Contrast`; its batch from
            :func:`text_only`), applied to every step's next-token choice.
        mesh: a ``jax.sharding.Mesh``: the prompt batch is placed by
            :func:`jaxmm.sharding.batch_shardings` and the KV cache kept as
            :func:`jaxmm.sharding.cache_shardings` declares (parameters as they are placed).
        suppress_tokens: token ids never generated (their logits set to −inf before the decoding
            rule, as transformers' ``suppress_tokens``); the returned ``logits`` are the model's.

    Returns a :class:`GenerateOutput` (tokens [B,T_new] int32, lengths [B] int32, …). The program is
    :func:`run_generation` (:func:`start`, then :func:`choose` and :func:`advance` per step), the
    same pieces :func:`stream` runs one at a time. Prompts whose length rounds to the same
    :data:`PROMPT_BUCKET` (and images whose patch counts round alike) reuse one compiled program;
    see the module docstring.

    Warns:
        UserWarning: the longest prompt + ``max_new_tokens`` exceeds the config's
            ``max_position_embeddings`` (transformers warns likewise and goes on).

    Raises:
        ValueError: ``max_new_tokens`` not a positive integer, right-padded prompts, sampling
            without a key, a ``max_len`` too short, a suppressed id outside the vocabulary.
    """
    kw = _prepare(
        "generate",
        config,
        batch,
        max_new_tokens,
        sampling,
        key,
        stop_tokens,
        pad_token_id,
        interventions,
        probes,
        max_len,
        reprefill,
        contrast,
        mesh,
        suppress_tokens,
    )
    return run_generation(params, config, output_logits=output_logits, **kw)


@dataclasses.dataclass(frozen=True)
class Step:
    """One decode step of :func:`stream`, as its ``on_step`` callback receives it: what
    :func:`generate` returns at index ``t`` of its step axis.

    index: t (0-based); tokens [B] int32 numpy (the tokens yielded; ``pad_token_id`` after a row
    stopped); logits [B,V]: the model's logits the tokens were chosen from (generate's
    ``logits[:, t]``); probes ``{name: {tower: LayerStack(values [B, L_probed, ...])}}`` of the forward
    that consumed token t (generate's ``probes[...].values[:, t]``; empty without probes);
    prefill_probes: at t = 0, the prefill's probe results as generate's ``prefill_probes``, else None.
    Arrays other than ``tokens`` are ``jax.Array``\\ s (on the mesh, when streaming over one)."""

    index: int
    tokens: Any
    logits: Any
    probes: Any = None
    prefill_probes: Any = None


_start_jit = jax.jit(start, static_argnames=("config", "max_len", "reprefill", "mesh"))
_choose_jit = jax.jit(choose)
_advance_jit = jax.jit(advance, static_argnames=("config", "mesh"))


def stream(
    params,
    config,
    batch: Batch,
    *,
    max_new_tokens: int = 32,
    sampling: Sampling = Sampling(),
    key: Array | None = None,
    stop_tokens: Sequence[int] | None = None,
    pad_token_id: int = 0,
    interventions: Sequence = (),
    max_len: int | None = None,
    reprefill: bool | None = None,
    suppress_tokens: Sequence[int] | None = None,
    probes: Sequence = (),
    contrast: Contrast | None = None,
    mesh=None,
    on_step=None,
):
    """:func:`generate`, one jitted step at a time: yields each step's tokens [B] int32 (numpy) as
    they are chosen, stopping early once every row has stopped.

    The same engine as :func:`generate`, its pieces jitted one by one: :func:`start` (prefill and
    plan, ``after_prefill`` interventions included), then per step :func:`choose` (yielded) and
    :func:`advance`; the per-step keys are ``jax.random.split(key, max_new_tokens)``. So, for the
    same arguments, the tokens are generate's (up to its last step run), with probes,
    interventions, ``contrast`` and ``mesh`` alike. Arguments as :func:`generate`, plus
    ``on_step``: a callable that receives each step's :class:`Step` (logits and probes) once that
    step's forward has run, i.e. after its tokens were yielded (its return value is ignored); a
    consumer that stops iterating early gets no record of the last step it took. Each step's
    tokens are read on the host, so a ``mesh`` must be this process's devices (over several
    processes use :func:`generate` or :func:`jit_generate`).

    Raises and warns as :func:`generate` (when the first token is requested).
    """
    kw = _prepare(
        "stream",
        config,
        batch,
        max_new_tokens,
        sampling,
        key,
        stop_tokens,
        pad_token_id,
        interventions,
        probes,
        max_len,
        reprefill,
        contrast,
        mesh,
        suppress_tokens,
    )
    state, ivs, pre = _start_jit(
        params,
        config,
        kw["batch"],
        kw["max_len"],
        kw["interventions"],
        kw["probes"],
        kw["reprefill"],
        kw["prompt_len"],
        kw["contrast"],
        kw["mesh"],
    )
    n = kw["max_new_tokens"]
    keys = jax.random.split(kw["key"], n)
    for t in range(n):
        tok, chosen = _choose_jit(
            state, keys[t], kw["sampling"], kw["stop_tokens"], kw["pad_token_id"], kw["contrast"], kw["suppress"]
        )
        host = np.asarray(tok)
        yield host
        last = t + 1 == n or bool(np.asarray(chosen.done).all())
        if last and on_step is None:
            return
        nxt, step_probes = _advance_jit(
            params, config, kw["full_batch"], chosen, tok, jnp.int32(t), ivs, kw["probes"], kw["contrast"], kw["mesh"]
        )
        if on_step is not None:
            on_step(
                Step(
                    index=t,
                    tokens=host,
                    logits=state.logits,
                    probes=jax.tree_util.tree_map(lambda v: jnp.moveaxis(v, 1, 0), step_probes),
                    prefill_probes=pre.probes if t == 0 else None,
                )
            )
        if last:
            return
        state = nxt


# ----------------------------------------------------------------------------- over a mesh
def jit_prefill(config, mesh: jax.sharding.Mesh, params, batch, max_len: int, interventions=()):
    """``jax.jit`` of :func:`prefill` with explicit shardings: the KV cache comes out as
    :func:`jaxmm.sharding.cache_shardings` declares. ``batch`` is the prompt batch extended to
    ``max_len`` key positions (``batch_with(prompt, extend_for_decoding(prompt, max_len))``). Returns
    ``f(params, batch) -> (last_logits [B,V], cache, next_pos [B])``."""
    from jax.sharding import NamedSharding

    from jaxmm.sharding import batch_shardings, batch_spec, cache_shardings, shardings_of

    dtype = jax.tree_util.tree_leaves(params)[0].dtype
    pre_rope = any(getattr(iv, "reads_pre_rope_keys", False) for iv in interventions)
    cache = jax.eval_shape(lambda: KVCache.empty(config, batch.input_ids.shape[0], max_len, dtype, pre_rope))
    bsh = NamedSharding(mesh, batch_spec((batch.input_ids.shape[0],), 0, mesh, 1))
    logits_sh = NamedSharding(mesh, batch_spec((batch.input_ids.shape[0], 1), 0, mesh, 2))
    return jax.jit(
        lambda p, b: prefill(p, config, b, max_len, interventions)[:3],
        in_shardings=(shardings_of(params), batch_shardings(batch, mesh)),
        out_shardings=(logits_sh, cache_shardings(cache, mesh), bsh),
    )


def jit_generate(
    config,
    mesh: jax.sharding.Mesh,
    params,
    batch,
    max_new_tokens: int,
    *,
    max_len: int | None = None,
    sampling=None,
    stop_tokens=None,
    pad_token_id: int = 0,
    interventions=(),
    probes=(),
    output_logits: bool = False,
    reprefill: bool | None = None,
    suppress_tokens: Sequence[int] | None = None,
):
    """``jax.jit`` of the whole of :func:`generate` (its one program, :func:`run_generation`: prefill
    and plan, then the decode loop) with explicit in/out shardings: parameters as placed, the prompt
    ``batch`` [B,S] and its decoding extension by :func:`jaxmm.sharding.batch_shardings`, the KV
    cache constrained to :func:`jaxmm.sharding.cache_shardings` at every step;
    out, split over the batch axes on B: tokens [B,T_new], lengths [B], logits [B,T_new,V] (if
    ``output_logits``), each decode probe's values [B,T_new,…]. ``prefill_probes`` is not returned
    (None). The prompt runs as its S rows (no :data:`PROMPT_BUCKET` padding: the program is built for
    one shape); other arguments as :func:`generate`. Returns ``f(params, batch, full, key) ->
    GenerateOutput`` with ``full = extend_for_decoding(batch, f.max_len)`` and ``f.max_len`` the
    cache length (default as :func:`plan_shapes`: ``bucket(S + max_new_tokens)``).

    Raises:
        ValueError: ``max_new_tokens`` not a positive integer, a ``max_len`` too short, a
            suppressed id outside the vocabulary.
    """
    from jax.sharding import NamedSharding, PartitionSpec

    from jaxmm.sharding import batch_shardings, batch_spec, shardings_of

    max_new_tokens = check_max_new_tokens(max_new_tokens)
    sampling = Sampling() if sampling is None else sampling
    b = batch.input_ids.shape[0]
    _, _, max_len = plan_shapes(batch, max_new_tokens, max_len)
    stop, pad = _stop_array(config, stop_tokens), jnp.int32(pad_token_id)
    suppress = _suppress_ids(config, suppress_tokens)
    interventions, probes = tuple(interventions), tuple(probes)
    reprefill = replans_prompt(interventions) if reprefill is None else reprefill
    full = extend_for_decoding(batch, max_len)

    def fn(p, prompt, full, key):
        out = run_generation(
            p,
            config,
            batch_with(prompt, full),
            decode_side(full),
            max_len,
            max_new_tokens,
            sampling,
            key,
            stop,
            pad,
            interventions,
            probes,
            output_logits,
            reprefill,
            None,
            mesh,
            None,
            suppress,
        )
        return dataclasses.replace(out, prefill_probes=None)

    rep = NamedSharding(mesh, PartitionSpec())
    key = jax.random.PRNGKey(0)
    abstract = jax.eval_shape(fn, params, batch, full, key)
    per_row = lambda x: NamedSharding(mesh, batch_spec(x.shape, 0, mesh, x.ndim)) if x.ndim and x.shape[0] == b else rep
    out_sh = jax.tree_util.tree_map(per_row, abstract)
    f = jax.jit(
        fn,
        in_shardings=(shardings_of(params), batch_shardings(batch, mesh), batch_shardings(full, mesh), rep),
        out_shardings=out_sh,
    )
    f.max_len = max_len
    return f
