"""Payload frame: a self-describing, versioned, 64-byte-aligned encoding.

Layout (all integers little-endian)::

    offset 0            FRAME_HEADER (64 bytes)
    offset 64           field data, each field starting on a 64-byte boundary
                        (or, for a raw frame, the raw bytes)
    table_off           n_fields x FIELD_ENTRY (192 bytes each)
    meta_off            metadata, UTF-8 JSON, meta_len bytes
    meta_off+meta_len   layout tree, UTF-8 JSON, tree_len bytes (version 2; absent
                        for a flat payload: see :mod:`shm.tree`)
    total_len           end of frame

A field's element type is recorded by name (:mod:`shm.dtypes`: ``"<f4"``, or
``"bfloat16"`` for the ml_dtypes types). Version 1 frames (no tree, numpy
dtypes only) read as before.

The table and metadata come *after* the data so that a producer can append to
fields in place, in any order, and only write the index once it publishes.

:func:`decode` validates every offset and length against the buffer before
making a view: a corrupt frame raises :class:`~shm.errors.FrameError`, it never
yields an out-of-bounds view.

Why one module past 400 lines: the frame format is defined once, next to its
only encoder and its only validating decoder (header, field table, metadata,
layout tree), so a change to the layout cannot miss one side.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any, Mapping

import numpy as np

from . import dtypes, tree
from .errors import FrameError, PayloadTooLargeError, without_tracebacks
from .payload import Payload
from .views import anchored

# ---------------------------------------------------------------- layout ----
FRAME_MAGIC = b"RPLF"
FRAME_VERSION = 2
#: versions this build reads (1: before dtype names and layout trees)
READ_VERSIONS = (1, 2)
FLAG_RAW = 0x1

#: magic, version, flags, n_fields, meta_len, total_len, table_off, meta_off, raw_len, tree_len
FRAME_HEADER = struct.Struct("<4sHHIIQQQQQ8x")
assert FRAME_HEADER.size == 64

#: offset, nbytes, ndim, dtype_len, name_len, shape[8], dtype, name
FIELD_ENTRY = struct.Struct("<QQBBB5x8Q32s64s8x")
assert FIELD_ENTRY.size == 192

ALIGN = 64
MAX_NDIM = 8
MAX_NAME_BYTES = 64
MAX_DTYPE_BYTES = 32
#: a frame with more fields than this is treated as corrupt
MAX_FIELDS = 4096
_U8 = np.dtype(np.uint8)  # builtin dtypes are singletons: ``is`` is a cheap exact test


def _align(n: int) -> int:
    return (n + ALIGN - 1) & ~(ALIGN - 1)


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name:
        raise TypeError(f"field names must be non-empty str, got {name!r}")
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise ValueError(f"field name {name!r} is longer than {MAX_NAME_BYTES} UTF-8 bytes")


def _as_array(name: str, value: Any):
    """The field's data as something with dtype/shape/nbytes (a numpy array or view,
    a cupy array, or a run of arrays written back to back); no copy is made here."""
    _check_name(name)
    arr = value if isinstance(value, tree.Concat) else tree.leaf_array(value)
    dtypes.check(arr.dtype, name)
    if arr.ndim > MAX_NDIM:
        raise ValueError(f"field {name!r} has {arr.ndim} dimensions; at most {MAX_NDIM} are supported")
    return arr


def _write(dst: np.ndarray, arr) -> None:
    """Copy ``arr`` into the slot view ``dst`` (same dtype and shape): one copy, no temporary."""
    if isinstance(arr, np.ndarray):
        np.copyto(dst, arr, casting="no")
    elif isinstance(arr, tree.Concat):
        pos = 0
        for a in arr.arrays:
            n = a.shape[0]
            _write(dst[pos:pos + n], a)
            pos += n
    else:  # cupy: one device-to-host copy straight into the slot
        import cupy

        cupy.ascontiguousarray(arr).get(out=dst)


def _encode_meta(meta: Mapping | None) -> bytes:
    """JSON of ``meta``; what a reader could not decode (not a mapping, not
    JSON-able) is refused here, before anything is published."""
    if meta is None:
        return b""
    if not isinstance(meta, Mapping):
        raise TypeError(f"meta must be a dict (a JSON object), got {type(meta).__name__}: {meta!r:.100}")
    if not meta:
        return b""
    try:
        return json.dumps(meta, separators=(",", ":"), allow_nan=True).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise TypeError(f"meta must be a JSON-serialisable dict: {exc}") from None


class _Field:
    __slots__ = ("dtype", "tail", "chunks", "rows")

    def __init__(self, dtype: np.dtype, tail: tuple[int, ...]):
        self.dtype = dtype
        self.tail = tail  # shape without axis 0 (or the full shape for a set() field)
        self.chunks: list[tuple[int, int]] = []  # (offset, nbytes)
        self.rows: int | None = 0  # None: a set() field whose shape is ``tail``

    @property
    def nbytes(self) -> int:
        return sum(n for _, n in self.chunks)


class FrameBuilder:
    """Writes a frame in place into a writable buffer, field by field.

    ``set`` writes a whole field once; ``append`` extends a field along axis 0.
    Appends to the field written last extend it contiguously; a field whose
    appends were interleaved with other fields is gathered once, at
    :meth:`finish` (one pass, O(total bytes): never quadratic).  Nothing is
    staged outside the buffer.
    """

    def __init__(self, buf):
        self._mv = memoryview(buf).cast("B")
        if self._mv.readonly:
            raise TypeError("FrameBuilder needs a writable buffer")
        self._cap = len(self._mv)
        self._u8 = np.frombuffer(self._mv, dtype=np.uint8)
        self._cursor = FRAME_HEADER.size
        self._fields: dict[str, _Field] = {}
        self._raw_len: int | None = None
        self._last: str | None = None

    # -------------------------------------------------------------- writes --
    def _check_new_field(self, name: str) -> None:
        if name not in self._fields and len(self._fields) >= MAX_FIELDS:
            raise ValueError(f"a payload has at most {MAX_FIELDS} fields (readers refuse more); "
                             f"field {name!r} would be number {len(self._fields) + 1}")

    def _alloc(self, nbytes: int, what: str) -> int:
        off = _align(self._cursor)
        if off + nbytes > self._cap:
            raise PayloadTooLargeError(off + nbytes, self._cap, what)
        self._cursor = off + nbytes
        return off

    def _view(self, off: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        count = math.prod(shape)
        return np.frombuffer(self._mv, dtype=dtype, count=count, offset=off).reshape(shape)

    def set(self, name: str, value: Any) -> None:
        """Write a whole field (any shape, 0-d included)."""
        arr = _as_array(name, value)
        if self._raw_len is not None:
            raise TypeError("a raw-bytes frame has no named fields")
        self._check_new_field(name)
        off = self._alloc(arr.nbytes, f"field {name!r}")
        _write(self._view(off, arr.dtype, arr.shape), arr)
        f = _Field(arr.dtype, arr.shape)
        f.rows = None
        f.chunks.append((off, arr.nbytes))
        self._fields[name] = f
        self._last = name

    def append(self, name: str, value: Any) -> None:
        """Extend field ``name`` along axis 0 (created on first append)."""
        arr = _as_array(name, value)
        if self._raw_len is not None:
            raise TypeError("a raw-bytes frame has no named fields")
        if arr.ndim == 0:
            raise ValueError(f"append to {name!r} needs an array with at least one axis; use set() for scalars")
        self._check_new_field(name)
        f = self._fields.get(name)
        if f is None:
            f = self._fields[name] = _Field(arr.dtype, arr.shape[1:])
        elif f.rows is None:
            raise TypeError(f"field {name!r} was written with set(); it cannot be appended to")
        elif arr.dtype != f.dtype or arr.shape[1:] != f.tail:
            raise ValueError(
                f"append to {name!r}: got {arr.dtype}{list(arr.shape)}, field is "
                f"{f.dtype}[n, {', '.join(map(str, f.tail))}]" if f.tail else
                f"append to {name!r}: got {arr.dtype}{list(arr.shape)}, field is {f.dtype}[n]"
            )
        if arr.nbytes == 0:
            f.rows += arr.shape[0]
            self._last = name
            return
        if self._last == name and f.chunks and sum(f.chunks[-1]) == self._cursor:
            off = self._cursor  # contiguous extension of the last chunk
            if off + arr.nbytes > self._cap:
                raise PayloadTooLargeError(off + arr.nbytes, self._cap, f"field {name!r}")
            self._cursor = off + arr.nbytes
            last_off, last_n = f.chunks[-1]
            f.chunks[-1] = (last_off, last_n + arr.nbytes)
        else:
            off = self._alloc(arr.nbytes, f"field {name!r}")
            f.chunks.append((off, arr.nbytes))
        _write(self._view(off, arr.dtype, arr.shape), arr)
        f.rows += arr.shape[0]
        self._last = name

    def set_raw(self, data) -> None:
        """Make this a raw frame holding ``data`` (any bytes-like object)."""
        if self._fields or self._raw_len is not None:
            raise TypeError("a raw frame holds exactly one bytes payload and no fields")
        src = memoryview(data).cast("B")
        off = self._alloc(len(src), "raw payload")
        self._mv[off : off + len(src)] = src
        self._raw_len = len(src)

    @property
    def bytes_used(self) -> int:
        return self._cursor

    # -------------------------------------------------------------- finish --
    def finish(self, meta: Mapping | None = None, *, layout: bytes = b"") -> int:
        """Write the index (field table, metadata, layout tree, header). Returns the frame length."""
        meta_b = _encode_meta(meta)
        entries = []
        for name, f in self._fields.items():
            if len(f.chunks) > 1:  # interleaved appends: gather once
                total = f.nbytes
                dst = self._alloc(total, f"field {name!r} (gathered)")
                pos = dst
                for off, n in f.chunks:
                    self._u8[pos : pos + n] = self._u8[off : off + n]
                    pos += n
                f.chunks = [(dst, total)]
            off = f.chunks[0][0] if f.chunks else _align(self._cursor)
            shape = f.tail if f.rows is None else (f.rows, *f.tail)
            entries.append((name, f.dtype, shape, off, f.nbytes))
        table_off = _align(self._cursor)
        meta_off = table_off + FIELD_ENTRY.size * len(entries)
        total = meta_off + len(meta_b) + len(layout)
        if total > self._cap:
            raise PayloadTooLargeError(total, self._cap, "frame (data + index)")
        for i, (name, dtype, shape, off, nbytes) in enumerate(entries):
            dt = dtypes.encode_name(dtype).encode("ascii")
            nm = name.encode("utf-8")
            padded = tuple(shape) + (0,) * (MAX_NDIM - len(shape))
            FIELD_ENTRY.pack_into(
                self._mv, table_off + i * FIELD_ENTRY.size,
                off, nbytes, len(shape), len(dt), len(nm), *padded, dt, nm,
            )
        self._mv[meta_off:meta_off + len(meta_b)] = meta_b
        self._mv[meta_off + len(meta_b):total] = layout
        flags = FLAG_RAW if self._raw_len is not None else 0
        FRAME_HEADER.pack_into(
            self._mv, 0, FRAME_MAGIC, FRAME_VERSION, flags, len(entries), len(meta_b),
            total, table_off, meta_off, self._raw_len or 0, len(layout),
        )
        return total


class Prepared:
    """A payload made ready to encode (torch tensors viewed as numpy, structure
    flattened) once, so that sizing it and writing it do not repeat the work."""

    __slots__ = ("items", "layout", "raw")

    def __init__(self, items: list, layout: bytes = b"", raw: memoryview | None = None):
        self.items = items  # (field name, array-like)
        self.layout = layout
        self.raw = raw


def prepare(payload: Any) -> Prepared:
    """Validate and normalise ``payload`` (mapping, or bytes-like) for :func:`encode_into`."""
    if isinstance(payload, Prepared):
        return payload
    if isinstance(payload, Mapping):
        if tree.is_flat(payload):
            return Prepared([(name, _as_array(name, v)) for name, v in payload.items()])
        leaves, layout = tree.flatten(payload)
        names = _field_names(leaves)
        return Prepared([(name, _as_array(name, v)) for name, (_, v) in zip(names, leaves)], layout)
    try:
        return Prepared([], raw=memoryview(payload).cast("B"))
    except TypeError:
        raise TypeError(
            f"payload must be a mapping of name -> array (or a nested dict/list of arrays, str, scalars) or a "
            f"bytes-like object, not {type(payload).__name__}"
        ) from None


def encode_into(buf, payload: Any, meta: Mapping | None = None) -> int:
    """Encode ``payload`` (mapping name -> array, structured payload, bytes-like, or
    :class:`Prepared`) into ``buf``. Returns the frame length. Raises
    :class:`PayloadTooLargeError` if it does not fit, ``TypeError``/``ValueError``
    for unsupported input."""
    p = prepare(payload)
    b = FrameBuilder(buf)
    if p.raw is not None:
        b.set_raw(p.raw)
        return b.finish(meta)
    for name, value in p.items:
        b.set(name, value)
    return b.finish(meta, layout=p.layout)


def _field_names(leaves: list) -> list[str]:
    """Key paths as field names; one that is too long or taken becomes ``#<index>``
    (names are for people: the layout tree refers to fields by position)."""
    names, seen = [], set()
    for i, (path, _) in enumerate(leaves):
        if len(path.encode("utf-8")) > MAX_NAME_BYTES or path in seen:
            path = f"#{i}"
        seen.add(path)
        names.append(path)
    return names


def encoded_size(payload: Any, meta: Mapping | None = None) -> int:
    """Upper bound of the frame length of ``payload`` (exact for ``encode_into``)."""
    p = prepare(payload)
    n = FRAME_HEADER.size
    if p.raw is not None:
        return _align(_align(n) + p.raw.nbytes) + len(_encode_meta(meta))
    for _, v in p.items:
        n = _align(n) + v.nbytes
    return _align(n) + FIELD_ENTRY.size * len(p.items) + len(p.layout) + len(_encode_meta(meta))


# --------------------------------------------------------------- decode ----
class FrameIndex:
    """The parsed, validated index of a frame (no views made yet)."""

    __slots__ = ("total_len", "raw", "fields", "meta", "layout")

    def __init__(self, total_len, raw, fields, meta, layout=b""):
        self.total_len = total_len
        self.raw = raw  # (offset, length) for a raw frame, else None
        self.fields = fields  # list of (name, dtype, shape, offset, nbytes)
        self.meta = meta
        self.layout = layout  # the layout tree's JSON (b"" for a flat payload)


def _fail(msg: str):
    raise FrameError(f"corrupt payload frame: {msg}")


def parse_header(head) -> tuple[int, int, int, int, int, int, int, int]:
    """Validate the 64-byte header; return
    (flags, n_fields, meta_len, total, table_off, meta_off, raw_len, tree_len)."""
    if len(head) < FRAME_HEADER.size:
        _fail(f"{len(head)} bytes is shorter than the {FRAME_HEADER.size}-byte header")
    magic, version, flags, n, meta_len, total, table_off, meta_off, raw_len, tree_len = \
        FRAME_HEADER.unpack_from(head, 0)
    if magic != FRAME_MAGIC:
        _fail(f"bad magic {magic!r} (expected {FRAME_MAGIC!r}); not a payload frame")
    if version not in READ_VERSIONS:
        _fail(f"frame version {version} is not supported (this build reads versions "
              f"{', '.join(map(str, READ_VERSIONS))}); upgrade the reader")
    if version == 1:
        tree_len = 0  # bytes reserved in version 1
    if flags & ~FLAG_RAW:
        _fail(f"unknown flags 0x{flags:x}")
    if n > MAX_FIELDS:
        _fail(f"{n} fields exceeds the limit of {MAX_FIELDS}")
    return flags, n, meta_len, total, table_off, meta_off, raw_len, tree_len


def parse_index(buf, length: int | None = None, *, tail=None) -> FrameIndex:
    """Parse and validate a frame's index from host memory.

    ``buf`` holds at least the 64-byte header; ``length`` is the number of
    valid frame bytes (defaults to ``len(buf)``) and every offset is checked
    against it. When the frame body lives elsewhere (device memory), pass
    ``tail``: a host copy of bytes ``[table_off, total_len)`` (field table and
    metadata); see :func:`index_tail_range`.
    """
    if isinstance(buf, np.ndarray) and buf.dtype is _U8 and buf.ndim == 1:
        mv = buf  # struct and slicing read a uint8 array directly (no memoryview round trip)
    else:
        mv = memoryview(buf).cast("B") if not isinstance(buf, memoryview) or buf.format != "B" else buf
    size = len(mv) if length is None else length
    if tail is None and size > len(mv):
        _fail(f"declared length {size} exceeds the buffer ({len(mv)} bytes)")
    flags, n, meta_len, total, table_off, meta_off, raw_len, tree_len = parse_header(mv)
    if total > size:
        _fail(f"frame claims {total} bytes but only {size} are present (truncated?)")
    if total < FRAME_HEADER.size:
        _fail(f"frame length {total} is shorter than its header")
    if not (FRAME_HEADER.size <= table_off <= total) or table_off % ALIGN:
        _fail(f"field table offset {table_off} out of range or unaligned")
    if meta_off != table_off + n * FIELD_ENTRY.size or meta_off + meta_len + tree_len != total:
        _fail("field table / metadata offsets are inconsistent with the frame length")
    if tail is None:
        tab, base = mv, 0
    else:
        tab, base = memoryview(tail).cast("B"), table_off
        if len(tab) < total - table_off:
            _fail("index tail shorter than the field table and metadata")
    meta: dict = {}  # a fresh dict per payload: a reader may modify its meta
    if meta_len:
        try:
            meta = json.loads(bytes(tab[meta_off - base : meta_off - base + meta_len]).decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            _fail(f"metadata is not valid UTF-8 JSON ({exc})")
        if not isinstance(meta, dict):
            _fail("metadata is not a JSON object")
    layout = b""
    if tree_len:
        lo = meta_off + meta_len - base
        layout = bytes(tab[lo:lo + tree_len])
    if flags & FLAG_RAW:
        if n or tree_len:
            _fail("a raw frame must not have fields or a layout tree")
        if FRAME_HEADER.size + raw_len > table_off:
            _fail(f"raw length {raw_len} overruns the data area")
        return FrameIndex(total, (FRAME_HEADER.size, raw_len), None, meta)
    if raw_len:
        _fail("a frame with fields must have raw length 0")
    # Batches carry many frames with the same field table (names, dtypes, shapes,
    # offsets): a table already validated at the same table offset is not parsed again.
    key = (bytes(tab[table_off - base : meta_off - base]), table_off)
    fields = _TABLES.get(key)
    if fields is None:
        fields = _parse_fields(tab, table_off - base, n, table_off)
        if len(_TABLES) >= _TABLES_MAX:
            _TABLES.clear()
        _TABLES[key] = fields
    return FrameIndex(total, None, fields, meta, layout)


#: validated field tables: (table bytes, table offset) -> fields (bounded; cleared when full)
_TABLES: dict = {}
_TABLES_MAX = 4096


def _parse_fields(tab, start: int, n: int, table_off: int) -> tuple:
    fields = []
    seen = set()
    for i in range(n):
        (off, nbytes, ndim, dlen, nlen, *rest) = FIELD_ENTRY.unpack_from(tab, start + i * FIELD_ENTRY.size)
        shape, dt_b, nm_b = rest[:MAX_NDIM], rest[MAX_NDIM], rest[MAX_NDIM + 1]
        if ndim > MAX_NDIM or dlen > MAX_DTYPE_BYTES or not nlen or nlen > MAX_NAME_BYTES:
            _fail(f"field {i}: bad ndim/dtype/name lengths")
        try:
            name = nm_b[:nlen].decode("utf-8")
            dtype = dtypes.decode_name(dt_b[:dlen])
        except (UnicodeDecodeError, TypeError, ValueError):
            _fail(f"field {i}: undecodable name or dtype {bytes(dt_b[:dlen])!r}")
        if not dtypes.is_supported(dtype):
            _fail(f"field {name!r}: dtype {dtype} is not a field type")
        if name in seen:
            _fail(f"duplicate field name {name!r}")
        seen.add(name)
        shape = tuple(shape[:ndim])
        if math.prod(shape) * dtype.itemsize != nbytes:
            _fail(f"field {name!r}: shape {shape} x {dtype} != {nbytes} bytes")
        if nbytes and (off % ALIGN or off < FRAME_HEADER.size or off + nbytes > table_off):
            _fail(f"field {name!r}: data [{off}, {off + nbytes}) outside the data area or unaligned")
        fields.append((name, dtype, shape, off, nbytes))
    return tuple(fields)


def index_tail_range(head) -> tuple[int, int]:
    """(table_off, total_len) from a frame's 64-byte header: the byte range a
    device-memory receiver copies to host to parse the index."""
    _, _, _, total, table_off, _, _, _ = parse_header(head)
    return table_off, total


def decode(buf, length: int | None = None, *, on_gone=None, readonly: bool = True) -> Payload:
    """Decode a frame from host memory into a :class:`Payload` of zero-copy views.

    Raises :class:`FrameError` if anything in the frame is inconsistent with
    the buffer. Every view is anchored (:mod:`shm.views`): ``on_gone`` runs
    once, when the payload and every view taken from it are gone. A uint8
    numpy array ``buf`` without ``on_gone`` is used as it is (a slice of an
    anchored array is anchored already).
    """
    if isinstance(buf, np.ndarray) and on_gone is None:
        u8 = buf if buf.dtype is _U8 and buf.ndim == 1 else buf.reshape(-1).view(np.uint8)
        if readonly and u8.flags.writeable:
            u8 = u8.view()
            u8.flags.writeable = False
    else:
        u8, _ = anchored(buf, readonly=readonly, on_gone=on_gone)
    return payload_from(parse_index(u8, length), u8)


def payload_from(index: FrameIndex, u8: np.ndarray) -> Payload:
    """The payload of a parsed ``index`` over its frame bytes ``u8`` (a 1-D uint8 array)."""
    if index.raw is not None:
        off, n = index.raw
        return Payload({}, index.meta, index.total_len, raw=memoryview(u8[off:off + n]))
    return Payload(_values(index, u8), index.meta, index.total_len)


def _values(index: FrameIndex, data) -> dict:
    """The payload's top-level values: a view of ``data`` per field, rebuilt through the
    layout tree when the frame has one."""
    arrays = [data[off:off + nbytes].view(dtype).reshape(shape) for _, dtype, shape, off, nbytes in index.fields]
    if index.layout:
        return tree.rebuild(index.layout, arrays, _fail)
    return {f[0]: a for f, a in zip(index.fields, arrays)}


def decode_views(index: FrameIndex, data, *, owner: Any = None) -> Payload:
    """Make views for a parsed ``index`` on ``data``, a 1-D uint8 array of any
    array library with numpy-style slicing and ``.view`` (numpy, cupy, torch
    via ``.view(dtype)``). Used for device-memory receive buffers; ``owner`` is
    kept alive by the payload (device views are not anchored: see docs/RING.md)."""
    if index.raw is not None:
        off, n = index.raw
        return Payload({}, index.meta, index.total_len, raw=data[off : off + n], owner=(owner, data))
    return Payload(_values(index, data), index.meta, index.total_len, owner=(owner, data))



# ---------------------------------------------------------- batch decode ----
#: FRAME_HEADER and FIELD_ENTRY read as little-endian 64-bit words (a batch's headers and
#: tables are checked as arrays of them): the header's word 0 is magic, version and flags,
#: word 1 n_fields and meta_len, then total_len, table_off, meta_off, raw_len, tree_len
_WORD = np.dtype("<u8")
_HEADER_WORDS = FRAME_HEADER.size // 8
_ENTRY_WORDS = FIELD_ENTRY.size // 8
#: word 0 of a flat version-2 frame's header (flags 0)
_FLAT_V2 = int.from_bytes(FRAME_MAGIC + FRAME_VERSION.to_bytes(2, "little") + bytes(2), "little")
#: an entry's words: 0 offset, 1 nbytes, 2 ndim/dtype_len/name_len, 3..10 shape, 11..22 dtype
#: and name (23: padding); all but offset, nbytes and shape must match across a batch
_ENTRY_SIGNATURE = np.r_[2, 11:_ENTRY_WORDS]


def _words(u8: np.ndarray, starts: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` 64-bit words at each of ``starts`` (byte offsets into ``u8``): (len, n)."""
    if not (starts % 8).any():
        return u8[:len(u8) - len(u8) % 8].view(_WORD)[(starts // 8)[:, None] + np.arange(n)]
    return u8[starts[:, None] + np.arange(n * 8)].view(_WORD)


#: batches of fewer frames are decoded frame by frame: below about 16 frames of 3 fields that is
#: faster than comparing identical layouts as arrays (2-core box: 4 frames 17 vs 46 us, 16 frames
#: 66 vs 68 us, 32 frames 131 vs 88 us, 64 frames 269 vs 128 us), and below about 40 faster
#: than the general array checks of ragged layouts (32 frames 230-290 vs 280-360 us)
DECODE_MANY_MIN = 16
RAGGED_MANY_MIN = 40


def decode_many(u8: np.ndarray, starts, lengths) -> list:
    """Decode the frames at ``starts`` of one 1-D uint8 array ``u8`` (item ``i`` has
    ``lengths[i]`` valid bytes): per item a :class:`Payload` of views of ``u8``, or the
    :class:`FrameError` that :func:`decode` of it alone raises (without its traceback,
    which would reference the memory).

    The same results as decoding item by item, with the per-item Python work cut to
    making the views: the headers of the batch are validated together as arrays, and
    so are the field tables of the items whose fields have the same names and dtypes
    as the first one's (shapes and sizes may differ: ragged rollouts). Every other
    item (raw, version 1, another field set, anything that fails a check) goes
    through :func:`parse_index` alone, which also words its error."""
    if len(starts) < DECODE_MANY_MIN:  # the array checks cost ~40 us however few the frames
        return [_decode_one(u8, int(s), int(n)) for s, n in zip(starts, lengths)]
    starts = np.asarray(starts, np.int64)
    lengths = np.asarray(lengths, np.int64)
    out: list = [None] * len(starts)
    inside = (lengths >= FRAME_HEADER.size) & (lengths <= len(u8)) & (starts >= 0) & (starts <= len(u8) - lengths)
    group = _uniform_group(u8, starts, lengths) if inside.all() else None
    if group is None and len(starts) >= RAGGED_MANY_MIN:
        group = _batch_group(u8, starts, lengths, np.flatnonzero(inside))
    if group is not None:
        try:
            _views_of_group(u8, starts, group, out)
        except _UNDECODABLE:  # a frame the checks let through fails to view: each one alone says which
            out = [None] * len(starts)
    for i in range(len(out)):
        if out[i] is None:
            out[i] = _decode_one(u8, int(starts[i]), int(lengths[i]))
    return out


#: what decoding a damaged frame may raise besides FrameError (a shape numpy cannot make, a
#: JSON tree nested too deep): for a batch, that frame's result, never the whole batch's failure
_UNDECODABLE = (FrameError, ValueError, OverflowError, RecursionError, IndexError)


def _decode_one(u8: np.ndarray, start: int, length: int):
    if start < 0 or length < 0 or start + length > len(u8):
        return FrameError(f"corrupt payload frame: [{start}, {start + length}) is outside the "
                          f"{len(u8)}-byte buffer")
    frame = u8[start:start + length]
    try:
        return payload_from(parse_index(frame), frame)
    except _UNDECODABLE as exc:
        err = exc if isinstance(exc, FrameError) else FrameError(f"corrupt payload frame: {type(exc).__name__}: {exc}")
        return without_tracebacks(err)


def _uniform_group(u8, starts, lengths):
    """The usual batch: every frame (all inside ``u8``) has the first one's header and
    field table byte for byte (the same fields and shapes) and no metadata or layout
    tree. Then :func:`parse_index` of the first frame alone validates them all, since
    it reads nothing else of a frame but its length, checked here too. The group of
    all items (as :func:`_batch_group` gives it), or None: the general checks decide."""
    s0, n0 = int(starts[0]), int(lengths[0])
    h = _words(u8, starts, _HEADER_WORDS)
    head = h[0]
    if head[0] != _FLAT_V2 or int(head[1]) >> 32 or head[6] or not (h == head).all() or (lengths < head[2]).any():
        return None  # (a raw or version-1 frame, metadata, a layout tree, a header that differs, a short frame)
    try:
        index = parse_index(u8[s0:s0 + n0])
    except FrameError:
        return None  # the first frame alone words its error; the others the same one
    table_off, n_fields = int(head[3]), len(index.fields)
    ent = _words(u8, starts + table_off, n_fields * _ENTRY_WORDS)
    if not (ent == ent[0]).all():
        return None
    return np.arange(len(starts)), h, ent.reshape(len(starts), n_fields, _ENTRY_WORDS), index.fields, True


def _batch_group(u8, starts, lengths, cand):
    """The items of ``cand`` that can be validated together: (items, header words,
    entry words, fields of the first) or None. Every check :func:`parse_index` makes
    of a flat version-2 frame is made here, as array comparisons."""
    if not len(cand):
        return None
    h = _words(u8, starts[cand], _HEADER_WORDS)
    nf, meta_len = h[:, 1] & 0xFFFFFFFF, h[:, 1] >> 32
    total, table_off, meta_off, tree_len = h[:, 2], h[:, 3], h[:, 4], h[:, 6]
    ok = ((h[:, 0] == _FLAT_V2) & (h[:, 5] == 0) & (nf >= 1) & (nf <= MAX_FIELDS) & (total >= FRAME_HEADER.size)
          & (total <= lengths[cand].astype(_WORD)) & (table_off >= FRAME_HEADER.size) & (table_off <= total)
          & (table_off % ALIGN == 0) & (meta_off <= total) & (meta_len <= total) & (tree_len <= total)
          & (meta_off == table_off + nf * FIELD_ENTRY.size) & (meta_off + meta_len + tree_len == total))
    # (every term of the two sums is bounded by ``total``, itself by the buffer: they cannot wrap)
    first = np.flatnonzero(ok)
    if not len(first):
        return None
    n_fields = int(nf[first[0]])
    sel = np.flatnonzero(ok & (nf == n_fields))
    items, h = cand[sel], h[sel]
    ent = _words(u8, starts[items] + h[:, 3].astype(np.int64), n_fields * _ENTRY_WORDS).reshape(
        len(items), n_fields, _ENTRY_WORDS)
    try:
        fields = _parse_fields(ent[0].tobytes(), 0, n_fields, int(h[0, 3]))
    except FrameError:
        return None  # the first item alone words its error; the others too
    sig = ent[:, :, _ENTRY_SIGNATURE]
    same = (sig == sig[0]).all(axis=(1, 2))
    off, nbytes, to = ent[:, :, 0], ent[:, :, 1], h[:, 3:4]
    ndim = np.array([len(f[2]) for f in fields])
    dims = np.where(np.arange(MAX_NDIM) < ndim[:, None], ent[:, :, 3:3 + MAX_NDIM], 1).astype(np.float64)
    itemsize = np.array([f[1].itemsize for f in fields], np.float64)
    same &= (dims.prod(axis=2) * itemsize == nbytes.astype(np.float64)).all(axis=1)
    placed = (nbytes == 0) | ((off % ALIGN == 0) & (off >= FRAME_HEADER.size) & (off <= to) & (nbytes <= to)
                              & (off + nbytes <= to))
    same &= placed.all(axis=1)
    keep = np.flatnonzero(same)
    return items[keep], h[keep], ent[keep], fields, False


def _views_of_group(u8, starts, group, out: list) -> None:
    items, h, ent, fields, identical = group
    base = starts[items]
    flats: dict = {}
    columns = []  # per field: each item's view of it
    if identical:  # every item's field j at the same place in its frame: item i's frame starts
        s0 = int(base.min())  # at s0 + rows[i] * step, so a field of all items is one strided array
        rel = base - s0
        step = int(np.gcd.reduce(rel)) or 1
        rows = (rel // step).tolist()
        span = max(rows) + 1
    for j, (_, dtype, shape0, off0, nbytes0) in enumerate(fields):
        size = dtype.itemsize
        if identical and nbytes0 and (s0 + off0) % size == 0 and step % size == 0:
            strides, acc = [], size  # (aligned, like the flat views below; an empty field may sit anywhere)
            for d in reversed(shape0):
                strides.append(acc)
                acc *= d
            grid = np.ndarray((span, *shape0), dtype, buffer=u8, offset=s0 + off0, strides=(step, *strides[::-1]))
            columns.append([grid[r] for r in rows] if shape0 else [grid[r, ...] for r in rows])  # (0-d: a view)
            continue
        pos = base + ent[:, j, 0].astype(np.int64)
        count = (ent[:, j, 1] // size).astype(np.int64)
        if (pos % size).any():  # not on an element boundary of u8: a dtype view per item
            col = [u8[p:p + c * size].view(dtype) for p, c in zip(pos.tolist(), count.tolist())]
        else:  # one view of u8 as this dtype; an item's field is a slice of it
            flat = flats.get(dtype)
            if flat is None:
                flat = flats[dtype] = u8[:len(u8) - len(u8) % size].view(dtype)
            first = pos // size
            col = [flat[p:e] for p, e in zip(first.tolist(), (first + count).tolist())]
        if len(shape0) != 1:
            col = [a.reshape(sh) for a, sh in zip(col, map(tuple, ent[:, j, 3:3 + len(shape0)].tolist()))]
        columns.append(col)
    names = [f[0] for f in fields]
    totals = h[:, 2].tolist()
    meta_len, tree_len = h[:, 1] >> 32, h[:, 6]
    if not (meta_len.any() or tree_len.any()):
        if len(names) == 1:
            name = names[0]
            for i, a, total in zip(items.tolist(), columns[0], totals):
                out[i] = Payload({name: a}, {}, total)
        else:
            for i, arrays, total in zip(items.tolist(), zip(*columns), totals):
                out[i] = Payload(dict(zip(names, arrays)), {}, total)
        return
    meta_at = (base + h[:, 4].astype(np.int64)).tolist()
    for i, arrays, total, at, m, t in zip(items.tolist(), zip(*columns), totals, meta_at, meta_len.tolist(),
                                          tree_len.tolist()):
        try:
            meta, layout = _meta_and_tree(u8, at, m, t)
            values = tree.rebuild(layout, list(arrays), _fail) if layout else dict(zip(names, arrays))
        except FrameError:
            continue  # decoded alone, for its error
        out[i] = Payload(values, meta, total)


def _meta_and_tree(u8, at: int, meta_len: int, tree_len: int) -> tuple[dict, bytes]:
    meta: dict = {}
    if meta_len:
        try:
            meta = json.loads(u8[at:at + meta_len].tobytes().decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            _fail(f"metadata is not valid UTF-8 JSON ({exc})")
        if not isinstance(meta, dict):
            _fail("metadata is not a JSON object")
    return meta, u8[at + meta_len:at + meta_len + tree_len].tobytes() if tree_len else b""


# ------------------------------------------------------------ projection ----
def _projection(index: FrameIndex, names) -> tuple[list, bytes]:
    """The fields (name, dtype, shape, offset, nbytes) and layout tree of ``index``'s
    frame restricted to the top-level keys ``names`` (absent names are skipped)."""
    wanted = set(names)
    if not index.layout:
        return [f for f in index.fields if f[0] in wanted], b""
    import json

    root = json.loads(index.layout.decode("utf-8"))["d"]
    keep: list = []
    renum: dict[int, int] = {}

    def new(i: int) -> int:
        if i not in renum:
            renum[i] = len(keep)
            keep.append(index.fields[i])
        return renum[i]

    def walk(t):
        if "d" in t:
            return {"d": {k: walk(x) for k, x in t["d"].items()}}
        if "l" in t:
            return {"l": [walk(x) for x in t["l"]]}
        for kind in ("a", "s", "b"):
            if kind in t:
                return {kind: new(t[kind])}
        for kind in ("r", "rs"):
            if kind in t:
                return {kind: [new(t[kind][0]), new(t[kind][1])]}
        return t  # a scalar

    tree_ = {"d": {k: walk(v) for k, v in root.items() if k in wanted}}
    return keep, json.dumps(tree_, separators=(",", ":")).encode("utf-8")


def projected_size(index: FrameIndex, names) -> int:
    """Length of the frame :func:`project_into` writes (a raw frame is sent whole)."""
    if index.raw is not None:
        return index.total_len
    fields, layout = _projection(index, names)
    n = FRAME_HEADER.size
    for f in fields:
        n = _align(n) + f[4]
    return _align(n) + FIELD_ENTRY.size * len(fields) + len(_encode_meta(index.meta)) + len(layout)


def project_into(out, frame: np.ndarray, index: FrameIndex, names) -> int:
    """Write into ``out`` the frame of ``frame`` (uint8, parsed as ``index``) with only
    the top-level keys ``names``: one copy of the selected bytes. Returns its length."""
    if index.raw is not None:
        n = index.total_len
        np.copyto(np.frombuffer(out, np.uint8, count=n), frame[:n])
        return n
    fields, layout = _projection(index, names)
    b = FrameBuilder(out)
    for name, dtype, shape, off, nbytes in fields:
        b.set(name, frame[off:off + nbytes].view(dtype).reshape(shape))
    return b.finish(index.meta, layout=layout)
