"""Payload structure: nested dicts and lists, ragged sequences, strings, scalars.

A payload is a dict. A *flat* payload (every value an array) is stored as one
frame field per key and needs nothing more. Anything else is *flattened*: each
array-like leaf becomes one field, named by its key path (``"obs/image"``,
``"turns/0"``), and a small JSON *layout tree* beside the frame's metadata
records how to rebuild the structure. Tree nodes::

    {"d": {key: node, ...}}      a dict (keys are str)
    {"l": [node, ...]}           a list (tuples come back as lists)
    {"a": i}                     an array: field i
    {"r": [i, j]}                a ragged sequence: values field i, offsets field j
    {"rs": [i, j]}               a list of str, stored like a ragged sequence of UTF-8 bytes
    {"s": i} / {"b": i}          a str (UTF-8) / bytes: field i (uint8)
    {"v": x}                     a JSON scalar: int, float, bool or None

A list (or tuple) of arrays with one dtype, at least one axis and the same
trailing shape is stored *ragged*: one values buffer (concatenated along axis 0)
and an int64 offsets field of ``len + 1`` entries; it reads back as a
:class:`Ragged` (a sequence of zero-copy views that also exposes values and
offsets for packing). Wrap a list in :class:`Ragged` to make the choice explicit.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from . import dtypes

PATH_SEP = "/"
_SCALARS = (bool, int, float, type(None))


class Ragged(Sequence):
    """A sequence of arrays of different lengths along axis 0, stored as one
    ``values`` buffer and ``offsets`` (``len + 1`` int64; item ``i`` is
    ``values[offsets[i]:offsets[i+1]]``). Indexing gives zero-copy views."""

    __slots__ = ("values", "offsets")

    def __init__(self, items=None, *, values=None, offsets=None):
        if items is not None:
            if values is not None or offsets is not None:
                raise TypeError("Ragged(items) or Ragged(values=..., offsets=...), not both")
            arrays = [leaf_array(x) for x in items]
            if not arrays:
                raise ValueError("Ragged([]) has no dtype; pass values= and offsets= for an empty sequence")
            values, offsets = _concat(arrays, "Ragged")
        if values is None or offsets is None:
            raise TypeError("Ragged needs items, or values= and offsets=")
        self.values = values
        self.offsets = offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"Ragged index {i} out of range for {n} items")
        return self.values[int(self.offsets[i]):int(self.offsets[i + 1])]

    @property
    def lengths(self):
        """Length (along axis 0) of each item: ``offsets[1:] - offsets[:-1]``."""
        return self.offsets[1:] - self.offsets[:-1]

    def padded(self, pad_value=0, length: int | None = None):
        """A new ``[len, length, *tail]`` array of the values' own kind (numpy, torch
        or cupy, same dtype and device), each item left-aligned and padded with
        ``pad_value`` (``length`` defaults to the longest item)."""
        bounds = [int(o) for o in self.offsets.tolist()]
        lengths = [b - a for a, b in zip(bounds, bounds[1:])]
        width = max(lengths, default=0) if length is None else length
        out = _full_like(self.values, (len(lengths), width, *self.values.shape[1:]), pad_value)
        for i, n in enumerate(lengths):
            n = min(n, width)
            out[i, :n] = self.values[bounds[i]:bounds[i] + n]
        return out

    def __repr__(self) -> str:
        return f"Ragged({len(self)} items, values={self.values.dtype}{list(self.values.shape)})"


def _full_like(values, shape: tuple, fill):
    """A new array of ``values``' kind (numpy / torch / cupy), dtype and device, filled with ``fill``."""
    if dtypes.is_torch(values):
        import torch

        return torch.full(shape, fill, dtype=values.dtype, device=values.device)
    if dtypes.is_cupy(values):
        import cupy

        return cupy.full(shape, fill, dtype=values.dtype)
    return np.full(shape, fill, dtype=values.dtype)


def is_array(value) -> bool:
    """A numpy, torch or cupy array (what :func:`map_arrays` maps)."""
    return isinstance(value, np.ndarray) or dtypes.is_torch(value) or dtypes.is_cupy(value)


