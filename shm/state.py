"""The slot state machine -- the only code that changes a slot's state.

::

    FREE --claim_free--> WRITING --publish (generation+1)--> READY
    READY --claim_ready--> READING --ack--> FREE
    READING --ack while views of it are alive--> PINNED --last view gone / owner died--> FREE
    WRITING --abort / owner died--> FREE
    READING --nack / owner died--> READY
    READING --nack(undecodable) x DEAD_LETTER_AFTER--> DEAD --discard_dead--> FREE

PINNED is a consumed payload whose memory is still viewed by its reader (see
:mod:`shm.views`): never served again, never rewritten until the reader's last
view is gone. A NACK while views are alive keeps the slot READING until then.
Those late transitions come from a garbage-collection callback, which must not
block: :meth:`SlotTable.finalise_soon` tries once and otherwise queues them for
the next call on this table.

Every transition of slot *i* runs under slot *i*'s *transition lock*: an OFD
write lock on one byte of the segment (atomic across processes) taken while
holding this handle's ``threading.Lock`` (atomic across threads; OFD locks do
not conflict within one open file description). There is no ring-wide lock:
a process frozen in the middle of a transition (SIGSTOP, a debugger) holds one
slot's lock and every other slot keeps working. No lock wait is unbounded:
a lock is polled with ``F_OFD_SETLK`` until a deadline, never waited for with
``F_OFD_SETLKW``, and the thread lock is never held while polling.

A process that moves a slot to WRITING or READING also takes the slot's
*ownership lock* (another OFD byte lock) and keeps it until it finalises the
slot. The kernel drops it if the process dies, which is how :meth:`recover`
tells a dead owner from a live one without trusting pids.

Finalisers present the *lease* number they got from the claim; a finaliser
whose lease no longer matches (the slot moved on) is a logged no-op, never a
clobber.

Why one module past 400 lines: it is the state machine, all of it; every
transition (single and batch) and crash recovery read and write the same slot
table under the same locks, and keeping them together is the point.
"""

from __future__ import annotations

import collections
import enum
import fcntl
import logging
import os
import threading
import time

import numpy as np

from . import _sync
from .errors import ForkedHandleError, SlotBusyError, SlotLockTimeoutError, StaleSlotError
from .layout import LOCK_OWNER_BASE, LOCK_SLOT_BASE

log = logging.getLogger("shm.state")


class SlotState(enum.IntEnum):
    FREE = 0
    WRITING = 1
    READY = 2
    READING = 3
    DEAD = 4  # failed to decode DEAD_LETTER_AFTER times: kept for inspection, never served
    PINNED = 5  # consumed, but its reader still holds views of it: freed when they are gone


FREE, WRITING, READY, READING, DEAD, PINNED = (int(s) for s in SlotState)
#: undecodable NACKs of one payload before it is moved to DEAD (so it never blocks others)
DEAD_LETTER_AFTER = 3
#: default bound of a finaliser's wait for its own slot's transition lock (seconds)
LOCK_TIMEOUT_S = 5.0

class _Ownerships:
    """The slots this process holds in one ring, across every handle of it: per slot
    the lease and the id of the holding :class:`SlotTable` (0: none). Used to judge
    slots whose recorded owner pid is our own (an OFD lock does not conflict with its
    own description). Arrays, so that a batch records its slots in one operation;
    every update happens under the slot's transition lock."""

    __slots__ = ("lease", "holder")

    def __init__(self, n: int):
        self.lease = np.zeros(n, np.uint64)
        self.holder = np.zeros(n, np.int64)


#: (st_dev, st_ino) of a ring's segment -> this process's ownerships in it
_OWNED: dict[tuple[int, int], _Ownerships] = {}
_OWNED_LOCK = threading.Lock()


def _forget_parents_ownerships() -> None:
    """In a forked child: the parent's leases are not this process's (and the lock may have been held)."""
    global _OWNED_LOCK
    _OWNED.clear()
    _OWNED_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_forget_parents_ownerships)


