"""The decoded payload: a read-only mapping of field name -> array."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Iterator


class Payload(Mapping):
    """A decoded payload frame.

    A read-only mapping of field name to array (zero-copy views into the
    buffer the frame was decoded from), plus :attr:`meta` (the producer's
    JSON-able dict) and :attr:`nbytes` (the frame's encoded length).  A payload
    put as raw bytes has no fields; its bytes are :attr:`raw`, a read-only
    memoryview.

    The views are only as durable as the buffer under them: for a local lease
    that is until the lease is acked or nacked; for a network fetch the
    payload owns its receive buffer and returns it to the pool on
    :meth:`release` (or when garbage collected).  Call :meth:`copy` to keep
    data beyond that.
    """

    __slots__ = ("_fields", "meta", "nbytes", "raw", "_owner", "_on_release", "__weakref__")

    def __init__(
        self,
        fields: dict[str, Any],
        meta: dict,
        nbytes: int,
        raw: memoryview | None = None,
        owner: Any = None,
        on_release: Callable[[], None] | None = None,
    ):
        self._fields = fields
        self.meta = meta
        self.nbytes = nbytes
        self.raw = raw
        self._owner = owner
        self._on_release = on_release

    def __getitem__(self, name: str):
        return self._fields[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def __repr__(self) -> str:
        if self.raw is not None:
            return f"Payload(raw={len(self.raw)} bytes, meta={self.meta!r})"
        parts = ", ".join(f"{k}: {v.dtype}{list(v.shape)}" for k, v in self._fields.items())
        return f"Payload({{{parts}}}, meta={self.meta!r}, nbytes={self.nbytes})"

    @property
    def is_raw(self) -> bool:
        return self.raw is not None

    def copy(self) -> "Payload":
        """Deep copy into fresh memory that outlives the source buffer."""
        if self.raw is not None:
            data = bytes(self.raw)
            return Payload({}, dict(self.meta), self.nbytes, raw=memoryview(data))
        return Payload({k: v.copy() for k, v in self._fields.items()}, dict(self.meta), self.nbytes)

    def release(self) -> None:
        """Give the underlying buffer back (idempotent). Views must not be used afterwards."""
        cb, self._on_release = self._on_release, None
        self._owner = None
        if cb is not None:
            cb()

    def __del__(self):  # pragma: no cover - depends on GC timing
        cb = getattr(self, "_on_release", None)
        if cb is not None:
            try:
                cb()
            except Exception:
                pass