def leaf_array(value) -> np.ndarray:
    """numpy view of an array-like leaf (numpy, torch CPU, anything np.asarray takes); no copy where possible."""
    if isinstance(value, np.ndarray):
        return value
    if dtypes.is_torch(value):
        return dtypes.torch_as_numpy(value)
    if dtypes.is_cupy(value):
        return value  # copied into the slot by the frame builder (one device-to-host copy)
    return np.asarray(value)


def _concat(arrays: list, where: str) -> tuple[np.ndarray, np.ndarray]:
    first = arrays[0]
    for a in arrays:
        if a.ndim == 0 or a.dtype != first.dtype or a.shape[1:] != first.shape[1:]:
            raise ValueError(f"{where}: items must share dtype and trailing shape and have an axis; got "
                             f"{first.dtype}{list(first.shape)} and {a.dtype}{list(a.shape)}")
    offsets = np.zeros(len(arrays) + 1, np.int64)
    np.cumsum([a.shape[0] for a in arrays], out=offsets[1:])
    return Concat(arrays), offsets


class Concat:
    """Arrays to be written one after another as one field (never concatenated in memory)."""

    __slots__ = ("arrays", "dtype", "shape", "nbytes", "ndim")

    def __init__(self, arrays):
        self.arrays = arrays
        self.dtype = arrays[0].dtype
        self.shape = (sum(a.shape[0] for a in arrays), *arrays[0].shape[1:])
        self.ndim = len(self.shape)
        self.nbytes = sum(a.nbytes for a in arrays)


def _is_arraylike(v) -> bool:
    return isinstance(v, (np.ndarray, np.generic)) or dtypes.is_torch(v) or dtypes.is_cupy(v)


def _raggable(items) -> bool:
    """Arrays of one dtype and trailing shape, each with an axis."""
    if not items or not all(_is_arraylike(x) and getattr(x, "ndim", 0) >= 1 for x in items):
        return False
    first = items[0]
    return all(x.dtype == first.dtype and tuple(x.shape[1:]) == tuple(first.shape[1:]) for x in items)


def is_flat(payload: Mapping) -> bool:
    """Every value an array-like (the v1 layout: one field per key, no tree)."""
    return all(isinstance(k, str) and _is_arraylike(v) for k, v in payload.items())


def flatten(payload: Mapping) -> tuple[list[tuple[str, Any]], bytes]:
    """``(leaves, tree_json)``: leaves are (field name, array-like) in field order."""
    leaves: list[tuple[str, Any]] = []

    def add(path: str, arr) -> int:
        leaves.append((path, arr))
        return len(leaves) - 1

    def node(v, path: str):
        if isinstance(v, Mapping):
            out = {}
            for k, x in v.items():
                if not isinstance(k, str) or not k:
                    raise TypeError(f"payload keys must be non-empty str, got {k!r} at {path or 'the top level'!r}")
                out[k] = node(x, f"{path}{PATH_SEP}{k}" if path else k)
            return {"d": out}
        if isinstance(v, Ragged):
            vals = v.values if isinstance(v.values, Concat) else leaf_array(v.values)
            return {"r": [add(path, vals), add(path + "@offsets", np.asarray(v.offsets, np.int64))]}
        if isinstance(v, str):
            return {"s": add(path, np.frombuffer(v.encode("utf-8"), np.uint8))}
        if isinstance(v, (bytes, bytearray, memoryview)):
            return {"b": add(path, np.frombuffer(v, np.uint8))}
        if isinstance(v, _SCALARS):
            if isinstance(v, float) and not math.isfinite(v):
                return {"v": repr(v), "f": 1}
            return {"v": v}
        if _is_arraylike(v):
            return {"a": add(path, leaf_array(v))}
        if isinstance(v, (list, tuple)):
            if v and all(isinstance(x, str) for x in v):
                vals, offs = _concat([np.frombuffer(x.encode("utf-8"), np.uint8) for x in v], path)
                return {"rs": [add(path, vals), add(path + "@offsets", offs)]}
            arrays = [leaf_array(x) if _is_arraylike(x) else x for x in v]
            if _raggable(arrays):
                vals, offs = _concat(arrays, path)
                return {"r": [add(path, vals), add(path + "@offsets", offs)]}
            return {"l": [node(x, f"{path}{PATH_SEP}{i}") for i, x in enumerate(v)]}
        raise TypeError(
            f"payload value at {path!r} is a {type(v).__name__}; a payload holds arrays (numpy, torch), dicts, "
            f"lists, Ragged, str, bytes and JSON scalars"
        )

    tree = node(payload, "")
    return leaves, json.dumps(tree, separators=(",", ":")).encode("utf-8")


