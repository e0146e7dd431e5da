"""The model every family is: a vision tower, the shared decoder, the lm head; and its pure forward.

Mirrors ``...ForConditionalGeneration`` of transformers' Qwen-VL families (5.x). Module and
parameter names follow the transformers-5 layout (``visual.blocks.0.attn.qkv``,
``language_model.layers.0.self_attn.q_proj``, ``lm_head``) so each family's checkpoint key map is a
table. A family subclasses :class:`VLForConditionalGeneration`, sets ``VisionTower`` to its tower
class (see :mod:`jaxmm.models.core.vision` for the tower's contract) and binds itself to its config
class (``Config.model_class = ...``).

The pure function. ``forward(params, config, batch, ...)`` is a pure function of the parameter
pytree (an ``nnx.State``): it rebuilds the module with ``nnx.merge(graphdef(config), params)`` and
runs it, so ``jax.jit``, ``jax.grad`` and ``jax.vmap`` compose with it directly::

    model = jaxmm.load(path)                      # config, params
    batch = model.prepare(input_ids=..., attention_mask=..., pixel_values=..., image_grid_thw=...)
    out = jax.jit(forward, static_argnames="config")(model.params, model.config, batch)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Sequence

import flax.nnx as nnx
import jax
import jax.numpy as jnp

from jaxmm.attention import Site, scanned_layers
from jaxmm.models.core.decoder import KVCache, TextModel, mrope_cos_sin, splice, text_mask
from jaxmm.models.core.layers import Linear
from jaxmm.models.core.vision import collect


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Batch:
    """Device inputs of :func:`forward` (a pytree of arrays), built on the host by ``prepare_batch``.

    input_ids [B,S] int32; attention_mask [B,S] int32 (1 = token, 0 = padding);
    position_ids [3,B,S] int32 (M-RoPE, HF ``get_rope_index``); pixel_values [N, C·T·P·P] or None;
    vision: :class:`~jaxmm.models.core.vision.VisionInputs` or None; layout: :class:`TokenLayout`.
    """

    input_ids: Any
    attention_mask: Any
    position_ids: Any
    pixel_values: Any = None
    vision: Any = None
    layout: Any = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ModelOutput:
    """logits [B,S,V]; hidden_states: tuple of L+1 [B,S,E] (embeddings, then each layer's output,
    the last one after the final norm, as transformers returns them) or None; probes:
    ``{name: {tower: LayerStack(values [L_probed, ...], layers)}}``; cache: the updated
    :class:`KVCache` when one was passed."""

    logits: Any
    hidden_states: Any = None
    probes: Any = None
    cache: Any = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerStack:
    """One probe's results in one tower: ``values`` [L_probed, ...] stacked over ``layers`` (static)."""

    values: Any
    layers: tuple[int, ...] = dataclasses.field(default=(), metadata=dict(static=True))


def _stack(results: dict) -> dict:
    return {
        name: LayerStack(jnp.stack([per_layer[i] for i in sorted(per_layer)]), tuple(sorted(per_layer)))
        for name, per_layer in results.items()
    }


LAYER_LOOP = "unrolled"  # "unrolled" | "scan": see layer_loop()


@contextlib.contextmanager
def layer_loop(mode: str):
    """How the text decoder runs its layers inside the block: ``"unrolled"`` (the default: a
    Python loop, one compiled copy per layer) or ``"scan"`` (one ``lax.scan`` over the layers'
    stacked parameters: one compiled layer body, so compile time does not grow with depth).

    The scan stacks the layers' parameters inside the program, a second copy of the decoder's
    weights: once per ``generate`` call (hoisted out of its decode loop, but held while it
    decodes: + the decoder's parameter bytes of memory) and once per call of a forward or
    prefill (a copy of the weights every call: prefill 1.7× slower on CPU, decode faster on deep,
    narrow models; docs/performance.md). Only a forward with no intervention, no probe and no
    ``output_hidden_states`` is scanned (these select layers by their static index), and the layers
    after which DeepStack adds vision features stay unrolled. Values equal the unrolled loop's to
    float32 rounding (XLA compiles the scanned body on its own: ~1e-6 relative, not to the bit;
    tested). Read when a function is traced, so JAX's compilation caches are cleared on entry and
    exit::

        with jaxmm.models.core.model.layer_loop("scan"):
            out = generate(model.params, model.config, batch, max_new_tokens=64)

    Raises:
        ValueError: ``mode`` is neither.
    """
    global LAYER_LOOP
    if mode not in ("unrolled", "scan"):
        raise ValueError(f"layer_loop({mode!r}): expected 'unrolled' or 'scan'")
    prev, LAYER_LOOP = LAYER_LOOP, mode
    if prev != mode:
        jax.clear_caches()
    try:
        yield
    finally:
        LAYER_LOOP = prev
        if prev != mode:
            jax.clear_caches()


