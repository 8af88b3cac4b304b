"""View lifetime: a payload's memory is recycled only when no view of it is left.

Every view a payload hands out (field arrays, ragged values, the raw
memoryview, torch tensors made from them) is derived from one *anchored*
uint8 array. Its base object (the anchor) is kept alive by every derived
view through numpy's base chain (torch's ``from_numpy`` keeps the
array, a ``memoryview`` of an array keeps the array). When the last of them
is gone the anchor is freed and its ``on_gone`` callback runs once: that is
when a ring slot may be reused or a receive buffer go back to its pool.
Zero-copy therefore never means wrong data: a view cannot outlive its bytes.

``on_gone`` runs wherever the last reference is dropped, possibly inside the
garbage collector: it must not block or take a lock that the interrupted code
may hold (see :meth:`shm.state.SlotTable.finalise_soon`).
"""

from __future__ import annotations

import weakref
from typing import Callable

import numpy as np


#: weak reference id -> (weak reference, on_gone): keeps each watching weakref alive
_WATCHED: dict[int, tuple] = {}


def _gone(ref, _watched=_WATCHED) -> None:  # bound early: module globals may be gone at exit
    entry = _watched.pop(id(ref), None)
    if entry is not None:
        entry[1]()


def anchored(buf, *, readonly: bool, on_gone: Callable[[], None] | None = None) -> tuple[np.ndarray, "weakref.ref"]:
    """A 1-D uint8 array over ``buf`` whose every view keeps one anchor alive, and a
    weak reference to that anchor (dead once no view is left). ``on_gone`` runs
    once, when the last view is gone.

    The anchor is the memoryview numpy makes for the new array (its ``base``): fresh
    for each call, referenced only through this array's base chain. A weak reference
    with a callback watches it (about 2 us per payload; ``weakref.finalize`` costs 5x).
    """
    mv = memoryview(buf)  # a new export: nothing but the new array refers to it
    if readonly and not mv.readonly:
        mv = mv.toreadonly()
    u8 = np.frombuffer(mv, np.uint8)
    anchor = u8.base
    if on_gone is None:
        return u8, weakref.ref(anchor)
    ref = weakref.ref(anchor, _gone)
    _WATCHED[id(ref)] = (ref, on_gone)
    return u8, ref
