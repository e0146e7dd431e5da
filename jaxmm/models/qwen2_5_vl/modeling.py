"""Qwen2.5-VL in Flax NNX: vision tower, patch merger, splice, text decoder, lm head.

Mirrors ``transformers/models/qwen2_5_vl/modeling_qwen2_5_vl.py`` (transformers 5.x); module and
parameter names follow the transformers-5 layout (``visual.blocks.0.attn.qkv``,
``language_model.layers.0.self_attn.q_proj``, ``lm_head``) so the checkpoint key map is a table.

Einsum letters: B batch, S sequence, T queries, K keys, N vision patches (all images concatenated),
M merged vision tokens (N / merge²), C vision width, E text width, H heads, G kv heads, D head dim,
F mlp width, V vocab, L layers.

The pure function. ``forward(params, config, batch, ...)`` is a pure function of the parameter
pytree (an ``nnx.State``): it rebuilds the module with ``nnx.merge(graphdef(config), params)`` and
runs it, so ``jax.jit``, ``jax.grad`` and ``jax.vmap`` compose with it directly::

    model = jaxmm.load(path)                      # Qwen2_5_VL wrapper: config, params
    batch = model.prepare(input_ids=..., attention_mask=..., pixel_values=..., image_grid_thw=...)
    out = jax.jit(forward, static_argnames="config")(model.params, model.config, batch)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np

from jaxmm.attention import Site, attend
from jaxmm.models.qwen2_5_vl.config import Qwen2_5_VLConfig, TextConfig, VisionConfig

Array = jax.Array


# ----------------------------------------------------------------------------- building blocks
def _param(shape, dtype, names):
    """A zero-initialised parameter with logical axis names (mapped onto a mesh by sharding.py)."""
    return nnx.Param(jnp.zeros(shape, dtype), out_sharding=names, eager_sharding=False)


class Linear(nnx.Module):
    """``y = x @ kernel + bias``; ``kernel`` [in, out] is torch's ``weight.T``."""

    def __init__(self, din: int, dout: int, *, bias: bool, dtype, names: tuple[str, str]):
        self.kernel = _param((din, dout), dtype, names)
        self.bias = _param((dout,), dtype, names[1:]) if bias else None

    def __call__(self, x: Array) -> Array:
        # one rounding, as torch's F.linear (addmm): accumulate and add the bias in float32
        y = jnp.matmul(x, self.kernel[...], preferred_element_type=jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...]
        return y.astype(jnp.result_type(x, self.kernel[...]))


class RMSNorm(nnx.Module):
    """Mirrors ``Qwen2_5_VLRMSNorm``: normalise in float32, cast back, then scale."""

    def __init__(self, dim: int, eps: float, *, dtype, name: str = "embed"):
        self.weight = _param((dim,), dtype, (name,))
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * h.astype(x.dtype)


class SwiGLU(nnx.Module):
    """``down(silu(gate(x)) * up(x))`` (``Qwen2_5_VLMLP`` / ``Qwen2MLP``)."""

    def __init__(self, dim: int, hidden: int, *, bias: bool, dtype):
        self.gate_proj = Linear(dim, hidden, bias=bias, dtype=dtype, names=("embed", "mlp"))
        self.up_proj = Linear(dim, hidden, bias=bias, dtype=dtype, names=("embed", "mlp"))
        self.down_proj = Linear(hidden, dim, bias=bias, dtype=dtype, names=("mlp", "embed"))

    def __call__(self, x: Array) -> Array:
        return self.down_proj(in_float32(jax.nn.silu)(self.gate_proj(x)) * self.up_proj(x))


def in_float32(fn):
    """``fn`` computed in float32 and rounded once to the input's dtype (torch's activations on
    bf16 tensors compute in float32 internally)."""
    return lambda x: fn(x.astype(jnp.float32)).astype(x.dtype)


def rotate_half(x: Array) -> Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """``x*cos + rotate_half(x)*sin`` with cos/sin broadcast over heads, computed in float32."""
    xf = x.astype(jnp.float32)
    return (xf * cos + rotate_half(xf) * sin).astype(x.dtype)


