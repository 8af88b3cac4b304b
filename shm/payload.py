"""The decoded payload: a read-only mapping of field name -> value (zero-copy views)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Iterator

import numpy as np

from . import dtypes, tree
from .errors import PayloadReleasedError


class Payload(Mapping):
    """A decoded payload frame.

    A read-only mapping of field name to value: numpy arrays (zero-copy views
    of the buffer the frame was decoded from; bfloat16/float8 as ml_dtypes),
    and for structured payloads nested dicts and lists, :class:`~shm.tree.Ragged`
    sequences, ``str``, ``bytes`` and JSON scalars. Plus :attr:`meta` (the
    producer's JSON-able dict) and :attr:`nbytes` (the frame's encoded length).
    A payload put as raw bytes has no fields; its bytes are :attr:`raw`, a
    memoryview.

    **View lifetime.** The views keep their memory: a ring slot or receive
    buffer is reused only once no view of it is left (:mod:`shm.views`), so a
    view never shows another payload's bytes, whatever happens to the lease.
    :meth:`release` drops this object's references early (afterwards the
    payload hands out nothing: :class:`~shm.errors.PayloadReleasedError`);
    arrays you kept stay valid and keep their slot until they are gone.
    :meth:`copy` gives owned arrays that hold no slot.
    """

    __slots__ = ("_fields", "meta", "nbytes", "_raw", "_owner", "__weakref__")

    def __init__(self, fields: dict[str, Any], meta: dict, nbytes: int, raw: memoryview | None = None,
                 owner: Any = None):
        self._fields = fields
        self.meta = meta
        self.nbytes = nbytes
        self._raw = raw
        self._owner = owner

    def _live(self) -> dict:
        f = self._fields
        if f is None:
            raise PayloadReleasedError("payload was released; keep the arrays you need, or copy() it first")
        return f

    def __getitem__(self, name: str):
        return self._live()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._live())

    def __len__(self) -> int:
        return len(self._live())

    def __repr__(self) -> str:
        if self._fields is None:
            return f"Payload(released, meta={self.meta!r})"
        if self._raw is not None:
            return f"Payload(raw={len(self._raw)} bytes, meta={self.meta!r})"
        parts = ", ".join(f"{k}: {_describe(v)}" for k, v in self._fields.items())
        return f"Payload({{{parts}}}, meta={self.meta!r}, nbytes={self.nbytes})"

    @property
    def raw(self) -> memoryview | None:
        """The bytes of a raw payload (None for a payload with fields)."""
        self._live()
        return self._raw

    @property
    def is_raw(self) -> bool:
        """Was the payload put as raw bytes (no fields)?"""
        return self._raw is not None

    @property
    def released(self) -> bool:
        """Was :meth:`release` called (the payload hands out nothing more)?"""
        return self._fields is None

    def copy(self) -> "Payload":
        """Deep copy into fresh memory that outlives the source buffer (numpy,
        torch and cupy values alike); the copy holds no slot or receive buffer."""
        fields = self._live()
        if self._raw is not None:
            return Payload({}, dict(self.meta), self.nbytes, raw=memoryview(bytes(self._raw)))
        return Payload(tree.map_arrays(fields, tree.copy_array), dict(self.meta), self.nbytes)

    def as_dict(self, *, torch: bool = False, device: str | None = None) -> dict:
        """The fields as a plain (nested) dict: numpy views, or with ``torch`` zero-copy
        torch tensors (bf16/fp8 included; ``device="cuda"`` copies them to the GPU)."""
        fields = self._live()
        if not torch:
            return dict(fields)
        return tree.map_arrays(fields, dtypes.to_torch if device is None else lambda a: dtypes.to_torch(a, device))

    def to_torch(self, device: str | None = None) -> dict:
        """Shorthand for ``as_dict(torch=True, device=device)``."""
        return self.as_dict(torch=True, device=device)

    def select(self, names) -> "Payload":
        """The same payload restricted to the top-level keys ``names`` (absent ones skipped)."""
        fields = self._live()
        return self.with_values({k: v for k, v in fields.items() if k in set(names)})

    def with_values(self, fields: dict) -> "Payload":
        """A payload with the same meta and memory but these values (e.g. torch tensors of its views)."""
        return Payload(fields, self.meta, self.nbytes, raw=self._raw, owner=self._owner)

    def release(self) -> None:
        """Drop this payload's references to its memory (idempotent). The memory is
        reused once no view of it is left; using the payload afterwards raises."""
        self._fields = None
        self._raw = None
        self._owner = None


def _describe(v) -> str:
    if isinstance(v, np.ndarray) or hasattr(v, "shape") and hasattr(v, "dtype"):
        return f"{v.dtype}{list(v.shape)}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_describe(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return f"list[{len(v)}]"
    return repr(v) if not isinstance(v, (str, bytes)) or len(v) < 40 else f"{type(v).__name__}[{len(v)}]"