def _ownerships(ident: tuple[int, int], n: int) -> _Ownerships:
    with _OWNED_LOCK:
        o = _OWNED.get(ident)
        if o is None or len(o.lease) != n:  # (a new ring on a reused inode: the old one is gone)
            o = _OWNED[ident] = _Ownerships(n)
        return o
_U64_MAX = np.uint64(2**64 - 1)


class SlotTable:
    """Atomic transitions on the control records of one mapped ring."""

    def __init__(self, fd: int, header: np.ndarray, ctrl: np.ndarray, futex_base: int,
                 ready_futex_off: int, free_futex_off: int):
        self._fd = fd
        st = os.fstat(fd)
        self._ident = (st.st_dev, st.st_ino)
        self._tlock = threading.Lock()
        self.header = header
        self.ctrl = ctrl
        self.n = len(ctrl)
        self.state = ctrl["state"]
        self.owner = ctrl["owner_pid"]
        self.gen = ctrl["generation"]
        self.nbytes = ctrl["nbytes"]
        self.seq = ctrl["seq"]
        self.lease = ctrl["lease"]
        self.claimed_ns = ctrl["claimed_ns"]
        self.failures = ctrl["failures"]
        self.ready_addr = futex_base + ready_futex_off
        self.free_addr = futex_base + free_futex_off
        self._ready_word = header["ready_futex"]
        self._free_word = header["free_futex"]
        self._pid = _sync.pid
        self._owned = _ownerships(self._ident, self.n)
        # late finalisations (slot, lease, ack) from view callbacks, applied on the next call
        self._soon: collections.deque = collections.deque()

    # ------------------------------------------------------------ locking --
    def adopt_after_fork(self) -> None:
        """In a forked child whose descriptor now refers to a description of its own (see
        ``_sync.disown_description``): this table becomes the child's. It holds nothing:
        slots leased by the parent stay the parent's (every finaliser checks the owner)."""
        self._pid = _sync.pid
        self._tlock = threading.Lock()  # (another thread of the parent may have held it at the fork)
        self._soon = collections.deque()
        self._owned = _ownerships(self._ident, self.n)

    def _not_ours(self, slot: int) -> bool:
        """Is ``slot`` held by another process (a lease, writer or view inherited through fork)?"""
        return int(self.owner[slot]) != self._pid

    def _refuse_not_ours(self, slot: int, what: str) -> None:
        if self._not_ours(slot):
            raise ForkedHandleError(
                f"{what} of slot {slot}: the slot is held by process {int(self.owner[slot])}, not by this one "
                f"({self._pid}): a lease, writer or view inherited through fork cannot finalise its parent's "
                f"slot (the parent does); claim or reserve slots of your own in this process")

    def _refuse_if_forked(self) -> None:
        if self._pid != _sync.pid:
            raise ForkedHandleError(
                f"this ring handle was opened by process {self._pid} and this process ({_sync.pid}) is a fork "
                f"of it: a forked child shares its parent's slot locks, so it must not change the ring through "
                f"the parent's handle. Attach the ring again in the child (shm.RingBuffer.attach(name)), or "
                f"start workers with the 'spawn' method")

    def _try_lock(self, slot: int) -> bool:
        """Take slot's transition lock without waiting. On True the caller holds
        the thread lock and the slot lock and must call :meth:`_unlock`."""
        self._refuse_if_forked()
        self._tlock.acquire()
        try:
            fcntl.fcntl(self._fd, fcntl.F_OFD_SETLK, _sync.flock_bytes(fcntl.F_WRLCK, LOCK_SLOT_BASE + slot))
            return True
        except OSError:  # EAGAIN/EACCES: held by another open file description
            self._tlock.release()
            return False
        except BaseException:
            self._tlock.release()
            raise

    def _lock(self, slot: int, timeout: float) -> bool:
        """Take slot's transition lock, polling until ``timeout`` s pass; False on timeout."""
        if self._try_lock(slot):
            return True
        deadline = time.monotonic() + timeout
        pause = 20e-6
        while time.monotonic() < deadline:
            time.sleep(pause)
            if self._try_lock(slot):
                return True
            pause = min(pause * 2, 0.002)
        return False

    def _lock_or_raise(self, slot: int, timeout: float, what: str) -> None:
        if not self._lock(slot, timeout):
            raise SlotLockTimeoutError(
                f"{what} of slot {slot}: its transition lock was held for more than {timeout:.3g} s by another "
                f"process (frozen mid-transition: SIGSTOP or a debugger?); the slot keeps its state, retry later"
            )

    def _unlock(self, slot: int) -> None:
        try:
            fcntl.fcntl(self._fd, fcntl.F_OFD_SETLK, _sync.flock_bytes(fcntl.F_UNLCK, LOCK_SLOT_BASE + slot))
        finally:
            self._tlock.release()

    def lock_held_elsewhere(self, slot: int) -> bool:
        """Is slot's transition lock held by another open file description right now?"""
        return _sync.lock_held_elsewhere(self._fd, LOCK_SLOT_BASE + slot)

    def _take_ownership(self, slot: int) -> int:
        if not _sync.lock_acquire(self._fd, LOCK_OWNER_BASE + slot, blocking=False):
            # Only possible if a live process finalised a slot without holding
            # its transition lock, which the state machine never does.
            raise RuntimeError(f"slot {slot}: ownership lock held elsewhere in state FREE/READY")
        lease = int(self.lease[slot]) + 1
        self.lease[slot] = lease
        self.owner[slot] = self._pid
        self.claimed_ns[slot] = time.time_ns()
        self._owned.lease[slot] = lease
        self._owned.holder[slot] = id(self)
        return lease

    def forget_ownerships(self) -> None:
        """This handle is closing (its OFD locks die with its file description):
        slots it still holds become recoverable by this process too."""
        holder = self._owned.holder
        holder[holder == id(self)] = 0

    def _drop_ownership(self, slot: int) -> None:
        self.owner[slot] = 0
        self._owned.holder[slot] = 0
        _sync.lock_release(self._fd, LOCK_OWNER_BASE + slot)

    # ------------------------------------------------------------- wakes ---
    @staticmethod
    def _bump(word: np.ndarray) -> None:
        # not atomic across processes, and need not be: a waiter only needs the
        # word to differ from what it saw, and every sleep is bounded anyway
        word[()] = (int(word[()]) + 1) & 0xFFFFFFFF

    def ready_word(self) -> int:
        return int(self._ready_word[()])

    def free_word(self) -> int:
        return int(self._free_word[()])

    def signal_ready(self) -> None:
        self._bump(self._ready_word)
        _sync.futex_wake(self.ready_addr)

    def signal_free(self) -> None:
        self._bump(self._free_word)
        _sync.futex_wake(self.free_addr)

    # -------------------------------------------------------- candidates ---
    def _oldest_ready(self, max_nbytes: int = 0, skip: set | None = None) -> int | None:
        """Unlocked peek: the READY slot published first (with ``nbytes <= max_nbytes``
        when given, not in ``skip``), or None. Re-checked under the slot's lock."""
        ok = self.state == READY
        if max_nbytes:
            ok &= self.nbytes <= max_nbytes
        if skip:
            ok[list(skip)] = False
        slot = int(np.where(ok, self.seq, _U64_MAX).argmin())
        return slot if ok[slot] else None

    # ------------------------------------------------------- transitions ---
    def claim_free(self, drop_oldest: bool = False):
        """FREE -> WRITING on any free slot (or, with ``drop_oldest``, the oldest
        READY one). Returns ``(slot, lease, dropped)`` or None; ``dropped`` is
        the (slot, generation) whose payload was dropped, else None.
        Never waits for a lock: a slot whose lock is busy is skipped."""
        for slot in map(int, np.flatnonzero(self.state == FREE)):
            if not self._try_lock(slot):
                continue
            try:
                if self.state[slot] != FREE:
                    continue
                lease = self._take_ownership(slot)
                self.state[slot] = WRITING
                return slot, lease, None
            finally:
                self._unlock(slot)
        if not drop_oldest:
            return None
        skip: set[int] = set()
        while (slot := self._oldest_ready(skip=skip)) is not None:
            skip.add(slot)
            if not self._try_lock(slot):
                continue
            try:
                if self.state[slot] != READY:
                    continue
                dropped = (slot, int(self.gen[slot]))
                self.ctrl["drops"][slot] += 1
                lease = self._take_ownership(slot)
                self.state[slot] = WRITING
            finally:
                self._unlock(slot)
            log.warning("ring full: dropped the oldest READY payload (slot %d, generation %d)", *dropped)
            return slot, lease, dropped
        return None

    def publish(self, slot: int, lease: int, nbytes: int, timeout: float = LOCK_TIMEOUT_S) -> int:
        """WRITING -> READY; returns the new generation."""
        self._lock_or_raise(slot, timeout, "publish")
        try:
            if self.state[slot] != WRITING or self.lease[slot] != lease:
                raise StaleSlotError(
                    f"slot {slot}: cannot publish, the slot is no longer held by this writer "
                    f"(state {SlotState(int(self.state[slot])).name}); was it reclaimed?"
                )
            self._refuse_not_ours(slot, "publish")
            gen = int(self.gen[slot]) + 1
            self.gen[slot] = gen
            self.seq[slot] = time.monotonic_ns()
            self.nbytes[slot] = nbytes
            self.failures[slot] = 0
            self.state[slot] = READY
            self._drop_ownership(slot)
        finally:
            self._unlock(slot)
        self.signal_ready()
        return gen

    def _finalise(self, what: str, slot: int, lease: int, expect: int, to: int, timeout: float,
                  undecodable: bool = False) -> bool:
        """The lease holder's exit from ``expect`` (WRITING/READING) to ``to``.

        A logged no-op unless the slot is still in ``expect`` under ``lease``:
        a finaliser whose slot was recovered and moved on never clobbers it.
        Raises :class:`SlotLockTimeoutError` (state unchanged, lease still held)
        if the slot's lock stays busy for ``timeout`` seconds.
        """
        self._lock_or_raise(slot, timeout, what)
        try:
            if self.state[slot] != expect or self.lease[slot] != lease:
                log.warning("%s of slot %d ignored: state %s, lease %d (ours %d)", what,
                            slot, SlotState(int(self.state[slot])).name, int(self.lease[slot]), lease)
                return False
            self._refuse_not_ours(slot, what)
            if undecodable:
                self.failures[slot] += 1
                if self.failures[slot] >= DEAD_LETTER_AFTER:
                    to = DEAD
                    self.ctrl["dead"][slot] += 1
            self.state[slot] = to
            if expect == WRITING:
                self.nbytes[slot] = 0
            elif to == FREE:
                self.ctrl["consumed"][slot] += 1
            self._drop_ownership(slot)
        finally:
            self._unlock(slot)
        if to == FREE:
            self.signal_free()
        elif to == READY:
            self.signal_ready()
        else:
            log.warning("slot %d generation %d could not be decoded by %d readers: moved to DEAD (never served "
                        "again; inspect with RingBuffer.dead_letters())", slot, int(self.gen[slot]),
                        DEAD_LETTER_AFTER)
        return True

    def abort(self, slot: int, lease: int, timeout: float = LOCK_TIMEOUT_S) -> bool:
        """WRITING -> FREE (generation unchanged). Logged no-op in any other state."""
        return self._finalise("abort", slot, lease, WRITING, FREE, timeout)

    def claim_ready(self, slot: int | None = None, generation: int | None = None, *, max_nbytes: int = 0,
                    timeout: float = 0.0):
        """READY -> READING. With ``slot`` None: the oldest READY payload (of at
        most ``max_nbytes`` bytes when given), or None; never waits for a lock.

        With a slot: the generation must match, else :class:`StaleSlotError`;
        a READING slot, or one whose lock stays busy for ``timeout`` s, raises
        :class:`SlotBusyError`. Returns ``(slot, lease, generation, nbytes)``.
        """
        if slot is None:
            skip: set[int] = set()
            while (cand := self._oldest_ready(max_nbytes, skip)) is not None:
                skip.add(cand)
                if not self._try_lock(cand):
                    continue
                try:
                    if self.state[cand] != READY:
                        continue
                    return self._lease_for_reading(cand)
                finally:
                    self._unlock(cand)
            return None
        if not self._lock(slot, timeout):
            raise SlotBusyError(f"slot {slot}: its transition lock is held by another process "
                                f"(frozen mid-transition?); retry later")
        try:
            st, gen = int(self.state[slot]), int(self.gen[slot])
            if gen != generation or st not in (READY, READING):
                raise StaleSlotError(
                    f"slot {slot} generation {generation} is gone (slot is at generation {gen}, "
                    f"{SlotState(st).name}): the payload was consumed, dropped or dead-lettered"
                )
            if st == READING:
                raise SlotBusyError(f"slot {slot} generation {generation} is leased by another reader")
            return self._lease_for_reading(slot)
        finally:
            self._unlock(slot)

    # ------------------------------------------------- batch transitions ---
    # One transition-lock syscall for the whole batch (a byte range covering its
    # slots), vectorised checks and updates, one ownership-lock syscall per run of
    # consecutive slots. Each falls back to slot-by-slot when the range is busy.
    def _lock_range(self, lo: int, hi: int) -> bool:
        self._refuse_if_forked()
        self._tlock.acquire()
        try:
            fcntl.fcntl(self._fd, fcntl.F_OFD_SETLK, _sync.flock_bytes(fcntl.F_WRLCK, LOCK_SLOT_BASE + lo, hi - lo + 1))
            return True
        except OSError:
            self._tlock.release()
            return False
        except BaseException:
            self._tlock.release()
            raise

    def _unlock_range(self, lo: int, hi: int) -> None:
        try:
            fcntl.fcntl(self._fd, fcntl.F_OFD_SETLK, _sync.flock_bytes(fcntl.F_UNLCK, LOCK_SLOT_BASE + lo, hi - lo + 1))
        finally:
            self._tlock.release()

    def claim_many(self, slots: np.ndarray, generations: np.ndarray) -> np.ndarray:
        """READY -> READING for each (slot, generation) that is READY at that
        generation; never waits. ``slots`` must be distinct. Returns per item the
        lease (> 0), or 0 = STALE (generation gone), -1 = BUSY (leased elsewhere or
        its lock is held)."""
        slots = np.asarray(slots, np.int64)
        out = np.zeros(len(slots), np.int64)
        if not len(slots):
            return out
        lo, hi = int(slots.min()), int(slots.max())
        if not self._lock_range(lo, hi):
            for i, (sl, g) in enumerate(zip(slots.tolist(), np.asarray(generations).tolist())):
                try:
                    out[i] = self.claim_ready(sl, g)[1]
                except StaleSlotError:
                    out[i] = 0
                except SlotBusyError:
                    out[i] = -1
            return out
        try:
            st = self.state[slots]
            gen_ok = self.gen[slots] == np.asarray(generations, np.uint64)
            ok = gen_ok & (st == READY)
            out[gen_ok & (st == READING)] = -1
            take = slots[ok]
            if len(take):
                order = np.sort(take)
                taken: list[tuple[int, int]] = []
                for start, n in _sync.runs(order):
                    if not _sync.lock_acquire(self._fd, LOCK_OWNER_BASE + start, blocking=False, length=n):
                        for s0, n0 in taken:  # leave nothing half-claimed behind
                            _sync.lock_release(self._fd, LOCK_OWNER_BASE + s0, n0)
                        raise RuntimeError(f"slots {start}..{start + n - 1}: ownership lock held elsewhere in READY")
                    taken.append((start, n))
                leases = self.lease[take] + 1
                self.lease[take] = leases
                self.owner[take] = self._pid
                self.claimed_ns[take] = time.time_ns()
                self.state[take] = READING
                self._owned.lease[take] = leases
                self._owned.holder[take] = id(self)
                out[ok] = leases.astype(np.int64)
        finally:
            self._unlock_range(lo, hi)
        return out

    def finalise_many(self, slots: np.ndarray, leases: np.ndarray, ack: np.ndarray, pinned=None) -> int:
        """For each READING slot still under its lease: ack -> FREE (consumed), else
        -> READY; others are a logged no-op. ``pinned``: a callable, run once the
        batch's locks are held, giving per item whether views of it are alive: an
        ack then goes to PINNED (consumed, ownership kept until
        :meth:`finalise_soon`), a nack leaves the slot READING for the views' owner
        to settle. Never waits: returns -1 (nothing changed, ``pinned`` not called)
        when the batch's lock range is busy, else how many were finalised."""
        slots = np.asarray(slots, np.int64)
        if not len(slots):
            return 0
        lo, hi = int(slots.min()), int(slots.max())
        if not self._lock_range(lo, hi):
            return -1  # some slot's lock is busy: the caller finalises slot by slot
        try:
            valid = (self.state[slots] == READING) & (self.lease[slots] == np.asarray(leases, np.uint64))
            for slot in slots[valid & (self.owner[slots] != self._pid)][:1].tolist():
                self._refuse_not_ours(slot, "batch finalise")
            if not valid.all():
                log.warning("batch finalise: %d of %d slots no longer held (recovered?): left alone",
                            int((~valid).sum()), len(slots))
            ack = np.asarray(ack, bool)
            kept = np.zeros(len(slots), bool) if pinned is None else np.asarray(pinned(), bool)
            freed, readied = slots[valid & ack & ~kept], slots[valid & ~ack & ~kept]
            held = slots[valid & ack & kept]
            self.state[freed] = FREE
            self.ctrl["consumed"][freed] += 1
            self.state[readied] = READY
            self.state[held] = PINNED
            self.ctrl["consumed"][held] += 1
            released = slots[valid & ~kept]
            self.owner[released] = 0
            for start, n in _sync.runs(np.sort(released)):
                _sync.lock_release(self._fd, LOCK_OWNER_BASE + start, n)
            self._owned.holder[released] = 0
        finally:
            self._unlock_range(lo, hi)
        if len(freed):
            self.signal_free()
        if len(readied):
            self.signal_ready()
        return int(valid.sum())

    def _lease_for_reading(self, slot: int):
        lease = self._take_ownership(slot)
        self.state[slot] = READING
        return slot, lease, int(self.gen[slot]), int(self.nbytes[slot])

    def ack(self, slot: int, lease: int, timeout: float = LOCK_TIMEOUT_S, *, pinned: bool = False) -> bool:
        """READING -> FREE (consumed); with ``pinned`` (views of it are alive) READING ->
        PINNED, freed by :meth:`finalise_soon` once they are gone. Logged no-op in any other state."""
        if pinned:
            self._lock_or_raise(slot, timeout, "ack")
            try:
                if self.state[slot] != READING or self.lease[slot] != lease:
                    log.warning("ack of slot %d ignored: state %s, lease %d (ours %d)", slot,
                                SlotState(int(self.state[slot])).name, int(self.lease[slot]), lease)
                    return False
                self._refuse_not_ours(slot, "ack")
                self.state[slot] = PINNED
                self.ctrl["consumed"][slot] += 1
            finally:
                self._unlock(slot)
            return True
        return self._finalise("ack", slot, lease, READING, FREE, timeout)

    def finalise_soon(self, slot: int, lease: int, ack: bool) -> None:
        """The last view of a leased slot is gone: PINNED -> FREE, or apply a finaliser
        that waited for the views (READING -> FREE on ``ack``, else -> READY). Safe in a
        garbage-collection callback: never blocks; queued for the next call if the
        slot's lock (or this table's thread lock) is busy."""
        if not self._apply_soon(slot, lease, ack):
            self._soon.append((slot, lease, ack))

    def _apply_soon(self, slot: int, lease: int, ack: bool) -> bool:
        if self._pid != _sync.pid:
            return True  # a view inherited through fork: the parent owns that slot, not this child
        if not self._tlock.acquire(blocking=False):
            return False
        try:
            try:
                fcntl.fcntl(self._fd, fcntl.F_OFD_SETLK, _sync.flock_bytes(fcntl.F_WRLCK, LOCK_SLOT_BASE + slot))
            except OSError:
                return False
            try:
                st = int(self.state[slot])
                if self.lease[slot] != lease or st not in (PINNED, READING) or self._not_ours(slot):
                    return True  # recovered or finalised meanwhile (or a fork's copy of a parent's view): nothing to do
                to = FREE if st == PINNED or ack else READY
                self.state[slot] = to
                if st == READING and ack:
                    self.ctrl["consumed"][slot] += 1
                self._drop_ownership(slot)
            finally:
                fcntl.fcntl(self._fd, fcntl.F_OFD_SETLK, _sync.flock_bytes(fcntl.F_UNLCK, LOCK_SLOT_BASE + slot))
        finally:
            self._tlock.release()
        self.signal_free() if to == FREE else self.signal_ready()
        return True

    def finalise_soon_many(self, slots, leases, acks) -> None:
        """:meth:`finalise_soon` for many slots (the last view of a batch that shares one
        anchor is gone): one lock syscall for the batch when its range is free, else slot by
        slot (each queued for the next call if its own lock is busy). Same rules: never
        blocks, safe in a callback."""
        slots = np.asarray(slots, np.int64)
        if not len(slots) or self._pid != _sync.pid:  # (views inherited through fork: the parent's slots)
            return
        lo, hi = int(slots.min()), int(slots.max())
        if not self._tlock.acquire(blocking=False):
            self._soon.extend(zip(slots.tolist(), np.asarray(leases).tolist(), np.asarray(acks, bool).tolist()))
            return
        try:
            try:
                fcntl.fcntl(self._fd, fcntl.F_OFD_SETLK,
                            _sync.flock_bytes(fcntl.F_WRLCK, LOCK_SLOT_BASE + lo, hi - lo + 1))
            except OSError:  # a slot of the range is busy (someone else's transition): slot by slot, below
                busy = True
            else:
                busy = False
                try:
                    st = self.state[slots]
                    valid = (self.lease[slots] == np.asarray(leases, np.uint64)) & ((st == PINNED) | (st == READING)) \
                        & (self.owner[slots] == self._pid)
                    ack = np.asarray(acks, bool)
                    freed = valid & ((st == PINNED) | ack)
                    self.ctrl["consumed"][slots[valid & (st == READING) & ack]] += 1
                    self.state[slots[freed]] = FREE
                    self.state[slots[valid & ~freed]] = READY
                    released = slots[valid]
                    self.owner[released] = 0
                    for start, n in _sync.runs(np.sort(released)):
                        _sync.lock_release(self._fd, LOCK_OWNER_BASE + start, n)
                    self._owned.holder[released] = 0
                finally:
                    fcntl.fcntl(self._fd, fcntl.F_OFD_SETLK,
                                _sync.flock_bytes(fcntl.F_UNLCK, LOCK_SLOT_BASE + lo, hi - lo + 1))
        finally:
            self._tlock.release()
        if busy:
            for slot, lease, ack in zip(slots.tolist(), np.asarray(leases).tolist(), np.asarray(acks, bool).tolist()):
                self.finalise_soon(slot, lease, ack)  # now if its own lock is free, else queued
            return
        if freed.any():
            self.signal_free()
        if (valid & ~freed).any():
            self.signal_ready()

    def apply_pending(self) -> None:
        """Apply queued late finalisations (called at the start of ring operations)."""
        if not self._soon or self._pid != _sync.pid:
            return
        for _ in range(len(self._soon)):
            try:
                item = self._soon.popleft()
            except IndexError:
                return
            if not self._apply_soon(*item):
                self._soon.append(item)
                return

    def nack(self, slot: int, lease: int, timeout: float = LOCK_TIMEOUT_S, undecodable: bool = False) -> bool:
        """READING -> READY (payload kept, publish order kept). No-op otherwise.
        ``undecodable``: the reader could not decode it; the DEAD_LETTER_AFTER-th
        such NACK moves the payload to DEAD instead."""
        return self._finalise("nack", slot, lease, READING, READY, timeout, undecodable)

    def discard_dead(self, slot: int, generation: int, timeout: float = LOCK_TIMEOUT_S) -> bool:
        """DEAD -> FREE (the dead payload is gone). False if the slot is not DEAD at ``generation``."""
        self._lock_or_raise(slot, timeout, "discard_dead")
        try:
            if self.state[slot] != DEAD or int(self.gen[slot]) != generation:
                return False
            self.state[slot] = FREE
            self.nbytes[slot] = 0
        finally:
            self._unlock(slot)
        self.signal_free()
        return True

    # ----------------------------------------------------------- recovery --
    def owner_alive(self, slot: int) -> bool:
        """Is the process holding ``slot`` (WRITING/READING) still alive?

        The owner's lock on the slot's ownership byte answers; the owner field only
        says which process to ask first. A PID is not a process's identity across PID
        namespaces (containers sharing /dev/shm: the producer in one and the server in
        another are often both PID 1), so a slot that names this process's PID but that
        this process's own records do not hold is another process's: its lock decides."""
        if int(self.owner[slot]) == self._pid:
            o = self._owned
            if o.holder[slot] and o.lease[slot] == self.lease[slot]:
                return True
        return _sync.lock_held_elsewhere(self._fd, LOCK_OWNER_BASE + slot)

    def recover(self) -> int:
        """Reclaim slots whose owner died: WRITING -> FREE, READING -> READY,
        PINNED -> FREE. Never waits: a slot whose lock is busy is looked at next time."""
        self.apply_pending()
        freed = readied = 0
        busy = np.flatnonzero((self.state == WRITING) | (self.state == READING) | (self.state == PINNED))
        for slot in map(int, busy):
            if not self._try_lock(slot):
                continue
            try:
                st = int(self.state[slot])
                if st not in (WRITING, READING, PINNED) or self.owner_alive(slot):
                    continue
                pid = int(self.owner[slot])
                if st == WRITING:
                    self.state[slot] = FREE
                    self.nbytes[slot] = 0
                    freed += 1
                    log.warning("recovered slot %d: writer pid %d died mid-write -> FREE", slot, pid)
                elif st == PINNED:
                    self.state[slot] = FREE
                    freed += 1
                    log.info("recovered slot %d: reader pid %d died holding views of a consumed payload -> FREE",
                             slot, pid)
                else:
                    self.state[slot] = READY
                    readied += 1
                    log.warning("recovered slot %d: reader pid %d died holding a lease -> READY "
                                "(generation %d kept)", slot, pid, int(self.gen[slot]))
                self.owner[slot] = 0
                self.lease[slot] += 1  # any late finaliser of the dead owner is now a no-op
                self.ctrl["recovered"][slot] += 1
            finally:
                self._unlock(slot)
        if freed:
            self.signal_free()
        if readied:
            self.signal_ready()
        return freed + readied