# ----------------------------------------------------------------------------- vision tower
class VisionAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, dtype):
        c = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.qkv = Linear(c, 3 * c, bias=True, dtype=dtype, names=("embed", "heads"))
        self.proj = Linear(c, c, bias=True, dtype=dtype, names=("heads", "embed"))

    def __call__(self, x: Array, cos: Array, sin: Array, seg: "Segments", site: Site, interventions, probes):
        """x [N,C] in window order; attention runs inside each segment (window or image frame),
        the segments packed as a padded batch [nS, L] (the attention "batch" seen by probes)."""
        n, c = x.shape
        qkv = self.qkv(x).reshape(n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]                       # [N,H,D]
        q_pre, k_pre = q[seg.index], k[seg.index]
        q = apply_rope(q, cos[:, None], sin[:, None])[seg.index]          # [nS,L,H,D]
        k = apply_rope(k, cos[:, None], sin[:, None])[seg.index]
        site = dataclasses.replace(site, q_pre=q_pre, k_pre=k_pre)
        out, res = attend(q, k, v[seg.index], site=site, mask=seg.valid[:, None, None, :],
                          scale=(c // self.num_heads) ** -0.5, interventions=interventions, probes=probes)
        out = out.reshape(-1, c)[seg.inverse]                             # back to [N,C]
        return self.proj(out), res


class VisionBlock(nnx.Module):
    def __init__(self, cfg: VisionConfig, dtype):
        self.norm1 = RMSNorm(cfg.hidden_size, 1e-6, dtype=dtype)
        self.norm2 = RMSNorm(cfg.hidden_size, 1e-6, dtype=dtype)
        self.attn = VisionAttention(cfg, dtype)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, bias=True, dtype=dtype)

    def __call__(self, x, cos, sin, seg, site, interventions, probes):
        h, res = self.attn(self.norm1(x), cos, sin, seg, site, interventions, probes)
        x = x + h
        return x + self.mlp(self.norm2(x)), res


class PatchMerger(nnx.Module):
    """RMSNorm, group each 2x2 block of patches, then Linear-GELU-Linear (``Qwen2_5_VLPatchMerger``).

    Parameter names ``mlp_0``/``mlp_2`` stand for torch's ``mlp.0``/``mlp.2``.
    """

    def __init__(self, cfg: VisionConfig, dtype):
        c4 = cfg.hidden_size * cfg.spatial_merge_size ** 2
        self.ln_q = RMSNorm(cfg.hidden_size, 1e-6, dtype=dtype)
        self.mlp_0 = Linear(c4, c4, bias=True, dtype=dtype, names=(None, "mlp"))
        self.mlp_2 = Linear(c4, cfg.out_hidden_size, bias=True, dtype=dtype, names=("mlp", "embed"))

    def __call__(self, x: Array) -> Array:
        x = self.ln_q(x)
        x = x.reshape(-1, self.mlp_0.kernel.shape[0])
        return self.mlp_2(in_float32(lambda h: jax.nn.gelu(h, approximate=False))(self.mlp_0(x)))


class VisionTransformer(nnx.Module):
    """Qwen2.5-VL ViT: Conv3d patch embedding (as a Linear over flattened patches), 2-D rotary,
    windowed attention with full attention at ``fullatt_block_indexes``, patch merger.

    Input patches arrive in the processor's order; they are permuted into window order before the
    blocks and the merged tokens are permuted back (HF's ``window_index`` and its argsort).
    """

    def __init__(self, cfg: VisionConfig, dtype):
        self.cfg = cfg
        patch_dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
        self.patch_embed = Linear(patch_dim, cfg.hidden_size, bias=False, dtype=dtype, names=(None, "embed"))
        self.blocks = nnx.List([VisionBlock(cfg, dtype) for _ in range(cfg.depth)])
        self.merger = PatchMerger(cfg, dtype)

    def __call__(self, pixel_values: Array, vis: "VisionInputs", interventions=(), probes=()):
        cfg = self.cfg
        unit = cfg.spatial_merge_size ** 2
        x = self.patch_embed(pixel_values.astype(self.patch_embed.kernel.dtype))     # [N,C]
        n = x.shape[0]
        x = x.reshape(n // unit, unit, -1)[vis.window_index].reshape(n, -1)
        cos, sin = vision_rotary(cfg, vis.rotary_pos)
        results = {}
        for i, blk in enumerate(self.blocks):
            seg = vis.frames if i in cfg.fullatt_block_indexes else vis.windows
            x, res = blk(x, cos, sin, seg, Site("vision", i), interventions, probes)
            _collect(results, res, i)
        merged = self.merger(x)                                                     # [M,E]
        return merged[vis.reverse_index], results


def vision_rotary(cfg: VisionConfig, rotary_pos: Array) -> tuple[Array, Array]:
    """2-D rotary angles: (row, col) positions [N,2] -> cos, sin [N,D] (frequencies over D/4,
    row and column concatenated, then duplicated over the head dim; HF ``VisionRotaryEmbedding``)."""
    d = cfg.head_dim // 2
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    ang = (rotary_pos.astype(jnp.float32)[..., None] * inv_freq).reshape(rotary_pos.shape[0], -1)
    ang = jnp.concatenate([ang, ang], axis=-1)
    return jnp.cos(ang), jnp.sin(ang)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Segments:
    """Contiguous segments of a length-N sequence packed into a padded batch.

    index [nS,L] int32: sequence position of each slot (padding slots point at 0).
    valid [nS,L] bool: real slots. inverse [N] int32: flat slot (in nS·L) of each position.
    """

    index: Any
    valid: Any
    inverse: Any

    @classmethod
    def from_lengths(cls, lengths) -> "Segments":
        lengths = np.asarray(lengths, np.int64)
        width = int(lengths.max())
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        slot = np.arange(width)
        valid = slot[None, :] < lengths[:, None]
        index = np.where(valid, starts[:, None] + slot[None, :], 0)
        inverse = np.concatenate([i * width + np.arange(n) for i, n in enumerate(lengths)])
        return cls(index.astype(np.int32), valid, inverse.astype(np.int32))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VisionInputs:
    """Index arrays the vision tower needs, computed on the host from ``image_grid_thw``.

    window_index [M] int32: merged-token order inside windows (HF ``get_vision_window_index``).
    reverse_index [M] int32: its argsort.
    rotary_pos [N,2] int32: (row, col) of each patch, already in window order.
    frames: :class:`Segments` of image frames (full-attention blocks; HF ``cu_seqlens``).
    windows: :class:`Segments` of attention windows (HF ``cu_window_seqlens``).
    """

    window_index: Any
    reverse_index: Any
    rotary_pos: Any
    frames: Any
    windows: Any
    interp_index: Any = None     # Qwen3-VL: [N,4] taps into the learned position table
    interp_weight: Any = None    # Qwen3-VL: [N,4] bilinear weights


def interpolation_taps(image_grid_thw, side: int, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear (align_corners=True, border) taps and weights resampling a side×side position table
    to each image's patch grid, patches in merge-block order: [N,4] int32, [N,4] float32. Mirrors
    transformers' ``vision_utils.get_vision_interpolation_indices_and_weights`` (Qwen3-VL)."""
    idx, wts = [], []
    for t, h, w in np.asarray(image_grid_thw).tolist():
        within = np.arange(h * w)
        in_col, in_row = within % merge, (within // merge) % merge
        block_col = (within // (merge * merge)) % (w // merge)
        block_row = within // (merge * merge * (w // merge))
        row, col = block_row * merge + in_row, block_col * merge + in_col

        def axis(index, size):
            src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
            floor = np.floor(src)
            taps = np.clip(floor.astype(np.int64)[:, None] + np.arange(2), 0, side - 1)
            weights = np.clip(1 - np.abs(src[:, None] - floor[:, None] - np.arange(2)), 0, None)
            return taps, weights.astype(np.float32)

        ht, hw_ = axis(row, h)
        wt, ww = axis(col, w)
        i = (ht[:, :, None] * side + wt[:, None, :]).reshape(-1, 4)
        wgt = (hw_[:, :, None] * ww[:, None, :]).reshape(-1, 4)
        idx.append(np.tile(i, (t, 1)))
        wts.append(np.tile(wgt, (t, 1)))
    return np.concatenate(idx).astype(np.int32), np.concatenate(wts).astype(np.float32)


def vision_inputs(image_grid_thw: np.ndarray, cfg: VisionConfig) -> VisionInputs:
    """Host-side (numpy) mirror of transformers' ``vision_utils.get_vision_position_ids``,
    ``get_vision_cu_seqlens`` and ``get_vision_window_index`` for Qwen2.5-VL."""
    m = cfg.spatial_merge_size
    unit = m * m
    win = cfg.window_size // m // cfg.patch_size
    pos, window_index, window_lens, frame_lens = [], [], [], []
    offset = 0
    for t, h, w in np.asarray(image_grid_thw).tolist():
        hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        blocks = (h // m, m, w // m, m)
        hp = hh.reshape(blocks).transpose(0, 2, 1, 3).reshape(-1)
        wp = ww.reshape(blocks).transpose(0, 2, 1, 3).reshape(-1)
        pos.append(np.tile(np.stack([hp, wp], -1), (t, 1)))
        frame_lens += [h * w] * t
        gh, gw = h // m, w // m
        if not cfg.windowed:                      # Qwen2-VL: no window reordering, attention per frame
            window_index.append(np.arange(t * gh * gw) + offset)
            window_lens += [h * w] * t
            offset += t * gh * gw
            continue
        idx = np.arange(t * gh * gw).reshape(t, gh, gw)
        ph, pw = win - gh % win, win - gw % win
        padded = np.pad(idx, ((0, 0), (0, ph), (0, pw)), constant_values=-100)
        nh, nw = (gh + ph) // win, (gw + pw) // win
        padded = padded.reshape(t, nh, win, nw, win).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, win * win)
        lens = (padded != -100).sum(-1).reshape(-1)
        flat = padded.reshape(-1)
        window_index.append(flat[flat != -100] + offset)
        window_lens += [int(x) * unit for x in lens if x > 0]
        offset += t * gh * gw
    window_index = np.concatenate(window_index).astype(np.int32)
    pos = np.concatenate(pos).astype(np.int32)
    n = pos.shape[0]
    pos = pos.reshape(n // unit, unit, 2)[window_index].reshape(n, 2)
    return VisionInputs(
        window_index=window_index,
        reverse_index=np.argsort(window_index).astype(np.int32),
        rotary_pos=pos,
        frames=Segments.from_lengths(frame_lens),
        windows=Segments.from_lengths(window_lens),
        **(dict(zip(("interp_index", "interp_weight"), interpolation_taps(
            image_grid_thw, int(round(cfg.num_position_embeddings ** 0.5)), m)))
           if cfg.num_position_embeddings else {}),
    )


def _pad_segments(seg: Segments, n: int, n_b: int, width: int, rows: int) -> Segments:
    """``seg`` (over n positions) grown to ``rows`` segments of ``width`` slots over n_b positions:
    positions n … n_b−1 fill the new segments (each gets at least one; more segments when they do
    not fit), so no segment is empty and the real ones are unchanged."""
    index, valid = np.asarray(seg.index), np.asarray(seg.valid)
    n_seg, old_width = index.shape
    extra = n_b - n
    n_new = max(rows - n_seg, -(-extra // width))
    if extra < n_new:
        raise ValueError(f"vision padding: {extra} padding patches cannot fill {n_new} segments")
    sizes = np.full(n_new, extra // n_new)
    sizes[: extra % n_new] += 1
    lengths = np.concatenate([valid.sum(-1), sizes])
    slot = np.arange(width)
    idx = np.zeros((len(lengths), width), np.int64)
    starts = np.concatenate([[n], n + np.cumsum(sizes)[:-1]])
    idx[:n_seg, :old_width] = index
    idx[n_seg:] = np.where(slot[None] < sizes[:, None], starts[:, None] + slot[None], 0)
    val = slot[None] < lengths[:, None]
    flat = np.zeros(n_b, np.int64)
    rows_, cols = np.nonzero(val)
    flat[idx[rows_, cols]] = rows_ * width + cols
    return Segments(idx.astype(np.int32), val, flat.astype(np.int32))


def pad_vision(pixel_values, vis: VisionInputs, cfg: VisionConfig, multiple: int = 256, width: int = 64,
               rows: int = 8) -> tuple[np.ndarray, VisionInputs]:
    """Host side: pads the packed vision inputs of a batch to bucketed shapes, so that images of
    similar size share one compiled program (``generate``'s bucketing).

    The N patches grow to a multiple of ``multiple`` with zero patches that form extra attention
    segments of their own (they never attend to or from a real patch) and extra merged tokens at the
    end of the tower's output, which :func:`splice` never reads; segment tables grow to a power of
    two segments (at least ``rows``; one more than there were, for the padding) and a multiple of
    ``width`` slots. The real patches' values are unchanged — except in
    vision-tower probes, whose segment axis then holds the padding segments too.

    Returns ``(pixel_values [N_b, C·T·P·P], VisionInputs)``.
    """
    pv = np.asarray(pixel_values)
    unit = cfg.spatial_merge_size ** 2
    n = pv.shape[0]
    bk = lambda x, m: -(-x // m) * m
    segs = {}
    need = 1
    for name in ("frames", "windows"):
        seg = getattr(vis, name)
        segs[name] = (max(rows, 1 << int(seg.index.shape[0]).bit_length()), bk(seg.index.shape[1], width))
        need = max(need, segs[name][0] - seg.index.shape[0])
    n_b = bk(n + need * unit, multiple)
    m, m_b = n // unit, n_b // unit
    window_index = np.concatenate([np.asarray(vis.window_index), np.arange(m, m_b)]).astype(np.int32)
    pad = lambda x, fill=0: None if x is None else np.concatenate(
        [np.asarray(x), np.full((n_b - n,) + np.shape(x)[1:], fill, np.asarray(x).dtype)])
    new = VisionInputs(
        window_index=window_index, reverse_index=np.argsort(window_index).astype(np.int32),
        rotary_pos=pad(vis.rotary_pos),
        frames=_pad_segments(vis.frames, n, n_b, segs["frames"][1], segs["frames"][0]),
        windows=_pad_segments(vis.windows, n, n_b, segs["windows"][1], segs["windows"][0]),
        interp_index=pad(vis.interp_index), interp_weight=pad(vis.interp_weight))
    return pad(pv).astype(pv.dtype), new


# ----------------------------------------------------------------------------- text decoder
def mrope_cos_sin(position_ids: Array, cfg: TextConfig) -> tuple[Array, Array]:
    """M-RoPE angles: frequency ``i`` reads the temporal/height/width position by ``mrope_section``.

    position_ids [3,B,S] -> cos, sin [B,S,D] float32 (``Qwen2_5_VLRotaryEmbedding``).
    """
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))   # [D/2]
    axis = mrope_axes(cfg)                                                             # [D/2]
    pos = position_ids.astype(jnp.float32)[axis, :, :]                                 # [D/2,B,S]
    ang = jnp.moveaxis(pos, 0, -1) * inv_freq                                           # [B,S,D/2]
    ang = jnp.concatenate([ang, ang], axis=-1)
    return jnp.cos(ang), jnp.sin(ang)


def mrope_axes(cfg: TextConfig) -> np.ndarray:
    """Which position axis (0 = t, 1 = h, 2 = w) each of the D/2 frequencies reads.

    Contiguous sections ``[t]*s0 + [h]*s1 + [w]*s2`` (Qwen2/2.5-VL), or interleaved (Qwen3-VL:
    frequency i reads h if i % 3 == 1 and i < 3·s1, w if i % 3 == 2 and i < 3·s2, else t).
    """
    n = cfg.head_dim // 2
    if not cfg.mrope_interleaved:
        return np.repeat(np.arange(3), cfg.mrope_section)
    i = np.arange(n)
    axis = np.zeros(n, np.int64)
    axis[(i % 3 == 1) & (i < 3 * cfg.mrope_section[1])] = 1
    axis[(i % 3 == 2) & (i < 3 * cfg.mrope_section[2])] = 2
    return axis


class TextAttention(nnx.Module):
    def __init__(self, cfg: TextConfig, dtype):
        e, d = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, d
        bias = cfg.attention_bias
        self.q_proj = Linear(e, self.num_heads * d, bias=bias, dtype=dtype, names=("embed", "heads"))
        self.k_proj = Linear(e, self.num_kv_heads * d, bias=bias, dtype=dtype, names=("embed", "kv_heads"))
        self.v_proj = Linear(e, self.num_kv_heads * d, bias=bias, dtype=dtype, names=("embed", "kv_heads"))
        self.o_proj = Linear(self.num_heads * d, e, bias=cfg.o_proj_bias, dtype=dtype, names=("heads", "embed"))
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps, dtype=dtype, name=None) if cfg.qk_norm else None
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps, dtype=dtype, name=None) if cfg.qk_norm else None

    def __call__(self, x, cos, sin, mask, site: Site, interventions, probes, cache=None):
        """x [B,T,E]; cache: None or every layer's (k [L,B,K,G,D], v [L,B,K,G,D], k_pre or None)
        already holding earlier positions; this layer's (``site.layer``) T new keys and values are
        written in place at ``site.query_pos`` (contiguous) before attending over all K keys.
        Returns (output [B,T,E], probe results, the updated cache triple)."""
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q_pre, k_pre = q, k
        q = apply_rope(q, cos[:, :, None], sin[:, :, None])
        k = apply_rope(k, cos[:, :, None], sin[:, :, None])
        if cache is not None:      # one buffer per k/v for all layers, updated in place (no re-stacking)
            k_all, v_all, kp_all = cache
            at = (jnp.int32(site.layer), jnp.int32(0), site.query_pos[0].astype(jnp.int32), jnp.int32(0), jnp.int32(0))
            k_all = jax.lax.dynamic_update_slice(k_all, k.astype(k_all.dtype)[None], at)
            v_all = jax.lax.dynamic_update_slice(v_all, v.astype(v_all.dtype)[None], at)
            k, v = k_all[site.layer], v_all[site.layer]
            if kp_all is not None:     # pre-RoPE key cache (KVCache.empty(pre_rope=True)): all K keys
                kp_all = jax.lax.dynamic_update_slice(kp_all, k_pre.astype(kp_all.dtype)[None], at)
                k_pre = kp_all[site.layer]
            # without it, interventions that read k_pre see the current queries' keys only.
            cache = (k_all, v_all, kp_all)
        site = dataclasses.replace(site, q_pre=q_pre, k_pre=k_pre, hidden=x)
        out, res = attend(q, k, v, site=site, mask=mask, scale=self.head_dim ** -0.5,
                          interventions=interventions, probes=probes)
        return self.o_proj(out.reshape(b, t, -1)), res, cache


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, dtype):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.self_attn = TextAttention(cfg, dtype)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, bias=False, dtype=dtype)

    def __call__(self, x, cos, sin, mask, site, interventions, probes, cache=None):
        h, res, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, dataclasses.replace(site, residual=x),
                                    interventions, probes, cache)
        y = x + h
        y = y + self.mlp(self.post_attention_layernorm(y))
        for p in probes:
            if p.kind == "residual" and p.selects(site):
                res[p.name] = p.residual(x, y, site)
        return y, res, kv


class TextModel(nnx.Module):
    def __init__(self, cfg: TextConfig, dtype):
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype)
        self.layers = nnx.List([DecoderLayer(cfg, dtype) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)


class Embedding(nnx.Module):
    def __init__(self, vocab: int, dim: int, dtype):
        self.weight = _param((vocab, dim), dtype, ("vocab", "embed"))

    def __call__(self, ids: Array) -> Array:
        return jnp.take(self.weight[...], ids, axis=0)

    def attend(self, x: Array) -> Array:
        """Tied lm head: ``x @ weight.T``."""
        return x @ self.weight[...].T


# ----------------------------------------------------------------------------- the model
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Batch:
    """Device inputs of :func:`forward` (a pytree of arrays), built on the host by ``prepare``.

    input_ids [B,S] int32; attention_mask [B,S] int32 (1 = token, 0 = padding);
    position_ids [3,B,S] int32 (M-RoPE, HF ``get_rope_index``); pixel_values [N, C·T·P·P] or None;
    vision: :class:`VisionInputs` or None; layout: :class:`TokenLayout`.
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


def _collect(results: dict, res: dict, layer: int):
    for name, value in res.items():
        results.setdefault(name, {})[layer] = value


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerStack:
    """One probe's results in one tower: ``values`` [L_probed, ...] stacked over ``layers`` (static)."""

    values: Any
    layers: tuple[int, ...] = dataclasses.field(default=(), metadata=dict(static=True))


def _stack(results: dict) -> dict:
    return {name: LayerStack(jnp.stack([per_layer[i] for i in sorted(per_layer)]), tuple(sorted(per_layer)))
            for name, per_layer in results.items()}


class Qwen2_5_VLForConditionalGeneration(nnx.Module):
    """Qwen2.5-VL: ``visual`` tower, ``language_model`` decoder and ``lm_head`` (None when tied)."""

    def __init__(self, config: Qwen2_5_VLConfig, dtype=jnp.float32):
        self.config = config
        self.visual = VisionTransformer(config.vision, dtype)
        self.language_model = TextModel(config.text, dtype)
        self.lm_head = (None if config.tie_word_embeddings else
                        Linear(config.text.hidden_size, config.text.vocab_size, bias=False, dtype=dtype,
                               names=("embed", "vocab")))

    def __call__(self, batch: Batch, interventions=(), probes=(), output_hidden_states=False,
                 cache: "KVCache | None" = None) -> ModelOutput:
        """Prefill (``cache`` None or empty) or decode step (``cache.index`` > 0).

        With a cache, ``batch.input_ids`` [B,T] are the new tokens at key positions
        ``cache.index + arange(T)``, while ``batch.attention_mask`` and ``batch.layout`` describe all
        ``K = cache.max_len`` key positions.
        """
        cfg = self.config
        lm = self.language_model
        x = lm.embed_tokens(batch.input_ids)                                        # [B,T,E]
        t = x.shape[1]
        probe_out = {}
        deepstack = ()
        if batch.pixel_values is not None:
            feats, vres = self.visual(batch.pixel_values, batch.vision, interventions, probes)
            if isinstance(feats, tuple):               # Qwen3-VL: (merged, deepstack features per layer)
                feats, deepstack = feats
            x = splice(x, feats.astype(x.dtype), batch.input_ids == cfg.image_token_id)
            for name, v in _stack(vres).items():
                probe_out.setdefault(name, {})["vision"] = v
        start = jnp.int32(0) if cache is None else cache.index
        query_pos = start + jnp.arange(t, dtype=jnp.int32)
        cos, sin = mrope_cos_sin(batch.position_ids, cfg.text)
        mask = text_mask(batch.attention_mask, query_pos)
        hidden = [x] if output_hidden_states else None
        tres = {}
        kv = None if cache is None else (cache.k, cache.v, cache.k_pre)
        for i, layer in enumerate(lm.layers):
            site = Site("text", i, layout=batch.layout, query_pos=query_pos)
            x, res, kv = layer(x, cos, sin, mask, site, interventions, probes, kv)
            _collect(tres, res, i)
            if output_hidden_states:
                hidden.append(x)
            if i < len(deepstack):                     # DeepStack: add vision features after layer i
                x = x + splice(jnp.zeros_like(x), deepstack[i].astype(x.dtype), batch.input_ids == cfg.image_token_id)
        x = lm.norm(x)
        if output_hidden_states:
            hidden[-1] = x
        logits = lm.embed_tokens.attend(x) if self.lm_head is None else self.lm_head(x)
        for name, v in _stack(tres).items():
            probe_out.setdefault(name, {})["text"] = v
        new_cache = None if cache is None else KVCache(kv[0], kv[1], start + t, kv[2])
        return ModelOutput(logits=logits, hidden_states=None if hidden is None else tuple(hidden),
                           probes=probe_out, cache=new_cache)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of every text layer: k, v [L,B,K,G,D] (after RoPE); ``index`` int32 scalar,
    the number of positions written (the next query's key position); ``k_pre`` [L,B,K,G,D] the
    pre-RoPE keys, kept only when asked for (``pre_rope=True``: interventions such as RAVE that read
    ``site.k_pre`` of every key while decoding), else None."""

    k: Any
    v: Any
    index: Any
    k_pre: Any = None

    @classmethod
    def empty(cls, config: Qwen2_5_VLConfig, batch_size: int, max_len: int, dtype=jnp.float32,
              pre_rope: bool = False):
        t = config.text
        shape = (t.num_hidden_layers, batch_size, max_len, t.num_key_value_heads, t.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.int32(0),
                   jnp.zeros(shape, dtype) if pre_rope else None)


def splice(embeds: Array, features: Array, image_mask: Array) -> Array:
    """Writes ``features`` [M,E] into ``embeds`` [B,S,E] at the image pad tokens, in row-major
    order (HF ``masked_scatter``)."""
    flat = image_mask.reshape(-1)
    src = jnp.clip(jnp.cumsum(flat) - 1, 0, features.shape[0] - 1)
    out = jnp.where(flat[:, None], features[src], embeds.reshape(flat.shape[0], -1))
    return out.reshape(embeds.shape)


def text_mask(attention_mask: Array, query_pos: Array) -> Array:
    """Causal ∧ key-not-padding mask [B,1,T,K] for queries at key positions ``query_pos`` [T].

    A padded query keeps its own key so no row is empty (its outputs are ignored downstream;
    transformers leaves such rows uniform).
    """
    keys = jnp.arange(attention_mask.shape[-1], dtype=jnp.int32)
    causal = keys[None, :] <= query_pos[:, None]                                     # [T,K]
    m = causal[None] & (attention_mask[:, None, :] > 0)
    m = m | (keys[None, :] == query_pos[:, None])[None]
    return m[:, None]


# ----------------------------------------------------------------------------- pure functional API
def _model_class(config) -> type:
    """The model class of ``config``'s own class (``ConfigClass.model_class``, bound in the family's
    modeling module next to the model class; an inherited binding does not count).

    Raises:
        TypeError: ``type(config)`` has no model class of its own.
    """
    cls = type(config).__dict__.get("model_class")
    if cls is None:
        raise TypeError(f"{type(config).__name__} has no model class: bind one in its family's modeling module "
                        f"({type(config).__name__}.model_class = ...ForConditionalGeneration)")
    return cls


@functools.lru_cache(maxsize=None)
def graphdef(config: Qwen2_5_VLConfig, dtype: str = "float32"):
    """The static graph of the model for ``config`` (no parameter memory)."""
    abstract = nnx.eval_shape(lambda: _model_class(config)(config, jnp.dtype(dtype)))
    return nnx.split(abstract)[0]


def abstract_params(config: Qwen2_5_VLConfig, dtype: str = "float32") -> nnx.State:
    """Parameter pytree of ShapeDtypeStructs with logical-axis metadata (for loading and sharding)."""
    abstract = nnx.eval_shape(lambda: _model_class(config)(config, jnp.dtype(dtype)))
    return nnx.split(abstract)[1]


def forward(params: nnx.State, config: Qwen2_5_VLConfig, batch: Batch, interventions: Sequence = (),
            probes: Sequence = (), output_hidden_states: bool = False, cache: KVCache | None = None) -> ModelOutput:
    """Pure Qwen2.5-VL forward: ``params`` pytree + ``batch`` -> :class:`ModelOutput`.

    ``config`` and ``output_hidden_states`` must be static under ``jax.jit``; ``interventions`` and
    ``probes`` are pytrees whose layer choices are static metadata.
    """
    dtype = jax.tree_util.tree_leaves(params)[0].dtype
    model = nnx.merge(graphdef(config, jnp.dtype(dtype).name), params)
    return model(batch, tuple(interventions), tuple(probes), output_hidden_states, cache)


forward_jit = jax.jit(forward, static_argnames=("config", "output_hidden_states"))

Qwen2_5_VLConfig.model_class = Qwen2_5_VLForConditionalGeneration
