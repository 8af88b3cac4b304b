"""Holding one slot, or a batch of them: a writer filling a FREE slot in place, a
reader's lease on a READY payload, and the server's array-backed batch of leases.

Each finalises through the ring's one state machine (:mod:`shm.state`), exactly
once: a writer publishes or aborts, a lease acks or nacks (a view of its payload
that is still alive keeps the slot PINNED, see :mod:`shm.views`). The ring
(:mod:`shm.ring`) hands these out; they reach back into it only for its slot
table and its mapping.

Why one module past 400 lines: the three holders share one rule (finalise exactly
once, and never under a live view), and keeping them side by side is how a change
to that rule reaches all three.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Mapping

import numpy as np

from . import _sync
from .errors import ForkedHandleError, FrameError, RingError
from .frame import FrameBuilder, decode_many, parse_index, payload_from
from .layout import SLOT_HEADROOM
from .payload import Payload
from .ref import SlotRef
from .state import DEAD, LOCK_TIMEOUT_S
from .views import anchored

if TYPE_CHECKING:
    from .ring import RingBuffer

log = logging.getLogger("shm.ring")


def _refuse_in_fork(holder, what: str) -> None:
    """A writer, lease or batch used by a fork of the process that took it: refused."""
    if holder._pid != _sync.pid:
        raise ForkedHandleError(f"{what}: this {type(holder).__name__} belongs to process {holder._pid}, and this "
                                f"process ({_sync.pid}) is a fork of it: it cannot finalise or write its parent's "
                                f"slots (the parent does); claim or reserve slots of your own here")


class SlotWriter:
    """A slot held in WRITING by this process; write in place, then publish.

    As a context manager: leaving the block without :meth:`publish`, or by an
    exception, aborts (the slot goes back to FREE, nothing is published).
    """

    def __init__(self, ring: RingBuffer, slot: int, lease: int):
        self._ring = ring
        self.slot = slot
        self._lease = lease
        self._pid = _sync.pid  # (a fork's copy of this writer is not the child's)
        self._done = False
        self.buffer = ring.slot_buffer(slot)
        self._builder: FrameBuilder | None = None

    def _b(self) -> FrameBuilder:
        if self._done:
            raise RingError("this SlotWriter was already published or aborted")
        _refuse_in_fork(self, f"writing slot {self.slot}")  # the parent's slot: writing it would corrupt its payload
        if self._builder is None:
            self._builder = FrameBuilder(self.buffer)
        return self._builder

    def set(self, name: str, array) -> None:
        """Write field ``name`` whole (copied once, straight into the slot)."""
        self._b().set(name, array)

    def append(self, name: str, array) -> None:
        """Extend field ``name`` along axis 0 in place (O(len(array)))."""
        self._b().append(name, array)

    def set_raw(self, data) -> None:
        """Write ``data`` (bytes-like) as a raw payload: no fields, the reader gets ``payload.raw``."""
        self._b().set_raw(data)

    @property
    def bytes_used(self) -> int:
        """Frame bytes written so far (the frame's size if published now)."""
        return self._builder.bytes_used if self._builder else 0

    def publish(self, meta: Mapping | None = None) -> SlotRef:
        """Finish the frame and publish it (WRITING -> READY, generation + 1)."""
        try:
            n = self._b().finish(meta)
        except BaseException:
            self.abort()
            raise
        return self._publish_frame(n)

    def _publish_frame(self, nbytes: int) -> SlotRef:
        if self._done:
            raise RingError("this SlotWriter was already published or aborted")
        try:  # what a reader cannot decode is never published
            parse_index(self._ring.slot_buffer(self.slot, nbytes))
        except FrameError as exc:
            self.abort()
            raise ValueError(f"the encoded payload would not decode ({exc}); nothing was published") from None
        gen = self._ring._table.publish(self.slot, self._lease, nbytes)  # may raise SlotLockTimeoutError
        self._done = True
        self.buffer = None
        log.debug("published slot %d generation %d (%d bytes)", self.slot, gen, nbytes)
        return self._ring._make_ref(self.slot, gen, nbytes)

    def abort(self) -> None:
        """Give the slot back (WRITING -> FREE). Idempotent."""
        if self._done:
            return
        _refuse_in_fork(self, f"abort of slot {self.slot}")
        self._done = True
        self.buffer = None
        self._builder = None
        if not self._ring._closed:
            self._ring._table.abort(self.slot, self._lease)

    def __enter__(self):
        return self

    def __exit__(self, et, ev, tb):
        self.abort()

    def __del__(self):  # pragma: no cover
        if getattr(self, "_done", True) or sys.is_finalizing() or self._pid != _sync.pid:
            return  # (at interpreter exit the slot is recovered: its owner is gone; a fork's copy is not ours)
        log.warning("SlotWriter for slot %d dropped without publish/abort: aborting", self.slot)
        try:
            self.abort()
        except (RingError, OSError) as exc:  # its lock stays busy, or the ring is gone: recovery reclaims it
            log.debug("abort of dropped writer on slot %d: %s", self.slot, exc)


class SlotLease:
    """A READY payload held in READING by this process.

    :attr:`payload` decodes lazily into zero-copy read-only views. The views
    never see another payload: :meth:`ack` commits the consumption at once (the
    payload is never served again), but while any view of it is alive the slot
    stays PINNED and is reused only once the last view is gone; a :meth:`nack`
    with live views returns the payload to READY only then. As a context
    manager the lease acks on a clean exit and nacks on an exception.
    """

    def __init__(self, ring: RingBuffer, slot: int, lease: int, generation: int, nbytes: int):
        self._ring = ring
        self.slot = slot
        self._lease = lease
        self._pid = _sync.pid  # (a fork's copy of this lease is not the child's)
        self.generation = generation
        self.nbytes = nbytes
        self._done = False
        self._payload: Payload | None = None
        self._watch = None  # weak reference to the views' anchor, once decoded
        self._decision: bool | None = None  # ack (True) / nack (False) waiting for the views
        #: set by ``nack(undecodable=True)`` when that moved the payload to DEAD
        self.dead_lettered = False

    @property
    def ref(self) -> SlotRef:
        """The :class:`SlotRef` of the leased payload."""
        return self._ring._make_ref(self.slot, self.generation, self.nbytes)

    @property
    def buffer(self) -> memoryview:
        """The encoded frame, read-only, straight from shared memory (not anchored:
        for senders; readers use :attr:`payload`)."""
        return self._ring.slot_buffer(self.slot, self.nbytes).toreadonly()

    def array(self, *, headroom: bool = False) -> np.ndarray:
        """The encoded frame as a uint8 numpy view (for senders); with
        ``headroom``, preceded by the slot's SLOT_HEADROOM bytes, which the
        lease holder may fill (e.g. with a response header) before sending."""
        return self._ring.slot_array(self.slot, self.nbytes, headroom=headroom)

    @property
    def payload(self) -> Payload:
        """The decoded payload (zero-copy views of the slot); take it before ack/nack."""
        if self._done:
            raise RingError("lease already finalised: take the payload before ack/nack (views taken before "
                            "stay valid)")
        if self._payload is None:
            u8, watch = anchored(self._ring.slot_buffer(self.slot, self.nbytes), readonly=True,
                                 on_gone=self._views_gone)
            # the watch is armed only once a payload exists: a failed decode hands out nothing, and
            # what its traceback still references must not count as a reader's view (that would
            # defer the reader's nack and drop its undecodable flag)
            payload = payload_from(parse_index(u8), u8)
            self._watch, self._payload = watch, payload
            self._ring._viewed.add(self)
        return self._payload

    @property
    def views_alive(self) -> bool:
        """Is any view of this lease's payload still referenced (the slot is kept for it)?"""
        return self._watch is not None and self._watch() is not None

    def _views_gone(self) -> None:
        # garbage-collection callback: must not block
        decision, table = self._decision, self._ring._table
        if decision is not None and table is not None:
            table.finalise_soon(self.slot, self._lease, decision)

    def _finalise(self, ack: bool, lock_timeout: float, undecodable: bool = False) -> bool:
        _refuse_in_fork(self, f"{'ack' if ack else 'nack'} of slot {self.slot}")
        self._payload = None  # our own reference; the caller's views keep the slot
        table = self._ring._table
        if not self.views_alive:
            if ack:
                return table.ack(self.slot, self._lease, lock_timeout)
            return table.nack(self.slot, self._lease, lock_timeout, undecodable)
        done = table.ack(self.slot, self._lease, lock_timeout, pinned=True) if ack else True
        self._decision = ack
        if not self.views_alive:  # the last view went meanwhile: its callback saw no decision
            table.finalise_soon(self.slot, self._lease, ack)
        return done

    @property
    def finalised(self) -> bool:
        """Was the lease acked or nacked already?"""
        return self._done

    def ack(self, *, lock_timeout: float = LOCK_TIMEOUT_S) -> bool:
        """Consume the payload (READING -> FREE, or PINNED while views of it are
        alive). Returns False (and logs) if the lease was already finalised or
        reclaimed. Raises :class:`SlotLockTimeoutError` (lease kept: try again)
        if the slot's lock stays busy for ``lock_timeout`` s."""
        if self._done:
            return False
        if self._ring._table is None:
            self._done = True
            log.warning("ack of slot %d after its ring handle was closed: the slot is recovered to READY "
                        "(not consumed) when this process exits", self.slot)
            return False
        done = self._finalise(True, lock_timeout)
        self._done = True
        return done

    def nack_soon(self) -> None:
        """Give the payload back without waiting for its slot's lock: applied now if the lock
        is free, else by the next call on the ring (or, while views of it are alive, once they
        are gone). For a holder that must not block (a frozen process holds the lock)."""
        if self._done or self._ring._table is None:
            return
        _refuse_in_fork(self, f"nack of slot {self.slot}")
        self._payload = None
        self._done = True
        if self.views_alive:
            self._decision = False
            if self.views_alive:
                return
        self._ring._table.finalise_soon(self.slot, self._lease, False)

    def nack(self, *, undecodable: bool = False, lock_timeout: float = LOCK_TIMEOUT_S) -> bool:
        """Give the payload back (READING -> READY; while views of it are alive, once
        they are gone). ``undecodable``: the reader could not decode it; after
        DEAD_LETTER_AFTER such NACKs it goes to DEAD (:attr:`dead_lettered`)."""
        if self._done:
            return False
        if self._ring._table is None:
            self._done = True
            return False
        done = self._finalise(False, lock_timeout, undecodable)
        self._done = True
        if done and undecodable:
            self.dead_lettered = self._ring._table.state[self.slot] == DEAD
        return done

    def __enter__(self):
        return self

    def __exit__(self, et, ev, tb):
        if et is None:
            self.ack()
        else:
            self.nack()

    def __del__(self):  # pragma: no cover
        if getattr(self, "_done", True) or sys.is_finalizing() or self._pid != _sync.pid:
            return  # (at interpreter exit the slot is recovered: its owner is gone; a fork's copy is not ours)
        log.warning("lease on slot %d dropped without ack/nack: nacking", self.slot)
        try:
            self.nack()
        except (RingError, OSError) as exc:  # its lock stays busy, or the ring is gone: recovery reclaims it
            log.debug("nack of dropped lease on slot %d: %s", self.slot, exc)


#: frames up to this size are copied into a staging buffer by one gather (a temporary copy,
#: then one into place) rather than one copy each; above it the second copy costs more than
#: the per-frame Python saves (2-core box, 128 frames: 4 KiB 20 vs 45 us, 8 KiB 64 vs 54 us)
GATHER_MAX = 6 << 10


class LeaseBatch:
    """Many payloads of one ring held in READING by this process, leased at once
    (:meth:`RingBuffer.claim_batch`): arrays instead of one object per payload.
    Finalise them together (:meth:`finalise`, one lock syscall) or, when that
    range is busy, item by item (:meth:`finalise_item`, or :meth:`leases` for a
    batch whose payloads were not decoded here).

    :meth:`payloads` decodes the whole batch with **one anchor** for all its views:
    its slots are kept (PINNED once acked) until no view of any of its payloads is
    left, and are then freed together, like a received message's payloads share
    their buffer. One weak reference and one lock syscall per batch instead of one
    of each per payload is what makes a same-host batch cheap."""

    def __init__(self, ring: RingBuffer, slots: np.ndarray, leases: np.ndarray, generations: np.ndarray,
                 nbytes: np.ndarray):
        self._ring = ring
        self.slots = slots
        self.lease_numbers = leases
        self.generations = generations
        self.nbytes = nbytes
        self._pid = _sync.pid  # (a fork's copy of this batch is not the child's)
        self.done = np.zeros(len(slots), bool)
        self._watch = None  # the shared anchor of the payloads' views, once decoded
        self._decision = np.empty(len(slots), np.int8)  # per item, deferred to the views: 1 ack, 0 nack
        self._decision.fill(-1)

    def __len__(self) -> int:
        return len(self.slots)

    def frame(self, i: int) -> np.ndarray:
        """Item ``i``'s encoded frame (uint8 view of shared memory)."""
        return self._ring.slot_array(int(self.slots[i]), int(self.nbytes[i]))

    def subset(self, idx) -> "LeaseBatch":
        """Items ``idx`` as a batch of their own (this object must not be used after;
        not for a batch whose payloads were decoded)."""
        if self._watch is not None:
            raise RingError("subset() of a batch whose payloads were decoded: its views share one anchor")
        idx = np.asarray(idx, np.int64)
        part = LeaseBatch(self._ring, self.slots[idx], self.lease_numbers[idx], self.generations[idx],
                          self.nbytes[idx])
        self.done[idx] = True  # held by the new batch now: this one must not give them back when dropped
        return part

    def live(self) -> np.ndarray:
        """Indices of the items not finalised yet."""
        return np.flatnonzero(~self.done)

    def copy_frames(self, out: np.ndarray, offsets, which=None) -> None:
        """Copy the frames of items ``which`` (default all) into ``out`` at ``offsets``."""
        r = self._ring
        u8, base, stride = r._u8, r._data_off + SLOT_HEADROOM, r._stride
        sel = slice(None) if which is None else np.asarray(which, np.int64)
        slots, sizes = self.slots[sel], self.nbytes[sel]
        if len(slots) > 1 and len(offsets) == len(slots) and 0 < int(sizes[0]) <= GATHER_MAX:
            first, step, n = int(offsets[0]), int(offsets[1]) - int(offsets[0]), int(sizes[0])
            if n <= step and first + step * (len(slots) - 1) + n <= len(out) and (sizes == n).all() \
                    and (np.diff(np.asarray(offsets, np.int64)) == step).all():  # small frames of one size,
                # evenly spaced: one gather and one copy, in C
                src = np.ndarray((int(slots.max()) + 1, n), np.uint8, buffer=u8, offset=base, strides=(stride, 1))
                dst = np.ndarray((len(slots), n), np.uint8, buffer=out, offset=first, strides=(step, 1))
                dst[...] = src[slots]
                return
        for sl, n, off in zip(slots.tolist(), sizes.tolist(), offsets):
            src = base + sl * stride
            out[off:off + n] = u8[src:src + n]

    def payloads(self) -> list:
        """Decode every item (once; take them before finalising): per item its
        :class:`Payload` of zero-copy views, or the :class:`FrameError` it does not
        decode with (finalise that item with ``undecodable``: no view of it exists).
        All views share one anchor: see the class docstring."""
        if self._watch is not None or self.done.any():
            raise RingError("payloads() of a batch: once, before any of it is finalised")
        r = self._ring
        lo = r._data_off + SLOT_HEADROOM
        span = int(self.slots.max()) * r._stride + int(self.nbytes.max()) if len(self) else 0
        u8, watch = anchored(memoryview(r._mm)[lo:lo + span], readonly=True, on_gone=self._views_gone)
        out = decode_many(u8, self.slots.astype(np.int64) * r._stride, self.nbytes)
        self._watch = watch
        r._viewed.add(self)
        return out

    @property
    def views_alive(self) -> bool:
        """Is any view of this batch's payloads still referenced (its slots are kept for it)?"""
        return self._watch is not None and self._watch() is not None

    def _views_gone(self) -> None:
        # garbage-collection callback: must not block
        table = self._ring._table
        todo = np.flatnonzero(self._decision >= 0)
        if table is not None and len(todo):
            table.finalise_soon_many(self.slots[todo], self.lease_numbers[todo], self._decision[todo] == 1)

    def finalise(self, ack) -> bool:
        """Ack (true) or nack each item still held (``ack``: a bool or one per item),
        with one lock syscall. False (nothing changed) when some slot's lock is busy.
        While views of the decoded payloads are alive, an ack leaves the slots PINNED
        and a nack waits for the views (then the slots go back to READY)."""
        live = ~self.done
        if not live.any():
            return True
        _refuse_in_fork(self, "batch finalise")
        if self._ring._closed:
            self.done[:] = True
            return True
        acks = np.full(len(self.done), ack, bool) if isinstance(ack, bool) else \
            np.broadcast_to(np.asarray(ack, bool), self.done.shape)
        which = np.flatnonzero(live)
        kept: list = []

        def views_alive() -> list[bool]:  # under the batch's locks
            kept.append(self.views_alive)
            return [kept[0]] * len(which)

        if self._ring._table.finalise_many(self.slots[which], self.lease_numbers[which], acks[which],
                                           views_alive if self._watch is not None else None) < 0:
            return False
        self.done[which] = True
        if kept and kept[0]:
            self._decision[which] = acks[which]
            if not self.views_alive:  # the last view went meanwhile: its callback saw no decision
                self._ring._table.finalise_soon_many(self.slots[which], self.lease_numbers[which], acks[which])
        return True

    def finalise_item(self, i: int, ack: bool, *, undecodable: bool = False,
                      lock_timeout: float = LOCK_TIMEOUT_S) -> bool:
        """Ack or nack item ``i`` alone (the batch's range was busy; or ``undecodable``,
        a nack of an item :meth:`payloads` could not decode, which counts towards
        dead-lettering). Raises :class:`SlotLockTimeoutError` (item kept: try again,
        or :meth:`give_back_soon`) if its lock stays busy for ``lock_timeout`` s."""
        if self.done[i]:
            return False
        _refuse_in_fork(self, f"finalise of slot {int(self.slots[i])}")
        table = self._ring._table
        if table is None:
            self.done[i] = True
            return False
        slot, lease = int(self.slots[i]), int(self.lease_numbers[i])
        if undecodable or not self.views_alive:
            done = table.ack(slot, lease, lock_timeout) if ack else table.nack(slot, lease, lock_timeout,
                                                                               undecodable)
        else:
            done = table.ack(slot, lease, lock_timeout, pinned=True) if ack else True
            self._decision[i] = ack
            if not self.views_alive:
                table.finalise_soon(slot, lease, ack)
        self.done[i] = True
        return done

    def give_back_soon(self, i: int) -> None:
        """Nack item ``i`` without waiting for its lock: now if it is free, else by the
        next call on the ring. For an item whose payload was never handed out (the
        caller holds no view of it): the views of the batch's other payloads do not
        delay it."""
        table = self._ring._table
        if self.done[i] or table is None:
            return
        _refuse_in_fork(self, f"give-back of slot {int(self.slots[i])}")
        self.done[i] = True
        table.finalise_soon(int(self.slots[i]), int(self.lease_numbers[i]), False)

    def abandon(self) -> None:
        """Give back every item not finalised yet, without waiting for a lock (now where
        it is free, else by the next call on the ring): for a batch its holder cannot
        finish (an interrupt, an error between claim and ack). While views of its
        payloads are alive the items wait for them, as :meth:`finalise` makes a nack
        wait; nothing is consumed."""
        table = self._ring._table
        which = np.flatnonzero(~self.done)
        if len(which):
            _refuse_in_fork(self, "give-back of a batch")
        if not len(which) or table is None or self._ring._closed:
            self.done[:] = True
            return
        self.done[which] = True
        if self.views_alive:
            self._decision[which] = 0
            if self.views_alive:
                return
        table.finalise_soon_many(self.slots[which], self.lease_numbers[which], np.zeros(len(which), bool))

    def __del__(self):  # pragma: no cover - exercised through the client's interrupted batch
        if sys.is_finalizing() or not hasattr(self, "done") or self.done.all() or self._pid != _sync.pid:
            return  # (at interpreter exit the slots are recovered: their owner is gone; a fork's copy is not ours)
        log.warning("batch of %d lease(s) on ring slots %s... dropped without ack/nack: giving them back",
                    int((~self.done).sum()), self.slots[~self.done][:4].tolist())
        try:
            self.abandon()
        except (RingError, OSError) as exc:  # the ring is gone: recovery reclaims them
            log.debug("give-back of a dropped batch: %s", exc)

    def leases(self, which=None) -> list:
        """Items not finalised yet as individual :class:`SlotLease` objects (the batch
        gives them up: finalise each through its lease). Not for a decoded batch."""
        if self._watch is not None:
            raise RingError("leases() of a batch whose payloads were decoded: finalise its items here")
        idx = [i for i in (range(len(self)) if which is None else which) if not self.done[i]]
        out = [SlotLease(self._ring, int(self.slots[i]), int(self.lease_numbers[i]), int(self.generations[i]),
                         int(self.nbytes[i])) for i in idx]
        self.done[idx] = True
        return out
