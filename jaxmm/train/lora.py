"""LoRA (Hu et al. 2021, arXiv 2106.09685) as a pure transformation of the parameter tree.

For every matrix ``W`` [in, out] whose dotted path matches one of ``targets`` (regexes), LoRA keeps
``A`` [in, r] (Kaiming-uniform-like init, as PEFT) and ``B`` [r, out] (zeros), and the model runs with

    W' = W + (alpha / r) · A @ B                                   (eq. 3 of the paper)

so at initialisation ``W' == W`` exactly. :func:`merge` builds ``W'`` inside the traced step; the
forward, the seam and generation are unchanged and work with any model family. The adapters are
a plain dict ``{dotted path: {"a": A, "b": B}}`` that orbax saves as its own checkpoint group.

    lora = init(params, LoraConfig(rank=16, alpha=32, targets=[r"language_model\\..*_proj\\.kernel"]))
    merged = merge(params, lora, cfg)          # same structure and dtypes as params

SAYO's recipe (methods.md): r=16, alpha=32 on all linear layers of the decoder.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

ALL_LINEAR = (r"language_model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.kernel",)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """``rank`` r, ``alpha`` (scale alpha/r), ``targets``: regexes over dotted parameter paths
    (``language_model.layers.0.self_attn.q_proj.kernel``); only 2-D kernels may match."""

    rank: int = 16
    alpha: float = 32.0
    targets: Sequence[str] = ALL_LINEAR
    seed: int = 0

    @property
    def scale(self) -> float:
        """The adapters' multiplier α / r (LoRA, Hu et al. 2021, §4.1)."""
        return self.alpha / self.rank

    @classmethod
    def from_dict(cls, d: dict | None) -> "LoraConfig | None":
        """A config's ``lora:`` section -> LoraConfig (``None`` or empty: no LoRA, None).

        Raises:
            ValueError: an unknown field (naming it and the known ones).
        """
        if not d:
            return None
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"lora: unknown field(s) {sorted(unknown)}; expected rank, alpha, targets, seed")
        d = dict(d)
        if "targets" in d:
            d["targets"] = tuple([d["targets"]] if isinstance(d["targets"], str) else d["targets"])
        return cls(**d)


def path_name(path) -> str:
    """A pytree key path -> ``"visual.blocks.0.attn.qkv.kernel"`` (an NNX Variable's ``.value`` dropped)."""
    parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
    return ".".join(parts[:-1] if parts and parts[-1] == "value" else parts)


def targets_of(params, cfg: LoraConfig) -> dict[str, tuple[int, int]]:
    """``{path: (in, out)}`` of the matrices the targets select. Raises if none, or a non-matrix, matches."""
    pats = [re.compile(p) for p in cfg.targets]
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = path_name(path)
        if any(p.fullmatch(name) for p in pats):
            if np.ndim(leaf) != 2:
                raise ValueError(f"lora target {name} has shape {np.shape(leaf)}; only 2-D kernels can take LoRA")
            out[name] = tuple(np.shape(leaf))
    if not out:
        raise ValueError(
            f"lora targets {list(cfg.targets)} match no parameter (paths look like "
            f"'language_model.layers.0.self_attn.q_proj.kernel')"
        )
    return out


def init(params, cfg: LoraConfig) -> dict[str, dict[str, jax.Array]]:
    """Adapters for the matched kernels: A ~ U(−1/√in, 1/√in) [in, r], B = 0 [r, out], float32."""
    rng = np.random.default_rng(cfg.seed)
    lora = {}
    for name, (din, dout) in sorted(targets_of(params, cfg).items()):
        bound = 1.0 / np.sqrt(din)
        lora[name] = {
            "a": jnp.asarray(rng.uniform(-bound, bound, (din, cfg.rank)), jnp.float32),
            "b": jnp.zeros((cfg.rank, dout), jnp.float32),
        }
    return lora


def merge(params, lora: dict | None, cfg: LoraConfig | None):
    """``params`` with ``W + (alpha/r)·A@B`` at every adapted path (traceable; same dtypes)."""
    if not lora:
        return params

    def one(path, w):
        ab = lora.get(path_name(path))
        if ab is None:
            return w
        return (w + cfg.scale * (ab["a"] @ ab["b"])).astype(w.dtype)

    return jax.tree_util.tree_map_with_path(one, params)


def num_params(lora: dict) -> int:
    """The number of trainable adapter parameters in a LoRA tree (:func:`init`)."""
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(lora))
