"""Converted checkpoints: one tensorstore (zarr) array per parameter, restored straight into
device shards.

    jaxmm convert HF_DIR OUT            # streamed tensor by tensor: host memory ~ the largest tensor
    model = jaxmm.load(OUT, mesh=mesh)  # each device reads only its own slice

Layout of ``OUT``: ``jaxmm_checkpoint.json`` (format, family, parameter list with shapes and
dtypes), ``params/<dotted.path>/`` (zarr v2 arrays, stored in the source dtype), and the source's
``config.json``, tokenizer and preprocessor files. The directory is written under a temporary name
and renamed into place, so an interrupted conversion leaves nothing that looks complete.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

FORMAT = "jaxmm-tensorstore-v1"
MARKER = "jaxmm_checkpoint.json"


def _spec(path: Path, shape=None, dtype=None, create=False):
    spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(path)}}
    if create:
        spec["metadata"] = {
            "shape": list(shape),
            "dtype": np.dtype(dtype).str if np.dtype(dtype).name != "bfloat16" else "bfloat16",
            "chunks": list(shape) if len(shape) else [],
        }
        spec["create"] = True
        spec["delete_existing"] = True
    return spec


def _name(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def convert(hf_dir: str | Path, out_dir: str | Path) -> Path:
    """Converts a Hugging Face checkpoint directory, one tensor in host memory at a time.

    Raises:
        CheckpointError / ConfigError: as :func:`jaxmm.load` would (nothing is left at ``out_dir``).
    """
    import flax.nnx as nnx
    import tensorstore as ts

    from jaxmm.checkpoint.hf import iter_converted, open_checkpoint
    from jaxmm.models.registry import family_of

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    family = family_of(hf_dir)
    config = family.Config.from_pretrained(hf_dir)
    expected = {p: v.get_value() for p, v in nnx.to_flat_state(family.abstract_params(config))}
    ckpt = open_checkpoint(hf_dir)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "params").mkdir(parents=True)
    ignore = family.IGNORE_TIED if config.tie_word_embeddings else family.IGNORE
    listing = {}
    try:
        for path, array in iter_converted(ckpt, family.KEY_RULES, expected, dtype=None, ignore=ignore, keep_dtype=True):
            name = _name(path)
            store = ts.open(_spec(tmp / "params" / name, array.shape, array.dtype, create=True)).result()
            store.write(array).result()
            listing[name] = {"shape": list(array.shape), "dtype": np.dtype(array.dtype).name}
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for f in hf_dir.iterdir():
        weights = f.name.endswith((".safetensors", ".bin", ".pt", ".pth")) or f.name == "model.safetensors.index.json"
        if f.is_file() and not weights:
            shutil.copy(f, tmp / f.name)
    (tmp / MARKER).write_text(json.dumps({"format": FORMAT, "model_type": config.model_type, "params": listing}, indent=1))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def is_converted(path: str | Path) -> bool:
    """True when ``path`` is a directory written by :func:`convert` (it holds the marker file)."""
    return (Path(path) / MARKER).exists()


def restore(path: str | Path, abstract: dict, dtype, shardings: dict | None = None) -> dict:
    """``{param path: jax.Array}`` from a converted checkpoint. With ``shardings``, every device
    reads only its own slice (``jax.make_array_from_callback``); otherwise arrays land on the
    default device. Casts to ``dtype``.

    Raises:
        CheckpointError: a parameter missing from the store, or stored with another shape.
    """
    import jax
    import tensorstore as ts

    from jaxmm.checkpoint.hf import CheckpointError

    path = Path(path)
    meta = json.loads((path / MARKER).read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path / MARKER}: format {meta.get('format')!r}, expected {FORMAT!r}")
    out, problems = {}, []
    for p, want in abstract.items():
        name = _name(p)
        info = meta["params"].get(name)
        if info is None:
            problems.append(f"missing parameter {name}")
            continue
        if tuple(info["shape"]) != tuple(want.shape):
            problems.append(f"parameter {name}: stored shape {info['shape']}, model expects {list(want.shape)}")
            continue
        store = ts.open(_spec(path / "params" / name)).result()
        if shardings is None:
            out[p] = jax.numpy.asarray(np.asarray(store.read().result()).astype(dtype))
        else:
            out[p] = jax.make_array_from_callback(
                tuple(want.shape), shardings[p], lambda idx, s=store: np.asarray(s[idx].read().result()).astype(dtype)
            )
    if problems:
        raise CheckpointError(f"{path}: converted checkpoint does not match the model:\n  " + "\n  ".join(problems))
    return out
