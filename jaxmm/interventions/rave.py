"""RAVE — re-allocating visual attention with a learned pair-gating bias (arXiv 2605.18359).

methods.md (RAVE) [abstract + inferred parametrisation]: a learned bias added to the **pre-softmax**
scores of **visual keys only**, computed from **pre-RoPE** query and key features, on chosen layers
and GQA heads, the backbone unchanged:

    z_ij += 1[j ∈ V] · g_h · b_h(q̃_i, k̃_j),        g_h = tanh(γ_h),  γ_h = 0 at initialisation

so training starts at the unmodified model. Two pluggable parametrisations of ``b_h``:

* ``"bilinear"`` (default): ``b_h = (U_h q̃)ᵀ (W_g k̃) / √r`` with U_h ∈ R^{r×D} per query head and
  W_g ∈ R^{r×D} per KV group (GQA: the heads of a group share the key projection).
* ``"mlp"``: ``b_h = w_h · silu(P_h q̃ + Q_g k̃ + c_h)``, a one-hidden-layer MLP on [q̃; k̃] (the first
  layer splits over the pair, so it costs [T,K,r] per head rather than a [T,K,2D] input).

The bias is an ``Intervention`` ``bias`` stage, so the fused attention path stays in use (cuDNN on
GPU); its parameters are ordinary pytree leaves, trained by ``jaxmm train`` with ``rave: {...}``
(backbone frozen with ``freeze: [".*"]`` or end to end) and saved as their own checkpoint group.

Shapes (n = number of chosen layers, H query heads, G KV heads, D head_dim, r rank):
``gamma`` [n,H]; bilinear ``u`` [n,H,r,D], ``w`` [n,G,r,D]; mlp ``u`` [n,H,r,D], ``w`` [n,G,r,D],
``c`` [n,H,r], ``v`` [n,H,r]. All float32.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxmm.attention import Intervention, Site, register, static_field


KINDS = ("bilinear", "mlp")


@register
class RAVE(Intervention):
    """Learned pair-gating bias on image keys (see the module docstring for shapes)."""

    reads_pre_rope_keys = True  # generate keeps a pre-RoPE key cache so decoding sees every k̃_j

    gamma: jax.Array
    u: jax.Array
    w: jax.Array
    c: jax.Array | None = None
    v: jax.Array | None = None
    layers: tuple[int, ...] = static_field((0,))
    heads: tuple[int, ...] | None = static_field(None)  # query heads that get a bias (None = all)
    kind: str = static_field("bilinear")
    towers: tuple[str, ...] = static_field(("text",))

    def bias(self, site: Site):
        """The learned bias [B,H,T,K] float32 on image keys, from the pre-RoPE q̃, k̃ of the site.

        Raises:
            ValueError: the site has no pre-RoPE q̃/k̃, or its k̃ does not cover every key position
                (decode with :func:`jaxmm.generate`, which keeps a pre-RoPE key cache).
        """
        if site.q_pre is None or site.k_pre is None:
            raise ValueError("RAVE needs the pre-RoPE q̃, k̃ of the site (text tower of a jaxmm model)")
        if site.k_pre.shape[1] != site.layout.image_mask.shape[1]:
            raise ValueError(
                f"RAVE needs the pre-RoPE keys of all {site.layout.image_mask.shape[1]} key positions, "
                f"got {site.k_pre.shape[1]}: decode with jaxmm.generate (it keeps a pre-RoPE key "
                "cache for RAVE) or a cache from KVCache.empty(..., pre_rope=True)"
            )
        i = self.layers.index(site.layer)
        q, k = site.q_pre.astype(jnp.float32), site.k_pre.astype(jnp.float32)  # [B,T,H,D], [B,K,G,D]
        h, g = q.shape[2], k.shape[2]
        rep = h // g
        r = self.u.shape[-2]
        uq = jnp.einsum("bthd,hrd->bhtr", q, self.u[i])  # [B,H,T,r]
        wk = jnp.einsum("bkgd,grd->bgkr", k, self.w[i])  # [B,G,K,r]
        wk = jnp.repeat(wk, rep, axis=1)  # [B,H,K,r]
        if self.kind == "bilinear":
            b = jnp.einsum("bhtr,bhkr->bhtk", uq, wk) / np.sqrt(r)
        else:
            hid = jax.nn.silu(uq[:, :, :, None, :] + wk[:, :, None, :, :] + self.c[i][None, :, None, None, :])
            b = jnp.einsum("bhtkr,hr->bhtk", hid, self.v[i])
        gate = jnp.tanh(self.gamma[i])  # [H]
        if self.heads is not None:
            gate = gate * jnp.zeros(h, jnp.float32).at[jnp.asarray(self.heads)].set(1.0)
        img = site.layout.image_mask.astype(jnp.float32)[:, None, None, :]  # [B,1,1,K]
        return b * gate[None, :, None, None] * img


def init(config, layers=None, heads=None, rank: int = 8, kind: str = "bilinear", seed: int = 0, scale: float = 1.0) -> RAVE:
    """A RAVE module for a model ``config`` with γ = 0 (the model is unchanged at step 0).

    ``layers``: text layers (default all); ``heads``: query heads (default all); U, W (and the MLP's
    weights) ~ N(0, scale²/D) so that b_h is O(1) once the gate opens.

    Raises:
        ValueError: an unknown ``kind``, a layer or head out of range.
    """
    t = config.text
    n_layers, h, g, d = t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads, t.head_dim
    layers = tuple(range(n_layers)) if layers is None else tuple(int(x) for x in layers)
    if kind not in KINDS:
        raise ValueError(f"RAVE kind {kind!r}; expected one of {KINDS}")
    bad = [x for x in layers if not 0 <= x < n_layers]
    if bad or not layers:
        raise ValueError(f"RAVE layers {list(layers)}: the model has text layers 0 … {n_layers - 1}")
    if heads is not None:
        heads = tuple(int(x) for x in heads)
        if not heads or any(not 0 <= x < h for x in heads):
            raise ValueError(f"RAVE heads {list(heads)}: the model has query heads 0 … {h - 1}")
    rng = np.random.default_rng(seed)
    n = len(layers)
    normal = lambda *shape: jnp.asarray(scale * rng.standard_normal(shape) / np.sqrt(d), jnp.float32)
    extra = {}
    if kind == "mlp":
        extra = {
            "c": jnp.zeros((n, h, rank), jnp.float32),
            "v": jnp.asarray(rng.standard_normal((n, h, rank)) / np.sqrt(rank), jnp.float32),
        }
    return RAVE(
        gamma=jnp.zeros((n, h), jnp.float32),
        u=normal(n, h, rank, d),
        w=normal(n, g, rank, d),
        layers=layers,
        heads=heads,
        kind=kind,
        **extra,
    )


def from_config(config, d: dict | None) -> RAVE | None:
    """``init`` from a config dict ``{layers, heads, rank, kind, seed, scale}`` (None -> None)."""
    if not d:
        return None
    allowed = {"layers", "heads", "rank", "kind", "seed", "scale"}
    unknown = set(d) - allowed
    if unknown:
        raise ValueError(f"rave: unknown field(s) {sorted(unknown)}; expected {sorted(allowed)}")
    return init(config, **d)


def save(rave: RAVE, path) -> Path:
    """``path``/rave.safetensors (arrays) + rave.json (layers, heads, kind), written atomically."""
    from jaxmm.checkpoint.hf import save_safetensors

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.asarray(getattr(rave, k), np.float32) for k in ("gamma", "u", "w", "c", "v") if getattr(rave, k) is not None}
    tmp = path / "rave.safetensors.tmp"
    save_safetensors(arrays, tmp)
    tmp.replace(path / "rave.safetensors")
    meta = {"layers": list(rave.layers), "heads": None if rave.heads is None else list(rave.heads), "kind": rave.kind}
    (path / "rave.json.tmp").write_text(json.dumps(meta, indent=2))
    (path / "rave.json.tmp").replace(path / "rave.json")
    return path


def load(path) -> RAVE:
    """A RAVE module saved by :func:`save` (``path`` is the directory)."""
    from safetensors.numpy import load_file

    path = Path(path)
    for f in ("rave.json", "rave.safetensors"):
        if not (path / f).exists():
            raise FileNotFoundError(f"{path / f}: not a saved RAVE module (expected rave.json and rave.safetensors)")
    meta = json.loads((path / "rave.json").read_text())
    arrays = {k: jnp.asarray(v) for k, v in load_file(path / "rave.safetensors").items()}
    heads = None if meta["heads"] is None else tuple(meta["heads"])
    return RAVE(layers=tuple(meta["layers"]), heads=heads, kind=meta["kind"], **arrays)
