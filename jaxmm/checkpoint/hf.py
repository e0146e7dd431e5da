"""Hugging Face checkpoint directories (safetensors) -> numpy, through a declarative key map.

The safetensors format: 8 bytes little-endian header length ``n``, ``n`` bytes of JSON mapping each
tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets into the data that
follows the header) plus an optional ``__metadata__``. jaxmm validates every file from its header
alone first (a truncated file, a renamed pickle or zip, a header over the format's cap, an entry
whose byte span does not fit its shape: each caught before any tensor is read, with a message naming
the file and tensor), then reads tensors one at a time through the ``safetensors`` package
(``safe_open``: ``get_tensor`` for a whole tensor, ``get_slice`` for one device's part of it). The
package's numpy backend has no float8 dtypes, so F8 tensors are read from their byte range by
jaxmm itself. Pickle-based files (``.bin``, ``.pt``, ``.pth``) are never opened.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
import tempfile
from pathlib import Path
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

#: safetensors dtype code -> numpy dtype (bf16 and fp8 through ml_dtypes).
DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U64": np.uint64,
    "U32": np.uint32,
    "U16": np.uint16,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_CODES = {np.dtype(v): k for k, v in DTYPES.items()}
_FLOAT_CODES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")

#: safetensors' own cap on the JSON header (``MAX_HEADER_SIZE`` in the Rust crate): 100 MB.
MAX_HEADER_SIZE = 100_000_000

CONVERT_HINT = (
    "jaxmm never unpickles checkpoints. Convert to safetensors first, e.g.\n"
    '  python -c "from transformers import AutoModelForImageTextToText as M; '
    "M.from_pretrained('IN').save_pretrained('OUT', safe_serialization=True)\"\n"
    "or torch.load(f, weights_only=True) followed by safetensors.torch.save_file."
)


_FLOAT_DTYPES = {np.dtype(DTYPES[c]) for c in _FLOAT_CODES}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as asked: names the file, tensor and parameter involved."""


@dataclasses.dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int


def _refuse_pickle(path: Path, head: bytes) -> None:
    """For a file that is not valid safetensors: raises if it starts as ``torch.save`` writes (a zip
    archive, or a pickle of protocol 2..5)."""
    if head[:4] == b"PK\x03\x04" or (head[0] == 0x80 and 2 <= head[1] <= 5):
        kind = "a zip archive" if head[:2] == b"PK" else f"a pickle (protocol {head[1]})"
        raise CheckpointError(
            f"{path}: not a safetensors file but {kind}, as torch.save writes (a .bin "
            f"or .pt checkpoint, renamed?). {CONVERT_HINT}"
        )


def _read_header(path: Path) -> dict[str, _Entry]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_SIZE:
            _refuse_pickle(path, head)
            raise CheckpointError(
                f"{path}: not a safetensors file: its first 8 bytes give a header of {n} "
                f"bytes, over safetensors' limit of {MAX_HEADER_SIZE} (the file has "
                f"{size} bytes)"
            )
        if 8 + n > size:
            _refuse_pickle(path, head)
            raise CheckpointError(f"{path}: truncated safetensors file: header of {n} bytes but the file has {size} bytes")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            _refuse_pickle(path, head)
            raise CheckpointError(f"{path}: corrupt safetensors header of {n} bytes ({e}); the file has {size} bytes") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header: a JSON {type(header).__name__}, not an object")
    entries, data_end = {}, 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (b, e) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            if not all(type(d) is int and d >= 0 for d in (*shape, b, e)):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt header entry for tensor {key!r}: {info}") from None
        if dtype not in DTYPES:
            raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {dtype}")
        want = int(np.prod(shape, dtype=np.int64)) * np.dtype(DTYPES[dtype]).itemsize
        if e - b != want:
            raise CheckpointError(
                f"{path}: tensor {key!r} spans {e - b} bytes, its shape {list(shape)} and dtype {dtype} need {want}"
            )
        entries[key] = _Entry(path, dtype, shape, 8 + n + b, 8 + n + e)
        data_end = max(data_end, e)
    if 8 + n + data_end > size:
        raise CheckpointError(f"{path}: truncated safetensors file: tensors need {8 + n + data_end} bytes, the file has {size}")
    return entries