def scans_layers(interventions, probes, output_hidden_states) -> bool:
    """Whether the decoder layers run as one ``lax.scan`` (:func:`layer_loop`): under ``"scan"``,
    unless a probe, an intervention or ``output_hidden_states`` reads layers by index."""
    return LAYER_LOOP == "scan" and not interventions and not probes and not output_hidden_states


def _scan_layers(layers, start: int, x, cos, sin, mask, layout, query_pos, kv):
    """Layers ``start …`` as one ``lax.scan`` over their stacked parameters (every decoder layer has
    the same graph). The KV cache is carried whole and each layer writes its slice in place."""
    gdef = nnx.split(layers[start])[0]
    states = [nnx.split(layers[i])[1] for i in range(start, len(layers))]
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *states)

    def body(carry, xs):
        x, kv = carry
        i, state = xs
        site = Site("text", i, layout=layout, query_pos=query_pos)
        x, _, kv = nnx.merge(gdef, state)(x, cos, sin, mask, site, (), (), kv)
        return (x, kv), None

    with scanned_layers(range(start, len(layers))):
        (x, kv), _ = jax.lax.scan(body, (x, kv), (jnp.arange(start, len(layers), dtype=jnp.int32), stacked))
    return x, kv


def _remat_layer(layer, x, cos, sin, mask, site, interventions, probes, kv):
    """One decoder layer under ``jax.checkpoint``: the backward pass recomputes its activations
    from its input (only the layer boundaries stay in memory: SFT/GRPO at long sequences)."""
    gdef, state = nnx.split(layer)

    def run(state, x, kv):
        return nnx.merge(gdef, state)(x, cos, sin, mask, site, interventions, probes, kv)

    return jax.checkpoint(run)(state, x, kv)


class VLForConditionalGeneration(nnx.Module):
    """``visual`` tower (``VisionTower``, set by the family), ``language_model`` decoder and
    ``lm_head`` (None when tied)."""

    VisionTower: type = None

    def __init__(self, config, dtype=jnp.float32):
        self.config = config
        self.visual = self.VisionTower(config.vision, dtype)
        self.language_model = TextModel(config.text, dtype)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else Linear(config.text.hidden_size, config.text.vocab_size, bias=False, dtype=dtype, names=("embed", "vocab"))
        )

    def __call__(
        self,
        batch: Batch,
        interventions=(),
        probes=(),
        output_hidden_states=False,
        cache: KVCache | None = None,
        logits_index=None,
        remat: bool = False,
    ) -> ModelOutput:
        """Prefill (``cache`` None or empty) or decode step (``cache.index`` > 0).

        With a cache, ``batch.input_ids`` [B,T] are the new tokens at key positions
        ``cache.index + arange(T)``, while ``batch.attention_mask`` and ``batch.layout`` describe all
        ``K = cache.max_len`` key positions. ``logits_index`` (int or int32 scalar, may be traced):
        the lm head runs on that query row only and ``logits`` is [B,1,V] (transformers'
        ``logits_to_keep=1`` when it is the last row); None: every row. ``remat``: recompute each
        decoder layer in the backward pass (``jax.checkpoint``) instead of keeping its activations.
        """
        cfg = self.config
        lm = self.language_model
        x = lm.embed_tokens(batch.input_ids)  # [B,T,E]
        t = x.shape[1]
        image_mask = batch.input_ids == cfg.image_token_id
        probe_out = {}
        deepstack = ()
        if batch.pixel_values is not None:
            feats, deepstack, vres = self.visual(batch.pixel_values, batch.vision, interventions, probes)
            x = splice(x, feats.astype(x.dtype), image_mask)
            for name, v in _stack(vres).items():
                probe_out.setdefault(name, {})["vision"] = v
        start = jnp.int32(0) if cache is None else cache.index
        query_pos = start + jnp.arange(t, dtype=jnp.int32)
        cos, sin = mrope_cos_sin(batch.position_ids, cfg.text)
        mask = text_mask(batch.attention_mask, query_pos)
        hidden = [x] if output_hidden_states else None
        tres = {}
        kv = None if cache is None else (cache.k, cache.v, cache.k_pre)
        n = len(lm.layers)
        scanned = n - len(deepstack) if scans_layers(interventions, probes, output_hidden_states) else 0
        for i in range(n - scanned):
            site = Site("text", i, layout=batch.layout, query_pos=query_pos, remat=remat)
            if remat:
                x, res, kv = _remat_layer(lm.layers[i], x, cos, sin, mask, site, interventions, probes, kv)
            else:
                x, res, kv = lm.layers[i](x, cos, sin, mask, site, interventions, probes, kv)
            collect(tres, res, i)
            if output_hidden_states:
                hidden.append(x)
            if i < len(deepstack):  # DeepStack: add vision features after layer i
                x = x + splice(jnp.zeros_like(x), deepstack[i].astype(x.dtype), image_mask)
        if scanned:
            x, kv = _scan_layers(lm.layers, n - scanned, x, cos, sin, mask, batch.layout, query_pos, kv)
        x = lm.norm(x)
        if output_hidden_states:
            hidden[-1] = x
        if logits_index is not None:
            x = jax.lax.dynamic_slice_in_dim(x, jnp.asarray(logits_index, jnp.int32), 1, axis=1)
        logits = lm.embed_tokens.attend(x) if self.lm_head is None else self.lm_head(x)
        for name, v in _stack(tres).items():
            probe_out.setdefault(name, {})["text"] = v
        new_cache = None if cache is None else KVCache(kv[0], kv[1], start + t, kv[2])
        return ModelOutput(
            logits=logits, hidden_states=None if hidden is None else tuple(hidden), probes=probe_out, cache=new_cache
        )


