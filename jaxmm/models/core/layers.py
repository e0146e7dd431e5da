"""Layers every family is built from (Flax NNX), each mirroring a torch module of transformers.

``Linear`` (``nn.Linear``, kernel [in, out] = torch's ``weight.T``), ``RMSNorm``
(``Qwen2RMSNorm``), ``LayerNorm`` (``nn.LayerNorm``), ``SwiGLU`` (``Qwen2MLP``), ``Embedding``
(``nn.Embedding``, with the tied lm head), and the rotary helpers ``rotate_half``/``apply_rope``.
Every parameter carries logical axis names (``embed``, ``mlp``, ``heads``, ``kv_heads``, ``vocab``)
that :mod:`jaxmm.sharding` maps onto a mesh.
"""

from __future__ import annotations

import flax.nnx as nnx
import jax
import jax.numpy as jnp

Array = jax.Array


def param(shape, dtype, names):
    """A zero-initialised parameter with logical axis names (mapped onto a mesh by sharding.py)."""
    return nnx.Param(jnp.zeros(shape, dtype), out_sharding=names, eager_sharding=False)


class Linear(nnx.Module):
    """``y = x @ kernel + bias``; ``kernel`` [in, out] is torch's ``weight.T``."""

    def __init__(self, din: int, dout: int, *, bias: bool, dtype, names: tuple[str, str]):
        self.kernel = param((din, dout), dtype, names)
        self.bias = param((dout,), dtype, names[1:]) if bias else None

    def __call__(self, x: Array) -> Array:
        # one rounding, as torch's F.linear (addmm): accumulate and add the bias in float32
        y = jnp.matmul(x, self.kernel[...], preferred_element_type=jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...]
        return y.astype(jnp.result_type(x, self.kernel[...]))


class RMSNorm(nnx.Module):
    """Mirrors ``Qwen2RMSNorm``: normalise in float32, cast back, then scale."""

    def __init__(self, dim: int, eps: float, *, dtype, name: str = "embed"):
        self.weight = param((dim,), dtype, (name,))
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * h.astype(x.dtype)


class LayerNorm(nnx.Module):
    """``nn.LayerNorm`` with weight and bias, computed in float32 and rounded once."""

    def __init__(self, dim: int, eps: float, *, dtype):
        self.weight = param((dim,), dtype, ("embed",))
        self.bias = param((dim,), dtype, ("embed",))
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        h = x.astype(jnp.float32)
        mu = jnp.mean(h, -1, keepdims=True)
        var = jnp.mean(jnp.square(h - mu), -1, keepdims=True)
        h = (h - mu) * jax.lax.rsqrt(var + self.eps)
        return (h * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


class SwiGLU(nnx.Module):
    """``down(silu(gate(x)) * up(x))`` (``Qwen2MLP``)."""

    def __init__(self, dim: int, hidden: int, *, bias: bool, dtype):
        self.gate_proj = Linear(dim, hidden, bias=bias, dtype=dtype, names=("embed", "mlp"))
        self.up_proj = Linear(dim, hidden, bias=bias, dtype=dtype, names=("embed", "mlp"))
        self.down_proj = Linear(hidden, dim, bias=bias, dtype=dtype, names=("mlp", "embed"))

    def __call__(self, x: Array) -> Array:
        return self.down_proj(in_float32(jax.nn.silu)(self.gate_proj(x)) * self.up_proj(x))


class Embedding(nnx.Module):
    """Token embedding table [vocab, dim]; :meth:`attend` is the tied lm head."""

    def __init__(self, vocab: int, dim: int, dtype, names=("vocab", "embed")):
        self.weight = param((vocab, dim), dtype, names)

    def __call__(self, ids: Array) -> Array:
        return jnp.take(self.weight[...], ids, axis=0)

    def attend(self, x: Array) -> Array:
        """Tied lm head: ``x @ weight.T``."""
        return x @ self.weight[...].T


def in_float32(fn):
    """``fn`` computed in float32 and rounded once to the input's dtype (torch's activations on
    bf16 tensors compute in float32 internally)."""
    return lambda x: fn(x.astype(jnp.float32)).astype(x.dtype)


def rotate_half(x: Array) -> Array:
    """``[-x2, x1]`` for the halves ``x1, x2`` of the last axis (transformers' ``rotate_half``)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """``x*cos + rotate_half(x)*sin`` with cos/sin broadcast over heads, computed in float32."""
    xf = x.astype(jnp.float32)
    return (xf * cos + rotate_half(xf) * sin).astype(x.dtype)
