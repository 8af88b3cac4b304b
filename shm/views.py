"""View lifetime: a payload's memory is recycled only when no view of it is left.

Every view a payload hands out (field arrays, ragged values, the raw
memoryview, torch tensors made from them) is derived from one *anchored*
uint8 array. Its base object is an :class:`Anchor`, which every derived view
keeps alive through numpy's base chain (torch's ``from_numpy`` keeps the
array, a ``memoryview`` of an array keeps the array). When the last of them
is gone the anchor is freed and its ``on_gone`` callback runs once: that is
when a ring slot may be reused or a receive buffer go back to its pool.
Zero-copy therefore never means wrong data: a view cannot outlive its bytes.

``on_gone`` runs wherever the last reference is dropped, possibly inside the
garbage collector: it must not block or take a lock that the interrupted code
may hold (see :meth:`shm.state.SlotTable.finalise_when_free`).
"""

from __future__ import annotations

import weakref
from typing import Callable

import numpy as np


class Anchor:
    """The base object of one payload's views (exports the bytes through the
    numpy array interface and keeps the exporting buffer alive)."""

    __slots__ = ("__array_interface__", "_buf", "__weakref__")

    def __init__(self, u8: np.ndarray):
        self._buf = u8
        self.__array_interface__ = u8.__array_interface__


def anchored(buf, *, readonly: bool, on_gone: Callable[[], None] | None = None) -> tuple[np.ndarray, "weakref.ref"]:
    """A 1-D uint8 array over ``buf`` whose every view keeps one anchor alive, and a
    weak reference to that anchor (dead once no view is left). ``on_gone`` runs
    once, when the last view is gone."""
    u8 = np.frombuffer(buf, np.uint8)
    if readonly and u8.flags.writeable:
        u8 = u8.view()
        u8.flags.writeable = False
    anchor = Anchor(u8)
    arr = np.asarray(anchor)
    if on_gone is not None:
        weakref.finalize(anchor, on_gone)
    return arr, weakref.ref(anchor)
