"""The slot state machine -- the only code that changes a slot's state.

::

    FREE --claim_free--> WRITING --publish (generation+1)--> READY
    READY --claim_ready--> READING --ack--> FREE
    WRITING --abort / owner died--> FREE
    READING --nack / owner died--> READY

Every transition runs under the ring's *transition lock*: a per-instance
``threading.Lock`` plus an OFD write lock on one byte of the segment, so it is
atomic across threads and processes.  The lock is held for a few field
updates, never during a payload copy.

A process that moves a slot to WRITING or READING also takes the slot's
*ownership lock* (another OFD byte lock) and keeps it until it finalises the
slot.  The kernel drops it if the process dies, which is how :meth:`recover`
tells a dead owner from a live one without trusting pids.

Finalisers present the *lease* number they got from the claim; a finaliser
whose lease no longer matches (the slot moved on) is a logged no-op, never a
clobber.
"""

from __future__ import annotations

import enum
import fcntl
import logging
import os
import threading
import time
from contextlib import contextmanager

import numpy as np

from . import _sync
from .errors import SlotBusyError, StaleSlotError
from .layout import LOCK_OWNER_BASE, LOCK_TRANSITION

log = logging.getLogger("shm.state")


class SlotState(enum.IntEnum):
    FREE = 0
    WRITING = 1
    READY = 2
    READING = 3


FREE, WRITING, READY, READING = (int(s) for s in SlotState)