def rebuild(tree_json: bytes, arrays: list, fail) -> dict:
    """The payload's top-level dict from its layout tree and its fields' views.
    ``fail(msg)`` raises the caller's corrupt-frame error."""
    try:
        tree = json.loads(tree_json.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        fail(f"layout tree is not valid UTF-8 JSON ({exc})")
    n = len(arrays)

    def field(i, kind=None):
        if type(i) is not int or not 0 <= i < n:
            fail(f"layout tree names field {i!r}; the frame has {n}")
        a = arrays[i]
        if kind is not None and (a.dtype != kind or a.ndim != 1):
            fail(f"layout tree: field {i} should be 1-d {kind}, is {a.dtype}{list(a.shape)}")
        return a

    def ragged(pair, values_kind=None):
        if not isinstance(pair, list) or len(pair) != 2:
            fail("layout tree: a ragged node needs [values, offsets]")
        vals, offs = field(pair[0], values_kind), field(pair[1], np.dtype(np.int64))
        if len(offs) < 1 or offs[0] != 0 or offs[-1] != len(vals) or (len(offs) > 1 and np.any(np.diff(offs) < 0)):
            fail("layout tree: ragged offsets are not a non-decreasing run from 0 to the values' length")
        return Ragged(values=vals, offsets=offs)

    def node(t, depth):
        if depth > 64 or not isinstance(t, dict) or not t:
            fail("layout tree: malformed node")
        if "d" in t:
            if not isinstance(t["d"], dict):
                fail("layout tree: a dict node must hold an object")
            return {k: node(x, depth + 1) for k, x in t["d"].items()}
        if "l" in t:
            if not isinstance(t["l"], list):
                fail("layout tree: a list node must hold an array")
            return [node(x, depth + 1) for x in t["l"]]
        if "a" in t:
            return field(t["a"])
        if "r" in t:
            return ragged(t["r"])
        if "rs" in t:
            r = ragged(t["rs"], np.dtype(np.uint8))
            return [bytes(x).decode("utf-8", "replace") for x in r]
        if "s" in t:
            return bytes(field(t["s"], np.dtype(np.uint8))).decode("utf-8", "replace")
        if "b" in t:
            return bytes(field(t["b"], np.dtype(np.uint8)))
        if "v" in t:
            v = t["v"]
            if t.get("f") == 1 and v in ("nan", "inf", "-inf"):
                return float(v)
            if not isinstance(v, _SCALARS):
                fail("layout tree: a scalar node must hold a JSON scalar")
            return v
        fail(f"layout tree: unknown node {sorted(t)[:3]}")

    try:
        root = node(tree, 0)
    finally:
        # ``node`` refers to itself through its closure: break that cycle, or it would keep
        # ``arrays`` (views, and so their slot) alive until the garbage collector runs
        node = field = ragged = None  # noqa: F841
    if not isinstance(root, dict):
        fail("layout tree: the root must be a dict")
    return root


def map_arrays(value, fn):
    """``value`` (a rebuilt payload value) with every array (numpy, torch or cupy)
    replaced by ``fn(array)``."""
    if isinstance(value, np.ndarray):  # the common case first: this runs per field per payload
        return fn(value)
    if isinstance(value, dict):
        return {k: fn(v) if type(v) is np.ndarray else map_arrays(v, fn) for k, v in value.items()}
    if isinstance(value, Ragged):
        return Ragged(values=fn(value.values), offsets=fn(value.offsets))
    if isinstance(value, list):
        return [map_arrays(v, fn) for v in value]
    if is_array(value):  # torch / cupy
        return fn(value)
    return value


def copy_array(a):
    """An owned copy of numpy, torch or cupy array ``a`` (same kind, dtype and device)."""
    if dtypes.is_torch(a):
        return a.clone()
    return a.copy()