# ----------------------------------------------------------------------------- pure functional API
def model_class(config) -> type:
    """The model class of ``config``'s own class (``ConfigClass.model_class``, bound in the family's
    modeling module next to the model class; an inherited binding does not count).

    Raises:
        TypeError: ``type(config)`` has no model class of its own.
    """
    cls = type(config).__dict__.get("model_class")
    if cls is None:
        raise TypeError(
            f"{type(config).__name__} has no model class: bind one in its family's modeling module "
            f"({type(config).__name__}.model_class = ...ForConditionalGeneration)"
        )
    return cls


@functools.lru_cache(maxsize=None)
def graphdef(config, dtype: str = "float32"):
    """The static graph of the model for ``config`` (no parameter memory)."""
    abstract = nnx.eval_shape(lambda: model_class(config)(config, jnp.dtype(dtype)))
    return nnx.split(abstract)[0]


def abstract_params(config, dtype: str = "float32") -> nnx.State:
    """Parameter pytree of ShapeDtypeStructs with logical-axis metadata (for loading and sharding)."""
    abstract = nnx.eval_shape(lambda: model_class(config)(config, jnp.dtype(dtype)))
    return nnx.split(abstract)[1]


def forward(
    params: nnx.State,
    config,
    batch: Batch,
    interventions: Sequence = (),
    probes: Sequence = (),
    output_hidden_states: bool = False,
    cache: KVCache | None = None,
    logits_index=None,
    remat: bool = False,
) -> ModelOutput:
    """Pure forward of any family: ``params`` pytree + ``batch`` -> :class:`ModelOutput`.

    ``config`` (hashable; its class names the model class) and ``output_hidden_states`` must be
    static under ``jax.jit``; ``interventions`` and ``probes`` are pytrees whose layer choices are
    static metadata. ``logits_index``: None (logits [B,S,V]) or one query row (logits [B,1,V]; may
    be traced). ``remat`` (static): rematerialise each decoder layer in the backward pass
    (``jax.checkpoint``; same values and gradients, activation memory of the layer boundaries only).
    """
    dtype = jax.tree_util.tree_leaves(params)[0].dtype
    model = nnx.merge(graphdef(config, jnp.dtype(dtype).name), params)
    return model(batch, tuple(interventions), tuple(probes), output_hidden_states, cache, logits_index, remat)


forward_jit = jax.jit(forward, static_argnames=("config", "output_hidden_states", "remat"))