class SafetensorsCheckpoint:
    """The tensors of one checkpoint (single file or shards), read lazily one at a time."""

    #: safetensors dtype codes the package's numpy backend cannot return (read by byte range)
    _RAW = ("F8_E4M3", "F8_E5M2")

    def __init__(self, entries: dict[str, _Entry]):
        self._entries = entries

    def keys(self) -> list[str]:
        """Every tensor name of the checkpoint (all shards), in header order."""
        return list(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def shape(self, key: str) -> tuple[int, ...]:
        """The tensor's shape from the header (nothing is read). ``KeyError`` for an unknown name."""
        return self._entries[key].shape

    def dtype(self, key: str) -> str:
        """The safetensors dtype code: 'F32', 'BF16', 'F16', ..."""
        return self._entries[key].dtype

    def file(self, key: str) -> Path:
        """The safetensors file (shard) that holds the tensor. ``KeyError`` for an unknown name."""
        return self._entries[key].file

    @staticmethod
    def _read(f: Path, read):
        """``read(handle)`` on a fresh ``safe_open`` of ``f``, closed right after: the file's memory
        map lives for one tensor, so resident memory holds that tensor, not every page read so far."""
        from safetensors import safe_open

        with safe_open(str(f), framework="numpy") as handle:
            return read(handle)

    def get(self, key: str) -> np.ndarray:
        """The tensor [shape] as a numpy array of its own dtype (bf16 as ``ml_dtypes.bfloat16``).

        Raises:
            CheckpointError: the file changed or is unreadable since it was opened (names file and tensor).
        """
        e = self._entries[key]
        if e.dtype in self._RAW:
            return self._raw(key)
        try:
            a = self._read(e.file, lambda h: h.get_tensor(key))
        except Exception as err:  # noqa: BLE001
            raise CheckpointError(f"{e.file}: cannot read tensor {key!r} ({err})") from None
        return self._checked(key, a, e.shape)

    def get_slice(self, key: str, index: tuple[slice, ...]) -> np.ndarray:
        """``tensor[index]`` (a tuple of slices, as ``jax.make_array_from_callback`` passes a device's
        part) read without the rest of the tensor.

        Raises:
            CheckpointError: as :meth:`get`.
        """
        e = self._entries[key]
        if e.dtype in self._RAW:
            return self._raw(key)[index]
        try:
            if not e.shape:
                return self.get(key)[index]
            a = self._read(e.file, lambda h: h.get_slice(key)[index])
        except Exception as err:  # noqa: BLE001
            raise CheckpointError(f"{e.file}: cannot read tensor {key!r}[{index}] ({err})") from None
        return np.asarray(a)

    def _checked(self, key: str, a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        e = self._entries[key]
        if tuple(a.shape) != tuple(shape) or a.dtype != np.dtype(DTYPES[e.dtype]):
            raise CheckpointError(
                f"{e.file}: tensor {key!r} read as {a.dtype} {list(a.shape)}, its header says "
                f"{e.dtype} {list(shape)} (file changed since it was opened?)"
            )
        return a

    def _raw(self, key: str) -> np.ndarray:
        """The tensor from its byte range (host memory holds this one tensor)."""
        e = self._entries[key]
        buf = bytearray(e.end - e.begin)
        with open(e.file, "rb") as f:
            f.seek(e.begin)
            got = f.readinto(buf)
        if got != len(buf):
            raise CheckpointError(
                f"{e.file}: truncated while reading tensor {key!r}: bytes "
                f"{e.begin}..{e.end} wanted, {got} read (file changed since it was opened?)"
            )
        return np.frombuffer(buf, dtype=DTYPES[e.dtype]).reshape(e.shape)


def open_checkpoint(path: str | Path) -> SafetensorsCheckpoint:
    """Opens ``model.safetensors``, a sharded ``model.safetensors.index.json``, any single
    ``*.safetensors`` in a directory, or a ``.safetensors`` file path.

    Only headers are read here, as the safetensors spec lays them out (8-byte little-endian header
    length, a JSON header of ``{name: {"dtype", "shape", "data_offsets": [begin, end]}}`` plus an
    optional ``__metadata__``); each file's size is checked against ``8 + header length + the
    largest data end offset`` so a truncated download fails here, naming the file and both sizes.

    Args:
        path: a checkpoint directory or a ``.safetensors`` file.

    Returns:
        A :class:`SafetensorsCheckpoint` (``keys``, ``shape``, ``dtype``, ``file``, ``get``, ``get_slice``).

    Raises:
        CheckpointError: pickle files only, or a ``.safetensors`` file that is really a pickle or
            zip (``torch.save``), both with how to convert; a header over safetensors' 100 MB cap; a
            truncated or corrupt file; an index naming a missing shard or a tensor its shard lacks.
        FileNotFoundError: no weights at all.
    """
    path = Path(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{path}: not a safetensors file. {CONVERT_HINT}")
        return SafetensorsCheckpoint(_read_header(path))
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
        entries, headers = {}, {}
        for key, shard in weight_map.items():
            f = path / shard
            if f not in headers:
                if not f.exists():
                    raise CheckpointError(f"{index} names shard {shard} (for tensor {key!r}), which does not exist")
                headers[f] = _read_header(f)
            if key not in headers[f]:
                raise CheckpointError(f"{index} places tensor {key!r} in {shard}, which does not hold it")
            entries[key] = headers[f][key]
        return SafetensorsCheckpoint(entries)
    files = sorted(path.glob("*.safetensors"))
    if (path / "model.safetensors").exists():
        files = [path / "model.safetensors"]
    if not files:
        pickles = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth")] if path.is_dir() else []
        if pickles:
            raise CheckpointError(f"{path}: only pickle weights ({', '.join(sorted(pickles))}), no safetensors. {CONVERT_HINT}")
        raise FileNotFoundError(f"{path}: no model.safetensors, index or *.safetensors file")
    entries = {}
    for f in files:
        for key, entry in _read_header(f).items():
            if key in entries:
                raise CheckpointError(
                    f"{path}: tensor {key!r} is in both {entries[key].file.name} and "
                    f"{f.name}; keep one file, or write a model.safetensors.index.json"
                )
            entries[key] = entry
    return SafetensorsCheckpoint(entries)


# ----------------------------------------------------------------------------- key maps
@dataclasses.dataclass(frozen=True)
class Rule:
    """One line of a key map.

    pattern: regex that must match a checkpoint key in full (``re.fullmatch``).
    target: parameter path template, dotted; ``\\1``, ``\\g<1>``, ``\\g<name>`` are the pattern's
        groups (``re.Match.expand`` syntax, so write it as a raw string). After expansion the
        template is split on ``.`` and all-digit components become ints (list indices in the
        parameter tree): ``Rule(r"model\\.layers\\.(\\d+)\\.mlp\\.up_proj\\.weight",
        r"language_model.layers.\\1.mlp.up_proj.kernel", "T")`` maps
        ``model.layers.3.mlp.up_proj.weight`` to ``('language_model', 'layers', 3, 'mlp', 'up_proj',
        'kernel')``.
    transform: None (identity), ``"T"`` (transpose a 2-D torch Linear weight [out,in] -> [in,out]),
        or ``fn(array, expected_shape) -> array`` (raise ``ValueError`` to report a tensor it
        cannot convert; the message is collected with the other problems).
    """

    pattern: str
    target: str
    transform: str | Callable | None = None

    def __post_init__(self):
        re.compile(self.pattern)  # a bad regex fails when the table is built, not mid-conversion
        if not (self.transform is None or self.transform == "T" or callable(self.transform)):
            raise ValueError(
                f"Rule({self.pattern!r}): transform {self.transform!r}; expected None, 'T' "
                f"or a callable (array, expected_shape) -> array"
            )

    def match(self, key: str) -> tuple | None:
        """The parameter path ``key`` maps to (``target`` with the pattern's groups filled, digit
        parts as ints), or None when ``pattern`` does not match the whole key."""
        m = re.fullmatch(self.pattern, key)
        if m is None:
            return None
        return tuple(int(p) if p.isdigit() else p for p in m.expand(self.target).split("."))

    def apply(self, w: np.ndarray, shape) -> np.ndarray:
        """The tensor ``w`` converted by ``transform`` for a parameter of ``shape``.

        Raises:
            ValueError: ``"T"`` on a tensor that is not 2-D, or whatever a callable transform raises.
        """
        if self.transform is None:
            return w
        if self.transform == "T":
            if w.ndim != 2:
                raise ValueError(f"transform 'T' needs a 2-D tensor, got shape {list(w.shape)}")
            return w.T
        return self.transform(w, shape)


def _fmt(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _contiguous(a: np.ndarray) -> np.ndarray:
    """C-contiguous, keeping 0-d arrays 0-d (``np.ascontiguousarray`` makes them 1-d)."""
    return a if a.flags.c_contiguous else np.array(a, order="C")


def _leaf(v):
    """An ``expected`` leaf as an object with ``.shape``/``.dtype``: unwraps ``nnx.Variable`` (as in
    ``nnx.to_flat_state(nnx.eval_shape(...))``) to the ``jax.ShapeDtypeStruct`` it holds."""
    if not hasattr(v, "shape") or not hasattr(v, "dtype"):
        for unwrap in ("get_value", "value"):
            inner = getattr(v, unwrap, None)
            inner = inner() if callable(inner) else inner
            if hasattr(inner, "shape") and hasattr(inner, "dtype"):
                return inner
    return v


def convert(
    ckpt: SafetensorsCheckpoint, rules: Iterable[Rule], expected: dict, *, dtype=None, ignore: Iterable[str] = ()
) -> dict[tuple, np.ndarray]:
    """All of :func:`iter_converted` in a dict (the whole model in host memory)."""
    return dict(iter_converted(ckpt, rules, expected, dtype=dtype, ignore=ignore))


class LazyTensor:
    """A checkpoint tensor mapped onto a parameter but not read yet: ``shape``/``dtype`` of the
    parameter, and ``lazy[index]`` reads only that part (a tuple of slices in the parameter's layout)
    through ``get_slice``, transposed for a ``"T"`` rule, cast to ``dtype``."""

    def __init__(self, ckpt: SafetensorsCheckpoint, key: str, transpose: bool, shape, dtype):
        self.ckpt, self.key, self.transpose = ckpt, key, transpose
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)

    def __getitem__(self, index) -> np.ndarray:
        index = tuple(index) + (slice(None),) * (len(self.shape) - len(tuple(index)))
        if self.transpose:
            return _contiguous(self.ckpt.get_slice(self.key, index[::-1]).T.astype(self.dtype))
        return _contiguous(self.ckpt.get_slice(self.key, index).astype(self.dtype))


def iter_converted(
    ckpt: SafetensorsCheckpoint,
    rules: Iterable[Rule],
    expected: dict,
    *,
    dtype=None,
    ignore: Iterable[str] = (),
    keep_dtype: bool = False,
    lazy: bool = False,
):
    """Maps every checkpoint tensor through ``rules`` onto the ``expected`` parameter paths.

    Args:
        ckpt: an opened checkpoint.
        rules: key map; the first rule whose pattern matches a key wins.
        expected: ``{path tuple: object with .shape and .dtype}`` (e.g. from ``nnx.eval_shape``).
        dtype: cast every tensor to this dtype (default: each expected dtype).
        ignore: regexes of checkpoint keys to skip silently.
        keep_dtype: yield tensors in the checkpoint's own dtype (no cast).
        lazy: yield a :class:`LazyTensor` (nothing read; index it for a slice) for every tensor whose
            rule is the identity or ``"T"``; tensors of other rules are read and converted.

    Yields:
        ``(path, np.ndarray)`` one tensor at a time, in checkpoint order (file by file), so a caller
        can stream a conversion; the errors are raised after the last tensor.

    Raises:
        CheckpointError: listing, all at once, unexpected tensors, tensors filling the same
            parameter twice, mis-shaped tensors, integer or bool tensors for float parameters and
            missing parameters, each with key and file.
    """
    rules = tuple(rules)
    ignore = tuple(re.compile(p) for p in ignore)
    expected = {tuple(p): _leaf(v) for p, v in expected.items()}
    source, problems = {}, []
    for key in sorted(ckpt.keys(), key=lambda k: (str(ckpt.file(k)), k)):
        if any(p.fullmatch(key) for p in ignore):
            continue
        for rule in rules:
            path = rule.match(key)
            if path is not None:
                break
        else:
            problems.append(f"unexpected tensor {key!r} in {ckpt.file(key).name}: no rule maps it to a parameter")
            continue
        if path not in expected:
            problems.append(
                f"unexpected tensor {key!r} in {ckpt.file(key).name}: maps to {_fmt(path)}, which the model does not have"
            )
            continue
        if path in source:
            problems.append(
                f"parameter {_fmt(path)} filled twice: by {source[path]!r} in "
                f"{ckpt.file(source[path]).name} and by {key!r} in {ckpt.file(key).name}"
            )
            continue
        want = tuple(expected[path].shape)
        if ckpt.dtype(key) not in _FLOAT_CODES and np.dtype(expected[path].dtype) in _FLOAT_DTYPES:
            problems.append(
                f"tensor {key!r} in {ckpt.file(key).name} has dtype {ckpt.dtype(key)}, but parameter "
                f"{_fmt(path)} is a float weight (a quantised or corrupt checkpoint?); jaxmm "
                f"reads F32, F16, BF16 (and F64, F8) weights"
            )
            continue
        if lazy and rule.transform in (None, "T") and (rule.transform is None or len(ckpt.shape(key)) == 2):
            t = rule.transform == "T"
            shape = tuple(ckpt.shape(key))[::-1] if t else tuple(ckpt.shape(key))
            if shape != want:
                problems.append(
                    f"mis-shaped tensor {key!r} in {ckpt.file(key).name} (shape {list(ckpt.shape(key))}): "
                    f"parameter {_fmt(path)} expects {list(want)}, got {list(shape)} after the key map"
                )
                continue
            source[path] = key
            cast = DTYPES[ckpt.dtype(key)] if keep_dtype else (dtype if dtype is not None else expected[path].dtype)
            yield path, LazyTensor(ckpt, key, t, shape, cast)
            continue
        try:
            w = rule.apply(ckpt.get(key), want)
        except ValueError as e:
            problems.append(f"tensor {key!r} in {ckpt.file(key).name}: {e}")
            continue
        if tuple(w.shape) != want:
            problems.append(
                f"mis-shaped tensor {key!r} in {ckpt.file(key).name} (shape {list(ckpt.shape(key))}): "
                f"parameter {_fmt(path)} expects {list(want)}, got {list(w.shape)} after the key map"
            )
            continue
        source[path] = key
        yield path, _contiguous(w if keep_dtype else w.astype(dtype if dtype is not None else expected[path].dtype))
    missing = [p for p in expected if p not in source]
    if missing:
        listed = ", ".join(f"{_fmt(p)} {list(expected[p].shape)}" for p in missing[:10])
        more = f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""
        problems.append(f"missing parameters ({len(missing)}), no checkpoint tensor maps to: {listed}{more}")
    if problems:
        raise CheckpointError("checkpoint does not match the model:\n  " + "\n  ".join(problems))


def save_safetensors(tensors: dict[str, np.ndarray], path: str | Path, metadata: dict | None = None) -> Path:
    """Writes ``tensors`` as one safetensors file, atomically (temp file + ``os.replace``).

    The layout follows the safetensors spec (8-byte little-endian header length, JSON header with
    ``dtype``/``shape``/``data_offsets`` per tensor and ``__metadata__`` of string values, padded with
    spaces to 8 bytes, then the raw little-endian data); readable by ``safetensors`` and by
    :func:`open_checkpoint`.

    Args:
        tensors: ``{name: array}``; numpy or ml_dtypes dtypes in :data:`DTYPES` (bf16 included).
        path: the file to write; its directory is created if needed.
        metadata: optional ``__metadata__`` (values are stored as strings).

    Returns:
        ``path`` as a ``Path``.

    Raises:
        CheckpointError: a dtype with no safetensors code.
    """
    path = Path(path)
    header, offset, arrays = {}, 0, []
    for key in sorted(tensors):
        a = _contiguous(np.asarray(tensors[key]))
        code = _CODES.get(a.dtype)
        if code is None:
            raise CheckpointError(f"tensor {key!r}: dtype {a.dtype} has no safetensors code")
        header[key] = {"dtype": code, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for a in arrays:
                f.write(a.tobytes())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def unflatten(flat: dict[tuple, object]) -> dict:
    """``{('a', 0, 'b'): x}`` -> ``{'a': {0: {'b': x}}}`` (nested dicts; int keys stay ints).

    Raises:
        ValueError: a path that is both a leaf and a prefix of another path.
    """
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for i, k in enumerate(path[:-1]):
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ValueError(f"{_fmt(path)}: {_fmt(path[: i + 1])} is a leaf, not a subtree")
        if path[-1] in node:
            raise ValueError(f"{_fmt(path)} is given twice, or is also a subtree")
        node[path[-1]] = value
    return tree