# Ownerships held by this process, across every RingBuffer instance:
# (st_dev, st_ino, slot) -> lease.  Used to judge slots whose recorded owner
# pid is our own (an OFD lock does not conflict with its own description).
# Single dict operations are atomic under the GIL.
_OWNED: dict[tuple[int, int, int], tuple[int, int]] = {}  # -> (lease, id of the SlotTable)
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
        self.ready_addr = futex_base + ready_futex_off
        self.free_addr = futex_base + free_futex_off
        self._ready_word = header["ready_futex"]
        self._free_word = header["free_futex"]
        self._ready_waiters = header["ready_waiters"]
        self._free_waiters = header["free_waiters"]
        self._pid = os.getpid()
        self._LOCK = _sync.flock_bytes(fcntl.F_WRLCK, LOCK_TRANSITION)
        self._UNLOCK = _sync.flock_bytes(fcntl.F_UNLCK, LOCK_TRANSITION)

    # ------------------------------------------------------------ locking --
    # Hot path: explicit acquire/release (a generator context manager costs
    # more than the two fcntl calls it wraps).
    def _lock(self) -> None:
        self._tlock.acquire()
        try:
            fcntl.fcntl(self._fd, fcntl.F_OFD_SETLKW, self._LOCK)  # retried on EINTR (PEP 475)
        except BaseException:
            self._tlock.release()
            raise

    def _unlock(self) -> None:
        try:
            fcntl.fcntl(self._fd, fcntl.F_OFD_SETLK, self._UNLOCK)
        finally:
            self._tlock.release()

    @contextmanager
    def locked(self):
        self._lock()
        try:
            yield
        finally:
            self._unlock()

    def _take_ownership(self, slot: int) -> int:
        if not _sync.lock_acquire(self._fd, LOCK_OWNER_BASE + slot, blocking=False):
            # Only possible if a live process finalised a slot without holding
            # the transition lock, which the state machine never does.
            raise RuntimeError(f"slot {slot}: ownership lock held elsewhere in state FREE/READY")
        lease = int(self.lease[slot]) + 1
        self.lease[slot] = lease
        self.owner[slot] = self._pid
        self.claimed_ns[slot] = time.time_ns()
        _OWNED[(*self._ident, slot)] = (lease, id(self))
        return lease

    def forget_ownerships(self) -> None:
        """This handle is closing (its OFD locks die with its file description):
        slots it still holds become recoverable by this process too."""
        me = id(self)
        for key in [k for k, v in _OWNED.items() if v[1] == me]:
            _OWNED.pop(key, None)

    def _drop_ownership(self, slot: int) -> None:
        self.owner[slot] = 0
        _OWNED.pop((*self._ident, slot), None)
        _sync.lock_release(self._fd, LOCK_OWNER_BASE + slot)

    @staticmethod
    def _bump(word: np.ndarray) -> None:
        word[()] = (int(word[()]) + 1) & 0xFFFFFFFF

    def ready_word(self) -> int:
        return int(self._ready_word[()])

    def free_word(self) -> int:
        return int(self._free_word[()])

    def add_waiter(self, which: str, delta: int) -> None:
        """Register (+1) / unregister (-1) a sleeper on the READY or FREE futex."""
        w = self.header["ready_waiters" if which == "ready" else "free_waiters"]
        self._lock()
        try:
            w[()] = max(0, int(w[()]) + delta)
        finally:
            self._unlock()

    def _wake_ready(self):
        if self._ready_waiters[()]:
            _sync.futex_wake(self.ready_addr)

    def _wake_free(self):
        if self._free_waiters[()]:
            _sync.futex_wake(self.free_addr)

    def _oldest_ready(self) -> int | None:
        slot = int(np.where(self.state == READY, self.seq, _U64_MAX).argmin())
        return slot if self.state[slot] == READY else None

    # ------------------------------------------------------- transitions ---
    def claim_free(self, drop_oldest: bool = False):
        """FREE -> WRITING on any free slot (or, with ``drop_oldest``, the oldest
        READY one). Returns ``(slot, lease, dropped)`` or None; ``dropped`` is
        the (slot, generation) whose payload was dropped, else None."""
        self._lock()
        try:
            slot = int(self.state.argmin())  # FREE == 0 is the smallest state
            dropped = None
            if self.state[slot] == FREE:
                pass
            elif drop_oldest:
                slot = self._oldest_ready()
                if slot is None:
                    return None
                dropped = (slot, int(self.gen[slot]))
                self.header["drops"] += 1
            else:
                return None
            lease = self._take_ownership(slot)
            self.state[slot] = WRITING
        finally:
            self._unlock()
        if dropped:
            log.warning("ring full: dropped the oldest READY payload (slot %d, generation %d)", *dropped)
        return slot, lease, dropped

    def publish(self, slot: int, lease: int, nbytes: int) -> tuple[int, int]:
        """WRITING -> READY; returns (generation, seq)."""
        self._lock()
        try:
            if self.state[slot] != WRITING or self.lease[slot] != lease:
                raise StaleSlotError(
                    f"slot {slot}: cannot publish, the slot is no longer held by this writer "
                    f"(state {SlotState(int(self.state[slot])).name}); was it reclaimed?"
                )
            gen = int(self.gen[slot]) + 1
            seq = int(self.header["next_seq"]) + 1
            self.header["next_seq"] = seq
            self.header["published"] += 1
            self.gen[slot] = gen
            self.seq[slot] = seq
            self.nbytes[slot] = nbytes
            self.state[slot] = READY
            self._drop_ownership(slot)
            self._bump(self._ready_word)
        finally:
            self._unlock()
        self._wake_ready()
        return gen, seq

    def _finalise(self, what: str, slot: int, lease: int, expect: int, to: int) -> bool:
        """The lease holder's exit from ``expect`` (WRITING/READING) to ``to``.

        A logged no-op unless the slot is still in ``expect`` under ``lease``:
        a finaliser whose slot was recovered and moved on never clobbers it.
        """
        self._lock()
        try:
            if self.state[slot] != expect or self.lease[slot] != lease:
                log.warning("%s of slot %d ignored: state %s, lease %d (ours %d)", what,
                            slot, SlotState(int(self.state[slot])).name, int(self.lease[slot]), lease)
                return False
            self.state[slot] = to
            if expect == WRITING:
                self.nbytes[slot] = 0
            elif to == FREE:
                self.header["consumed"] += 1
            self._drop_ownership(slot)
            self._bump(self._free_word if to == FREE else self._ready_word)
        finally:
            self._unlock()
        self._wake_free() if to == FREE else self._wake_ready()
        return True

    def abort(self, slot: int, lease: int) -> bool:
        """WRITING -> FREE (generation unchanged). Logged no-op in any other state."""
        return self._finalise("abort", slot, lease, WRITING, FREE)

    def claim_ready(self, slot: int | None = None, generation: int | None = None):
        """READY -> READING. With ``slot`` None: the oldest READY payload, or None.

        With a slot: the generation must match, else :class:`StaleSlotError`;
        a READING slot raises :class:`SlotBusyError`.
        Returns ``(slot, lease, generation, nbytes)``.
        """
        self._lock()
        try:
            if slot is None:
                slot = self._oldest_ready()
                if slot is None:
                    return None
            else:
                st, gen = int(self.state[slot]), int(self.gen[slot])
                if gen != generation or st not in (READY, READING):
                    raise StaleSlotError(
                        f"slot {slot} generation {generation} is gone (slot is at generation {gen}, "
                        f"{SlotState(st).name}): the payload was consumed or dropped"
                    )
                if st == READING:
                    raise SlotBusyError(f"slot {slot} generation {generation} is leased by another reader")
            lease = self._take_ownership(slot)
            self.state[slot] = READING
            return slot, lease, int(self.gen[slot]), int(self.nbytes[slot])
        finally:
            self._unlock()

    def ack(self, slot: int, lease: int) -> bool:
        """READING -> FREE (consumed). Logged no-op in any other state."""
        return self._finalise("ack", slot, lease, READING, FREE)

    def nack(self, slot: int, lease: int) -> bool:
        """READING -> READY (payload kept, publish order kept). No-op otherwise."""
        return self._finalise("nack", slot, lease, READING, READY)

    # ----------------------------------------------------------- recovery --
    def owner_alive(self, slot: int) -> bool:
        """Is the process holding ``slot`` (WRITING/READING) still alive?"""
        if int(self.owner[slot]) == os.getpid():
            entry = _OWNED.get((*self._ident, slot))
            return entry is not None and entry[0] == int(self.lease[slot])
        return _sync.lock_held_elsewhere(self._fd, LOCK_OWNER_BASE + slot)

    def recover(self) -> int:
        """Reclaim slots whose owner died: WRITING -> FREE, READING -> READY."""
        freed = readied = 0
        self._lock()
        try:
            busy = np.flatnonzero((self.state == WRITING) | (self.state == READING))
            for slot in map(int, busy):
                if self.owner_alive(slot):
                    continue
                pid = int(self.owner[slot])
                if self.state[slot] == WRITING:
                    self.state[slot] = FREE
                    self.nbytes[slot] = 0
                    freed += 1
                    log.warning("recovered slot %d: writer pid %d died mid-write -> FREE", slot, pid)
                else:
                    self.state[slot] = READY
                    readied += 1
                    log.warning("recovered slot %d: reader pid %d died holding a lease -> READY "
                                "(generation %d kept)", slot, pid, int(self.gen[slot]))
                self.owner[slot] = 0
                self.lease[slot] += 1  # any late finaliser of the dead owner is now a no-op
            if freed or readied:
                self.header["recovered"] += freed + readied
                if freed:
                    self._bump(self._free_word)
                if readied:
                    self._bump(self._ready_word)
        finally:
            self._unlock()
        if freed:
            self._wake_free()
        if readied:
            self._wake_ready()
        return freed + readied
