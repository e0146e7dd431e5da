"""The attention seam: one function, :func:`attend`, serves every attention layer of every tower.

Shapes (einsum letters): B batch, T queries, K keys, H query heads, G kv heads, R = H/G heads per
kv group, D head dim.

``attend(q, k, v, *, site, mask, scale, interventions, probes) -> (out, probe_results)``

* ``q`` [B,T,H,D], ``k``/``v`` [B,K,G,D] (after RoPE). GQA: query head ``h`` reads kv head
  ``h // R`` (transformers' ``repeat_kv``).
* ``site`` (:class:`Site`) says where the call happens: tower, static layer index, the
  :class:`~jaxmm.processing.layout.TokenLayout` of the keys, the key index of each query and the
  pre-RoPE ``q̃, k̃``.
* ``mask`` bool, broadcastable to [B,H,T,K]; True = may attend.
* An **intervention** (:class:`Intervention`) may have the stages ``bias``, ``logits`` and
  ``weights``; a **probe** (:class:`Probe`) reduces a layer's attention weights to statistics.
  Both are pytrees whose layer choices are static metadata, so ``jax.jit`` specialises on them and
  their numeric leaves (per-sample strengths, learned parameters) are traced and differentiable.

Three paths, chosen statically per layer (:func:`choose_path`):

* ``"fused"`` — ``jax.nn.dot_product_attention`` itself (cuDNN on GPU where it applies, XLA
  elsewhere; ``implementation="xla"`` on CPU), for a layer touched by no probe and by no
  intervention stage other than ``bias``;
* ``"matmul"`` — the same plain attention as head-major matmuls (GQA folded into the query axis,
  no repeated k/v). On CPU XLA runs it faster than its generic ``dot_product_attention``, so it is
  the default plain path there (:data:`PLAIN_PATH` ``"auto"``); :func:`options` selects either;
* ``"explicit"`` — einsum -> ``logits`` stages -> softmax (float32) -> ``weights`` stages ->
  probes -> einsum, whose weights equal transformers' eager ``attn_weights``, for every other
  layer. It is chunked over queries (``query_chunk``) so a layer never holds more than
  ``B·H·query_chunk·K`` weights, and no ``[L,B,H,S,S]`` tensor exists unless a probe returns full
  maps.

:func:`record_paths` reports the path each layer actually ran.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array

FUSED = "fused"
MATMUL = "matmul"
EXPLICIT = "explicit"
QUERY_CHUNK = 512  # default query chunk of the explicit path (read at trace time)
PLAIN_PATH = "auto"  # path of plain layers: "auto" (matmul on CPU, fused elsewhere), "fused", "matmul"


@dataclasses.dataclass(frozen=True)
class Site:
    """Where an attention call happens. Built inside the traced forward; never crosses ``jit``.

    Attributes:
        tower: ``"vision"`` or ``"text"``.
        layer: static layer index within the tower.
        layout: TokenLayout of the keys (text tower: fields [B,K]), or None in the vision tower.
        query_pos: int32 [T], the key index of each query (prefill: ``arange(T)``; decode: the cache
            position). Inside a query chunk it holds that chunk's positions.
        q_pre, k_pre: pre-RoPE queries [B,T,H,D] and keys [B,K,G,D], for interventions that ask.
        mask: the bool mask [B,1|H,T,K] of this call (set by :func:`attend`).
        log_weights: log of the attention weights, ``z − logsumexp(z)`` [B,H,T,K], for probes (set by
            the explicit path; None when a ``weights`` stage changed the weights).
        hidden: the layer's normalised input hidden states of the queries [B,T,E] (text tower).
        call_pos, call_hidden: ``query_pos`` [T] and ``hidden`` [B,T,E] of the whole call, never
            split into query chunks: for interventions that need a property of every key this call
            writes (VAR's sink tokens at prefill). Set by :func:`attend`.
        residual, call_residual: the layer's input before its norm (the residual stream) [B,T,E],
            of the queries and of the whole call (text tower; VAR's released sink test).
        call_q_pre: ``q_pre`` [B,T,H,D] of the whole call, never split into query chunks (RATION's
            released τ, a statistic over every query of the prompt). Set by :func:`attend`.
        last_query: int32 [B], per row the key position of the last non-padding query of this call
            (by ``layout.attention_mask``; the last query when there is no layout), −1 for a row
            with none. Set by :func:`attend`; chunks share it.
        remat: static; the forward is differentiated with rematerialisation (``forward(remat=True)``):
            attention over more than ``query_chunk`` queries runs in query chunks whose scores the
            backward pass recomputes, so no [B,H,T,K] tensor is kept (plain layers included).
    """

    tower: str
    layer: int
    layout: Any = None
    query_pos: Array | None = None
    q_pre: Array | None = None
    k_pre: Array | None = None
    mask: Array | None = None
    log_weights: Array | None = None
    hidden: Array | None = None
    call_pos: Array | None = None
    call_hidden: Array | None = None
    residual: Array | None = None
    call_residual: Array | None = None
    last_query: Array | None = None
    call_q_pre: Array | None = None
    remat: bool = False


def _selects(obj, site: Site) -> bool:
    return site.tower in obj.towers and (obj.layers is None or site.layer in obj.layers)


class Intervention:
    """Base class of interventions.

    A subclass is a pytree (``jax.tree_util.register_dataclass`` dataclass) with static fields
    ``layers`` (tuple of layer indices, or None for every layer) and ``towers``, numeric leaves of its
    own, and overrides any of the stages below; a stage that is not overridden does not run.
    Stages see float32 tensors and must treat query rows independently (the explicit path may call
    them one query chunk at a time; ``site.query_pos`` says which rows).
    """

    layers: tuple[int, ...] | None = None
    towers: tuple[str, ...] = ("text",)

    def applies(self, site: Site) -> bool:
        """Whether this intervention acts at ``site``: its ``layers`` (None = all) and ``towers``
        (``"text"``, ``"vision"``) hold the site's layer and tower."""
        return _selects(self, site)

    def has_stage(self, name: str) -> bool:
        """Whether the subclass overrides stage ``name`` (``"bias"``, ``"logits"``, ``"weights"``):
        the seam runs only the stages an intervention defines, and a ``bias``-only one keeps the
        fused path."""
        return getattr(type(self), name) is not getattr(Intervention, name)

    def bias(self, site: Site) -> Array:
        """Additive pre-softmax bias, broadcastable to [B,H,T,K]. Keeps the fused path."""
        raise NotImplementedError

    def logits(self, z: Array, site: Site) -> Array:
        """Maps logits ``z`` [B,H,T,K] (scaled, biased, masked with the float32 minimum) to new logits."""
        raise NotImplementedError

    def weights(self, a: Array, site: Site) -> Array:
        """Maps attention weights ``a`` [B,H,T,K] (rows sum to 1) to new weights."""
        raise NotImplementedError

    def prefill_probes(self) -> tuple:
        """Probes a two-phase method needs at prefill (added by ``generate`` and ``plan``)."""
        return ()

    def after_prefill(self, probe_results, layout) -> "Intervention":
        """Two-phase methods re-plan from the prefill's probe results and the TokenLayout of the keys
        ([B,K]; the prompt's queries are its first S positions); default: unchanged."""
        return self

    def reprefill_probes(self) -> tuple:
        """Probes a planned method needs from the prompt's second run under its plan (``reprefill``;
        RATION's released τ); default none."""
        return ()

    def after_reprefill(self, probe_results, layout) -> "Intervention":
        """Re-plans once more from the second run's probe results (only when some intervention asked
        for :meth:`reprefill_probes`); default: unchanged."""
        return self


class Probe:
    """Base class of probes: reduce a layer's attention weights to statistics, row by row.

    A subclass is a pytree with static ``name``, ``layers``, ``towers`` and ``query_axis`` (the axis of
    its result that indexes queries, so query chunks can be joined) and implements
    ``__call__(weights [B,H,T,K] float32, site) -> array``. Results are returned by the forward as
    ``out.probes[name][tower] = {"layers": (...), "values": [L_probed, ...]}``.
    """

    name: str = "probe"
    layers: tuple[int, ...] | None = None
    towers: tuple[str, ...] = ("text",)
    query_axis: int = -1
    kind: str = "attention"

    def applies(self, site: Site) -> bool:
        """Whether this probe reads the attention weights at ``site`` (``kind`` "attention", its
        ``layers`` and ``towers`` holding the site's)."""
        return self.kind == "attention" and _selects(self, site)

    def __call__(self, weights: Array, site: Site) -> Array:
        raise NotImplementedError


def static_field(default):
    """A dataclass field that is static in the pytree (part of the jit cache key, not traced): for
    layer tuples, variants and other choices an intervention or probe branches on in Python."""
    return dataclasses.field(default=default, metadata=dict(static=True))


REGISTRY: dict[str, dict[str, type]] = {"interventions": {}, "probes": {}}
"""Every intervention and probe class jaxmm ships, by class name (filled by :func:`register`)."""


def register(cls):
    """Makes ``cls`` a frozen dataclass pytree (static fields marked by :func:`static_field`) and
    records it in :data:`REGISTRY` (``"interventions"`` or ``"probes"`` by base class), so that
    tests and tools that cover "every intervention and probe" see it."""
    cls = jax.tree_util.register_dataclass(dataclasses.dataclass(frozen=True)(cls))
    kind = "interventions" if issubclass(cls, Intervention) else "probes" if issubclass(cls, Probe) else None
    if kind is None:
        raise TypeError(f"register: {cls.__name__} is neither an Intervention nor a Probe")
    REGISTRY[kind][cls.__name__] = cls
    return cls


@register
class AttentionWeights(Probe):
    """The full attention weights [B,H,T,K] of the chosen layers (parity checks, heatmaps).

    Memory grows as L·B·H·T·K: ask only for the layers you need.
    """

    name: str = static_field("attentions")
    layers: tuple[int, ...] | None = static_field(None)
    towers: tuple[str, ...] = static_field(("text",))
    query_axis: int = static_field(-2)

    def __call__(self, weights, site):
        return weights


# ----------------------------------------------------------------------------- path bookkeeping
_TRACE: list | None = None


_SCANNED: tuple[int, ...] | None = None


@contextlib.contextmanager
def scanned_layers(layers):
    """Inside the block, :func:`attend` is being traced once for the text layers ``layers`` (the
    body of a ``lax.scan`` over layers, whose ``site.layer`` is traced): :func:`record_paths`
    records the path once per layer of ``layers``."""
    global _SCANNED
    prev, _SCANNED = _SCANNED, tuple(layers)
    try:
        yield
    finally:
        _SCANNED = prev


@contextlib.contextmanager
def record_paths():
    """Records ``(tower, layer, path)`` for every :func:`attend` traced inside the block.

    Tracing happens once per compiled shape; use ``jax.eval_shape`` (always traces) to inspect::

        with record_paths() as paths:
            jax.eval_shape(lambda: model.forward(...))
    """
    global _TRACE
    prev, _TRACE = _TRACE, []
    try:
        yield _TRACE
    finally:
        _TRACE = prev


def plain_path() -> str:
    """The path of a layer without probes or non-bias stages: :data:`PLAIN_PATH`, with ``"auto"``
    resolved by backend (``"matmul"`` on CPU, ``"fused"`` elsewhere)."""
    if PLAIN_PATH == "auto":
        return MATMUL if jax.default_backend() == "cpu" else FUSED
    if PLAIN_PATH not in (FUSED, MATMUL):
        raise ValueError(f"jaxmm.attention.PLAIN_PATH={PLAIN_PATH!r}; expected 'auto', 'fused' or 'matmul'")
    return PLAIN_PATH


@contextlib.contextmanager
def options(plain: str | None = None, query_chunk: int | None = None):
    """Selects the plain path (``"auto"``, ``"fused"``, ``"matmul"``) and/or the explicit path's
    query chunk inside the block. Both are read when a function is traced, so JAX's compilation
    caches are cleared on entry and exit (programs compiled under other options are not reused)::

        with jaxmm.attention.options(plain="fused", query_chunk=128):
            out = model.forward(batch=batch)
    """
    global PLAIN_PATH, QUERY_CHUNK
    if plain is not None and plain not in ("auto", FUSED, MATMUL):
        raise ValueError(f"options(plain={plain!r}): expected 'auto', 'fused' or 'matmul'")
    if query_chunk is not None and (not isinstance(query_chunk, int) or query_chunk < 1):
        raise ValueError(f"options(query_chunk={query_chunk!r}): expected a positive int")
    prev = PLAIN_PATH, QUERY_CHUNK
    new = (prev[0] if plain is None else plain, prev[1] if query_chunk is None else query_chunk)
    if new == prev:
        yield
        return
    PLAIN_PATH, QUERY_CHUNK = new
    jax.clear_caches()
    try:
        yield
    finally:
        PLAIN_PATH, QUERY_CHUNK = prev
        jax.clear_caches()


def choose_path(site: Site, interventions=(), probes=()) -> str:
    """The path :func:`attend` takes at ``site`` (static): ``"fused"``, ``"matmul"`` or ``"explicit"``."""
    if any(p.applies(site) for p in probes):
        return EXPLICIT
    for iv in interventions:
        if iv.applies(site) and (iv.has_stage("logits") or iv.has_stage("weights")):
            return EXPLICIT
    return plain_path()


def _last_query(site: Site) -> Array:
    """[B] key position of each row's last non-padding query of the call (−1: none)."""
    qp = site.query_pos
    lay = site.layout
    if lay is None or getattr(lay, "attention_mask", None) is None:
        return None
    am = lay.attention_mask
    valid = (jnp.take(am, jnp.clip(qp, 0, am.shape[-1] - 1), axis=1) > 0) & (qp >= 0)[None]  # [B,T]
    return jnp.max(jnp.where(valid, qp[None], -1), axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------- attend
def attend(
    q: Array,
    k: Array,
    v: Array,
    *,
    site: Site,
    mask: Array | None,
    scale: float,
    interventions=(),
    probes=(),
    query_chunk: int | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Attention with interventions and probes. See the module docstring for shapes.

    ``query_chunk`` (static): query rows per block of the explicit path; default
    :data:`QUERY_CHUNK`, read when the function is traced.

    Returns:
        ``out`` [B,T,H,D] in ``q.dtype`` and ``{probe.name: result}`` for the probes that apply here.
    """
    ivs = [iv for iv in interventions if iv.applies(site)]
    prs = [p for p in probes if p.applies(site)]
    if site.query_pos is None:
        site = dataclasses.replace(site, query_pos=jnp.arange(q.shape[1], dtype=jnp.int32))
    site = dataclasses.replace(
        site, mask=mask, call_pos=site.query_pos, call_hidden=site.hidden, call_residual=site.residual, call_q_pre=site.q_pre
    )
    last = _last_query(site)
    if last is None:
        last = jnp.full((q.shape[0],), site.query_pos[-1], jnp.int32)
    site = dataclasses.replace(site, last_query=last)
    bias = None
    for iv in ivs:
        if iv.has_stage("bias"):
            b = iv.bias(site).astype(jnp.float32)
            bias = b if bias is None else bias + b
    path = choose_path(site, ivs, prs)
    if _TRACE is not None:
        _TRACE.extend((site.tower, layer, path) for layer in (_SCANNED or (site.layer,)))
    if path == FUSED:
        impl = "xla" if jax.default_backend() == "cpu" else None
        out = jax.nn.dot_product_attention(
            q, k, v, bias=None if bias is None else bias.astype(q.dtype), mask=mask, scale=scale, implementation=impl
        )
        return out, {}
    t = q.shape[1]
    query_chunk = QUERY_CHUNK if query_chunk is None else query_chunk
    if path == MATMUL:
        if not (site.remat and t > query_chunk):
            return _explicit(q, k, v, mask, bias, scale, (), (), site)
        ivs, prs = (), ()  # a plain layer under remat: chunked, its scores recomputed in the backward
    if t <= query_chunk:
        return _explicit(q, k, v, mask, bias, scale, ivs, prs, site)
    return _explicit_chunked(q, k, v, mask, bias, scale, ivs, prs, site, query_chunk)


def _explicit(q, k, v, mask, bias, scale, ivs, prs, site):
    """Head-major matmuls (XLA on CPU is fastest with batch dims leading): GQA without repeating
    k/v, by folding the R query heads of a kv group into the query axis."""
    b, t, h, d = q.shape
    kk, g = k.shape[1], k.shape[2]
    r = h // g
    qh = q.reshape(b, t, g, r, d).transpose(0, 2, 3, 1, 4).reshape(b, g, r * t, d)
    z = jnp.matmul(qh, k.transpose(0, 2, 3, 1), preferred_element_type=jnp.float32)  # [B,G,R·T,K]
    z = z.reshape(b, h, t, kk) * scale
    if bias is not None:
        z = z + bias
    if mask is not None:
        z = jnp.where(mask, z, jnp.finfo(jnp.float32).min)
    for iv in ivs:
        if iv.has_stage("logits"):
            z = iv.logits(z, site)
    z_max = jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
    e = jnp.exp(z - z_max)
    total = jnp.sum(e, axis=-1, keepdims=True)
    a = e / total  # = jax.nn.softmax(z)
    log_a = z - (z_max + jnp.log(total))
    for iv in ivs:
        if iv.has_stage("weights"):
            a, log_a = iv.weights(a, site), None
    if prs:
        site = dataclasses.replace(site, log_weights=log_a)
    results = {p.name: p(a, site) for p in prs}
    ah = a.astype(v.dtype).reshape(b, g, r * t, kk)
    out = jnp.matmul(ah, v.transpose(0, 2, 1, 3))  # [B,G,R·T,D]
    return out.reshape(b, g, r, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d), results


def _take_rows(x, start, size, t, axis):
    """Rows ``start:start+size`` of ``x`` along ``axis`` if that axis has length ``t`` (else ``x``)."""
    if x is None or x.ndim < -axis or x.shape[axis] != t:
        return x
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis=x.ndim + axis)


def _explicit_chunked(q, k, v, mask, bias, scale, ivs, prs, site, chunk):
    """The explicit path over query chunks (``lax.map``): weights never exceed [B,H,chunk,K]; with
    ``site.remat`` each chunk is under ``jax.checkpoint``, so the backward keeps only its inputs."""
    t = q.shape[1]
    n = -(-t // chunk)
    pad = n * chunk - t
    pad_rows = lambda x, axis: (
        x
        if x is None or x.ndim < -axis or x.shape[axis] != t
        else jnp.pad(x, [(0, pad) if i == x.ndim + axis else (0, 0) for i in range(x.ndim)])
    )
    qp, maskp, biasp = pad_rows(q, -3), pad_rows(mask, -2), pad_rows(bias, -2)
    qpos = jnp.pad(site.query_pos, (0, pad), constant_values=-1)  # padding rows match no position
    q_pre = pad_rows(site.q_pre, -3)
    hidden = pad_rows(site.hidden, -2)
    residual = pad_rows(site.residual, -2)
    tp = n * chunk

    def one(i):
        s = i * chunk
        sub = dataclasses.replace(
            site,
            query_pos=jax.lax.dynamic_slice_in_dim(qpos, s, chunk),
            q_pre=_take_rows(q_pre, s, chunk, tp, -3),
            hidden=_take_rows(hidden, s, chunk, tp, -2),
            residual=_take_rows(residual, s, chunk, tp, -2),
            mask=_take_rows(maskp, s, chunk, tp, -2),
        )
        return _explicit(
            _take_rows(qp, s, chunk, tp, -3), k, v, sub.mask, _take_rows(biasp, s, chunk, tp, -2), scale, ivs, prs, sub
        )

    outs, results = jax.lax.map(jax.checkpoint(one) if site.remat else one, jnp.arange(n))
    out = jnp.moveaxis(outs, 0, 1).reshape((q.shape[0], tp) + q.shape[2:])[:, :t]
    joined = {}
    for p in prs:
        r = results[p.name]  # [n, ..., chunk, ...]
        if p.query_axis is None:  # row-selecting probes: chunks add up
            joined[p.name] = jnp.sum(r, axis=0)
            continue
        ax = p.query_axis % (r.ndim - 1)
        r = jnp.moveaxis(r, 0, ax)  # [..., n, chunk, ...]
        shape = r.shape[:ax] + (tp,) + r.shape[ax + 2 :]
        joined[p.name] = jax.lax.slice_in_dim(r.reshape(shape), 0, t, axis=ax)
    return out, joined


def run_and_plan(run, interventions, layout, probes=(), reprefill: bool = False):
    """The two-phase planning of interventions: the one implementation behind :func:`plan` (a plain
    forward) and :func:`jaxmm.generate.generate`'s prefill (every generation mode).

    1. ``first = run(interventions, probes + plan_probes)``, ``plan_probes`` being every
       intervention's ``prefill_probes()`` whose name ``probes`` does not already hold;
    2. each intervention re-planned: ``iv.after_prefill(first.probes, layout)``;
    3. with ``reprefill`` (and at least one plan probe), ``last = run(planned, again)``, ``again``
       being the planned interventions' ``reprefill_probes()`` (if any); when ``again`` is not empty,
       every planned intervention re-plans once more: ``iv.after_reprefill(last.probes, layout)``.

    Args:
        run: ``run(interventions: tuple, probes: tuple) -> ModelOutput`` (anything with ``.probes``:
            ``{name: {tower: LayerStack}}``); traced or eager alike.
        interventions: the interventions to plan (a sequence; those without two phases come back
            as ``after_prefill`` returns them, by default unchanged).
        layout: the :class:`~jaxmm.processing.layout.TokenLayout` of the run's keys ([B,K] fields).
        probes: the caller's probes, collected in the first run.
        reprefill: run again under the plan (a plan that also governs the prompt, e.g. RATION).

    Returns:
        ``(first, last, planned)``: the first run's output, the last run's output (``first`` when
        nothing ran again) and the tuple of planned interventions, in the order given.
    """
    names = {p.name for p in probes}
    plan_probes = tuple(p for iv in interventions for p in iv.prefill_probes() if p.name not in names)
    first = run(tuple(interventions), tuple(probes) + plan_probes)
    planned = tuple(iv.after_prefill(first.probes, layout) for iv in interventions)
    last = first
    if plan_probes and reprefill:
        again = tuple(p for iv in planned for p in iv.reprefill_probes())
        last = run(planned, again)
        if again:  # a plan that also depends on the prompt's run under it (RATION's released τ)
            planned = tuple(iv.after_reprefill(last.probes, layout) for iv in planned)
    return first, last, planned


def plan(params, config, batch, interventions, forward):
    """Runs the prefill of two-phase interventions (their ``prefill_probes``) and returns the
    re-planned interventions, for use in a plain forward: ``forward(..., plan(...))``.

    ``forward(params, config, batch, interventions, probes) -> ModelOutput`` (e.g. a family's
    ``forward_jit``); ``batch`` a prepared ``Batch`` whose ``layout`` the plans read. Returns a tuple
    of interventions, as :func:`run_and_plan` plans them; when no intervention asks for prefill
    probes nothing runs and they come back unchanged.
    """
    if not any(iv.prefill_probes() for iv in interventions):
        return tuple(interventions)
    return run_and_plan(lambda ivs, prs: forward(params, config, batch, ivs, prs), interventions, batch.layout)[2]
