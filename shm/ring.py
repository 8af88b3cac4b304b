"""RingBuffer: a shared-memory ring of payload slots, usable from many processes.

Producers ``put`` (or ``reserve`` + ``append``/``set`` + ``publish``) payloads
in place into FREE slots; readers ``claim`` READY payloads, read them as
zero-copy views and ``ack`` (consume) or ``nack`` (give back) them.  The
server exposes the same ring over the network through the same state machine
(:mod:`shm.state`).

Why one module past 400 lines: it is the ring's whole public surface, one class
(create/attach/close, put and reserve, claim one or a batch, recovery, stats);
the state machine, the frame format and the leases it hands out live in their
own modules, so every method here is a short composition of them.
"""

from __future__ import annotations

import collections
import errno
import logging
import stat
import sys
import mmap
import os
import weakref
import time
from typing import Any, Mapping

import numpy as np

from . import _sync
from .errors import (
    ForkedHandleError,
    PayloadTooLargeError,
    RingEmptyError,
    RingError,
    RingFullError,
    RingLayoutError,
    SlotBusyError,
    StaleSlotError,
)
from .frame import encode_into, encoded_size, prepare
from .layout import (
    HEADER_BYTES,
    LOCK_SERVER,
    MAX_HOST_BYTES,
    MAX_PORTS,
    ON_FULL_CODES,
    ON_FULL_NAMES,
    RING_HEADER,
    RING_MAGIC,
    RING_VERSION,
    SLOT_HEADROOM,
    SLOT_RECORD,
    segment_size,
)
from .ref import SlotRef, valid_ring_name
from .leases import LeaseBatch, SlotLease, SlotWriter
from .state import DEAD, PINNED, READING, READY, WRITING, SlotState, SlotTable

log = logging.getLogger("shm.ring")

SHM_DIR = "/dev/shm"
#: longest single futex sleep; waits re-check (and run recovery) at least this often
WAIT_SLICE_S = 0.25
DEFAULT_TIMEOUT_S = 30.0


def _segment_path(name: str) -> str:
    if not valid_ring_name(name):
        raise ValueError(
            f"ring name {name!r} is invalid: use 1-200 characters from [A-Za-z0-9._-]"
        )
    return os.path.join(SHM_DIR, name)


def _deadline(timeout: float | None, default: float) -> float:
    t = default if timeout is None else timeout
    if t < 0:
        raise ValueError(f"timeout must be >= 0 seconds, got {t}")
    return time.monotonic() + t


#: every open handle of this process: a forked child gives each a description of its own
_OPEN_HANDLES: "weakref.WeakSet[RingBuffer]" = weakref.WeakSet()
#: every mapping of a ring segment made here, by address: (its mmap object (weakly), segment ident, length);
#: kept apart from the handles, since a mapping outlives its handle while views of it are alive
_MAPPINGS: dict[int, tuple] = {}


def _disown_after_fork() -> None:
    """In a forked child: let go of the parent's open file descriptions of its rings. They
    carry the parent's slot and ownership locks; a child keeping them could take a lock
    its parent holds, and would keep a killed parent's slots looking owned (never
    recovered) for as long as it lives. Each handle then becomes the child's own: new
    puts and claims work, while what the parent held (leases, writers, views inherited
    through the fork) stays the parent's and cannot be finalised here."""
    maps: dict = collections.defaultdict(list)
    for addr, (mm_ref, ident, length) in list(_MAPPINGS.items()):
        mm = mm_ref()
        if mm is None or mm.closed:  # unmapped: nothing of it is left here
            _MAPPINGS.pop(addr, None)
            continue
        maps[ident].append((addr, length))
    handles: dict = collections.defaultdict(list)
    for ring in list(_OPEN_HANDLES):
        handles[ring._ident].append(ring)
    for ident in set(maps) | set(handles):
        rings = handles.get(ident, [])
        try:
            _sync.disown_description(ident, maps.get(ident, []), [r._fd for r in rings])
        except OSError as exc:  # pragma: no cover - /proc unavailable, or a failed remap
            log.warning("forked child: could not let go of the parent's locks of ring segment %s (%s): a parent "
                        "killed while this process lives keeps its slots until this process exits, and its "
                        "handles refuse to change the ring here (attach the ring again)", ident, exc)
            continue
        for ring in rings:
            ring._adopt_after_fork()


os.register_at_fork(after_in_child=_disown_after_fork)


class RingBuffer:
    """A ring of ``slots`` payload slots of ``slot_bytes`` each in ``/dev/shm``.

    Create it once (``RingBuffer.create``), attach from any number of
    processes (``RingBuffer.attach``; use the *spawn* start method, never fork
    a process that has one open). Every blocking call has a deadline:
    ``timeout=None`` means the ring's ``default_timeout`` (30 s), ``0`` means
    do not wait.
    """

    def __init__(self, name: str, fd: int, mm: mmap.mmap, *, on_full: str | None, default_timeout: float,
                 owner: bool):
        self._name = name
        self._fd = fd
        self._pid = _sync.pid  # the process that opened it: a forked child must not use it
        self._mm = mm
        self._owner = owner
        self._closed = False
        self._u8 = np.frombuffer(mm, dtype=np.uint8)
        st = os.fstat(fd)
        self._ident = (st.st_dev, st.st_ino)
        _MAPPINGS[self._u8.ctypes.data] = (weakref.ref(mm), self._ident, len(mm))
        self._hdr = self._u8[:RING_HEADER.itemsize].view(RING_HEADER).reshape(())
        h = self._hdr
        if bytes(h["magic"]) != RING_MAGIC:
            raise RingLayoutError(f"/dev/shm/{name} is not a ring (bad magic)")
        if int(h["version"]) != RING_VERSION:
            raise RingLayoutError(
                f"ring {name!r} has layout version {int(h['version'])}; this build reads {RING_VERSION}"
            )
        self._slots = int(h["slots"])
        self._slot_bytes = int(h["slot_bytes"])
        self._stride = int(h["slot_stride"])
        self._data_off = int(h["data_off"])
        ctrl_off = int(h["ctrl_off"])
        size, c_off, d_off, stride = segment_size(self._slots, self._slot_bytes)
        if (c_off, d_off, stride) != (ctrl_off, self._data_off, self._stride) or size > len(mm):
            raise RingLayoutError(f"ring {name!r}: header is inconsistent with the segment size")
        ctrl = self._u8[ctrl_off : ctrl_off + self._slots * SLOT_RECORD.itemsize].view(SLOT_RECORD)
        base = self._u8.ctypes.data
        self._table = SlotTable(
            fd, self._hdr, ctrl, base,
            RING_HEADER.fields["ready_futex"][1], RING_HEADER.fields["free_futex"][1],
        )
        code = int(h["on_full"]) if on_full is None else ON_FULL_CODES.get(on_full)
        if code not in ON_FULL_NAMES:
            raise ValueError(f"on_full must be one of {sorted(ON_FULL_CODES)}, got {on_full!r}")
        self._on_full = ON_FULL_NAMES[code]
        self.default_timeout = float(default_timeout)
        self._serving = False
        self._ring_id = bytes(h["ring_id"]).hex()
        #: leases whose payload views may be alive (their slots must outlive close())
        self._viewed: "weakref.WeakSet[SlotLease]" = weakref.WeakSet()
        _OPEN_HANDLES.add(self)

    # ------------------------------------------------------------ creation --
    @classmethod
    def create(cls, name: str, *, slots: int, slot_bytes: int, on_full: str = "block", mode: int = 0o600,
               exist_ok: bool = False, default_timeout: float = DEFAULT_TIMEOUT_S) -> "RingBuffer":
        """Create (and pre-fault) a new ring segment ``/dev/shm/<name>``.

        Raises ``FileExistsError`` if it exists (unless ``exist_ok``, which
        attaches after checking the geometry matches), ``ValueError`` for bad
        arguments and ``OSError(ENOSPC)`` with a hint when /dev/shm is too small.
        """
        path = _segment_path(name)
        if not isinstance(slots, int) or not 1 <= slots <= 65536:
            raise ValueError(f"slots must be an int in [1, 65536], got {slots!r}")
        if not isinstance(slot_bytes, int) or slot_bytes < 4096:
            raise ValueError(f"slot_bytes must be an int >= 4096, got {slot_bytes!r}")
        if on_full not in ON_FULL_CODES:
            raise ValueError(f"on_full must be one of {sorted(ON_FULL_CODES)}, got {on_full!r}")
        size, ctrl_off, data_off, stride = segment_size(slots, slot_bytes)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)
        except FileExistsError:
            if not exist_ok:
                raise FileExistsError(
                    f"ring {name!r} already exists ({path}); attach to it with RingBuffer.attach, "
                    f"or remove it with RingBuffer.unlink_name({name!r}) if no process uses it"
                ) from None
            ring = cls.attach(name, on_full=on_full, default_timeout=default_timeout,
                              allow_shared=mode & 0o077 != 0)
            if (ring.slots, ring.slot_bytes) != (slots, slot_bytes):
                ring.close()
                raise RingLayoutError(
                    f"ring {name!r} exists with slots={ring.slots}, slot_bytes={ring.slot_bytes}; "
                    f"asked for slots={slots}, slot_bytes={slot_bytes}"
                )
            return ring
        try:
            os.fchmod(fd, mode)
            try:
                os.posix_fallocate(fd, 0, size)  # reserve tmpfs pages now: no SIGBUS later
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    st = os.statvfs(SHM_DIR)
                    raise OSError(
                        errno.ENOSPC,
                        f"/dev/shm has {st.f_bavail * st.f_frsize} bytes free, ring {name!r} needs {size}; "
                        f"use fewer/smaller slots or enlarge /dev/shm (docker: --shm-size)",
                    ) from None
                raise
            mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
            u8 = np.frombuffer(mm, dtype=np.uint8)
            u8[data_off::mmap.PAGESIZE] = 0  # pre-fault every data page (first touch is ~8x slower)
            hdr = u8[:RING_HEADER.itemsize].view(RING_HEADER).reshape(())
            hdr["version"] = RING_VERSION
            hdr["header_bytes"] = HEADER_BYTES
            hdr["slots"] = slots
            hdr["on_full"] = ON_FULL_CODES[on_full]
            hdr["slot_bytes"] = slot_bytes
            hdr["slot_stride"] = stride
            hdr["ctrl_off"] = ctrl_off
            hdr["data_off"] = data_off
            hdr["created_ns"] = time.time_ns()
            hdr["ring_id"] = np.void(os.urandom(16))
            hdr["owner_uid"] = os.geteuid()
            hdr["magic"] = RING_MAGIC  # last: attachers see a complete header or none
            del u8, hdr
        except BaseException:
            os.close(fd)
            try:
                os.unlink(path)
            except OSError:
                pass
            raise
        log.info("created ring %r: %d slots x %d bytes (%d bytes of /dev/shm)", name, slots, slot_bytes, size)
        return cls(name, fd, mm, on_full=None, default_timeout=default_timeout, owner=True)

    @classmethod
    def attach(cls, name: str, *, on_full: str | None = None,
               default_timeout: float = DEFAULT_TIMEOUT_S, allow_shared: bool = False) -> "RingBuffer":
        """Attach to an existing ring. ``on_full`` overrides the ring's policy for this handle.

        Refuses (``PermissionError``) a segment owned by another user or readable
        or writable by group/others (mode wider than 0600): such a segment may have
        been planted to read every payload. ``allow_shared=True`` accepts one on purpose.
        """
        path = _segment_path(name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"ring {name!r} does not exist ({path}); create it first "
                f"(RingBuffer.create or `ucxx-transport serve --create`)"
            ) from None
        try:
            st = os.fstat(fd)
            if not allow_shared and (st.st_uid != os.geteuid() or st.st_mode & 0o077 or not stat.S_ISREG(st.st_mode)):
                raise PermissionError(
                    f"refusing to attach {path}: owned by uid {st.st_uid} with mode {stat.S_IMODE(st.st_mode):04o} "
                    f"(this process is uid {os.geteuid()}; a ring must be yours and mode 0600). If another user "
                    f"created it, remove it and create your own; pass allow_shared=True only if you share it on purpose"
                )
            size = st.st_size
            if size < HEADER_BYTES:
                raise RingLayoutError(f"{path} is {size} bytes: too small to be a ring")
            mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
            for _ in range(100):  # a creator may still be writing the header
                if mm[:8] == RING_MAGIC:
                    break
                time.sleep(0.01)
            return cls(name, fd, mm, on_full=on_full, default_timeout=default_timeout, owner=False)
        except BaseException:
            os.close(fd)
            raise

    @staticmethod
    def unlink_name(name: str) -> bool:
        """Remove the segment of ring ``name``; True if it existed."""
        try:
            os.unlink(_segment_path(name))
            return True
        except FileNotFoundError:
            return False

    # ----------------------------------------------------------- lifetime --
    def close(self) -> None:
        """Unmap and close this handle (idempotent). Slots this handle still
        holds are reclaimed by the next recovery, like a dead process's."""
        if self._closed:
            return
        self._closed = True
        if self._pid != _sync.pid:  # inherited through fork: the parent's, not to be closed here
            return
        if any(lease.views_alive for lease in list(self._viewed)):
            # a view of a payload of this ring is alive: its slot must stay ours (pinned)
            # and mapped until that view is gone, so the mapping and the locks stay
            log.info("ring %r closed while payload views are alive: their slots stay pinned until the views "
                     "are gone (or this process exits)", self._name)
            return
        self._table.forget_ownerships()
        self._table = None
        self._hdr = None
        self._u8 = None
        try:
            self._mm.close()
        except BufferError:
            log.debug("ring %r: payload views still alive; mapping freed when they are", self._name)
        else:
            _OPEN_HANDLES.discard(self)  # unmapped: a fork has nothing of it left to let go of
        os.close(self._fd)

    def unlink(self) -> None:
        """Remove the segment name; processes already attached keep their mapping."""
        self.unlink_name(self._name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):  # pragma: no cover
        if sys.is_finalizing() or not hasattr(self, "_closed"):
            return  # interpreter exit (the OS unmaps and unlocks), or a handle that never opened
        try:
            self.close()
        except OSError as exc:  # the descriptor is gone already
            log.debug("closing ring handle %r: %s", getattr(self, "_name", "?"), exc)

    def _adopt_after_fork(self) -> None:
        """In a forked child, once its descriptors refer to a description of its own: the
        handle is the child's (new claims, puts and recoveries work; what the parent held
        stays the parent's)."""
        self._pid = _sync.pid
        self._serving = False  # the server lock was the parent's description's
        if self._table is not None:
            self._table.adopt_after_fork()

    def _check_open(self):
        if self._closed:
            raise RingError(f"ring {self._name!r} handle is closed")
        if self._pid != _sync.pid:
            raise ForkedHandleError(
                f"ring {self._name!r}: this handle was opened by process {self._pid} and this process "
                f"({_sync.pid}) is a fork of it; a forked child must not change the ring through its parent's "
                f"handle (they would share slot locks). Attach the ring again here: "
                f"shm.RingBuffer.attach({self._name!r}), or start workers with the 'spawn' method")

    # --------------------------------------------------------- properties --
    @property
    def name(self) -> str:
        """The ring's name (its segment is /dev/shm/<name>)."""
        return self._name

    @property
    def slots(self) -> int:
        """How many slots the ring has."""
        return self._slots

    @property
    def slot_bytes(self) -> int:
        """Bytes of payload frame one slot holds."""
        return self._slot_bytes

    @property
    def ring_id(self) -> str:
        """This ring's identity: 32 hex digits, random at create time (unique
        across hosts and across re-creation under the same name)."""
        return self._ring_id

    def is_current(self) -> bool:
        """Does ``/dev/shm/<name>`` still name this segment (not unlinked or replaced)?"""
        try:
            st = os.stat(os.path.join(SHM_DIR, self._name))
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino) == self._ident

    @property
    def on_full(self) -> str:
        """What put does when no slot is FREE: "block", "error" or "drop_oldest"."""
        return self._on_full

    def slot_buffer(self, slot: int, nbytes: int | None = None) -> memoryview:
        """Writable memoryview of slot ``slot``'s frame region (first ``nbytes``)."""
        off = self._data_off + slot * self._stride + SLOT_HEADROOM
        n = self._slot_bytes if nbytes is None else nbytes
        return memoryview(self._mm)[off : off + n]

    def slot_array(self, slot: int, nbytes: int | None = None, *, headroom: bool = False) -> np.ndarray:
        """uint8 view of the slot's frame (first ``nbytes``); with ``headroom``,
        starting SLOT_HEADROOM bytes earlier (the page-aligned slot start)."""
        off = self._data_off + slot * self._stride + (0 if headroom else SLOT_HEADROOM)
        n = (self._slot_bytes if nbytes is None else nbytes) + (SLOT_HEADROOM if headroom else 0)
        return self._u8[off : off + n]

    # -------------------------------------------------------------- write --
    def reserve(self, *, timeout: float | None = None) -> "SlotWriter":
        """Claim a FREE slot for writing in place (FREE -> WRITING).

        When none is FREE the ring's ``on_full`` policy applies: ``block``
        waits up to ``timeout`` then raises :class:`RingFullError`; ``error``
        raises at once; ``drop_oldest`` drops the oldest READY payload (its ref
        turns STALE; counted in ``stats()['drops']``).
        """
        self._check_open()
        deadline = _deadline(timeout if self._on_full == "block" else 0, self.default_timeout)
        t = self._table
        got = t.claim_free(drop_oldest=self._on_full == "drop_oldest")
        if got is None:
            got = self._wait_for(t.free_addr, t.free_word,
                                 lambda: t.claim_free(drop_oldest=False), deadline)
        if got is None:
            counts = self.state_counts()
            raise RingFullError(
                f"ring {self._name!r}: no FREE slot within the timeout ({counts}); "
                f"consumers are not keeping up -- add consumers or slots, or use on_full='drop_oldest'"
            )
        slot, lease, _ = got
        return SlotWriter(self, slot, lease)

    def _wait_for(self, addr: int, word_fn, attempt, deadline: float):
        """Retry ``attempt`` until it returns non-None or ``deadline`` passes,
        sleeping on the ring's futex at ``addr`` in between (no polling) and
        running crash recovery before each sleep slice. Returns None on timeout."""
        t = self._table
        while True:
            word = word_fn()
            got = attempt()
            if got is not None:
                return got
            if t.recover():
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            _sync.futex_wait(addr, word, min(remaining, WAIT_SLICE_S))

    def put(self, payload: Any, *, meta: Mapping | None = None, timeout: float | None = None) -> SlotRef:
        """Write ``payload`` (mapping name -> numpy array, or bytes-like) into a
        slot and publish it. Returns its :class:`SlotRef`.

        Raises :class:`PayloadTooLargeError` before claiming a slot if it cannot
        fit, :class:`RingFullError` on timeout; on any error nothing is published
        and the slot goes back to FREE.
        """
        payload = prepare(payload)  # torch tensors viewed and structure flattened once
        need = encoded_size(payload, meta)
        if need > self._slot_bytes:
            raise PayloadTooLargeError(need, self._slot_bytes)
        w = self.reserve(timeout=timeout)
        try:
            n = encode_into(w.buffer, payload, meta)
        except BaseException:
            w.abort()
            raise
        return w._publish_frame(n)

    # --------------------------------------------------------------- read --
    def claim(self, ref: SlotRef | None = None, *, timeout: float | None = None) -> "SlotLease":
        """Lease a READY payload for reading (READY -> READING).

        ``ref=None`` takes the oldest READY payload (publish order), waiting up
        to ``timeout`` (then :class:`RingEmptyError`). With a ref: its
        generation must still be current (else :class:`StaleSlotError`, final);
        if another reader holds it, waits up to ``timeout`` (default 0) then
        raises :class:`SlotBusyError`.
        """
        self._check_open()
        t = self._table
        t.apply_pending()
        if ref is not None:
            self._check_ref(ref)
        deadline = _deadline(timeout if ref is None else (timeout or 0), self.default_timeout)
        slot_, gen_ = (None, None) if ref is None else (ref.slot, ref.generation)
        busy: list[str] = []  # the message: an exception kept here would tie this frame into a cycle

        def attempt():
            try:
                return t.claim_ready(slot_, gen_)
            except SlotBusyError as exc:
                busy[:] = [str(exc)]
                return None

        got = attempt()
        if got is None and (busy or ref is None):
            got = self._wait_for(t.ready_addr, t.ready_word, attempt, deadline)
        if got is None:
            if busy:
                raise SlotBusyError(busy[0])
            raise RingEmptyError(f"ring {self._name!r}: no READY payload within the timeout")
        return SlotLease(self, *got)

    def _check_ref(self, ref: SlotRef) -> None:
        if ref.ring != self._name:
            raise ValueError(f"ref is for ring {ref.ring!r}, this is ring {self._name!r}")
        if ref.ring_id is not None and ref.ring_id != self._ring_id:
            raise StaleSlotError(
                f"ref {ref.key} names ring id {ref.ring_id}, but ring {self._name!r} here is {self._ring_id}: "
                f"it was published by another host's ring or before this ring was re-created"
            )
        if not 0 <= ref.slot < self._slots:
            raise StaleSlotError(f"slot {ref.slot} is out of range for ring {self._name!r} ({self._slots} slots)")

    def try_claim(self, ref: SlotRef | None = None, *, max_nbytes: int = 0) -> "SlotLease | None":
        """Non-blocking claim: a lease, or None when nothing is READY (with
        ``max_nbytes``: nothing READY of at most that size; larger payloads stay
        READY). Stale/busy refs raise as in :meth:`claim`. Does not run recovery."""
        self._check_open()
        self._table.apply_pending()
        if ref is not None:
            self._check_ref(ref)
        got = self._table.claim_ready(None if ref is None else ref.slot, None if ref is None else ref.generation,
                                      max_nbytes=max_nbytes)
        if got is None:
            return None
        return SlotLease(self, *got)

    def _batch_slots(self, slots) -> np.ndarray:
        self._check_open()
        self._table.apply_pending()  # late finalisations queued by view callbacks, like every ring call
        slots = np.asarray(slots, np.int64)
        if len(slots):
            ordered = np.sort(slots)
            if ordered[0] < 0 or ordered[-1] >= self._slots:
                raise ValueError(f"slot out of range for ring {self._name!r} ({self._slots} slots)")
            if (ordered[1:] == ordered[:-1]).any():
                raise ValueError("a batch claim names a slot twice")
        return slots

    def claim_many(self, slots, generations) -> list:
        """Lease many payloads by (slot, generation) at once (one lock syscall for
        the batch, never waiting). Per item a :class:`SlotLease`, or the
        :class:`StaleSlotError` / :class:`SlotBusyError` it would have raised."""
        slots = self._batch_slots(slots)
        res = self._table.claim_many(slots, generations)
        t = self._table
        out: list = []
        for sl, g, le in zip(slots.tolist(), np.asarray(generations).tolist(), res.tolist()):
            if le > 0:
                out.append(SlotLease(self, sl, le, g, int(t.nbytes[sl])))
            elif le == 0:
                out.append(StaleSlotError(f"slot {sl} generation {g} is gone"))
            else:
                out.append(SlotBusyError(f"slot {sl} generation {g} is leased by another reader"))
        return out

    def claim_batch(self, slots, generations) -> tuple["LeaseBatch", np.ndarray]:
        """Like :meth:`claim_many` without an object per payload (the server's batch
        path): returns the claimed payloads as one :class:`LeaseBatch` (in request
        order) and a per-item code: the lease number (> 0), 0 STALE, -1 BUSY."""
        slots = self._batch_slots(slots)
        codes = self._table.claim_many(slots, generations)
        ok = codes > 0
        got = slots[ok]
        return LeaseBatch(self, got, codes[ok].astype(np.uint64), self._table.gen[got].copy(),
                          self._table.nbytes[got].astype(np.int64)), codes

    def claim_oldest_batch(self, n: int, max_nbytes: int = 0) -> "LeaseBatch":
        """Up to ``n`` READY payloads, oldest first (at most ``max_nbytes`` each when
        given), as one :class:`LeaseBatch`; never waits."""
        self._check_open()
        t = self._table
        ok = t.state == READY
        if max_nbytes:
            ok &= t.nbytes <= max_nbytes
        cand = np.flatnonzero(ok)
        if len(cand) > n:
            cand = cand[np.argpartition(t.seq[cand], n - 1)[:n]]
        cand = cand[np.argsort(t.seq[cand], kind="stable")]
        batch, _ = self.claim_batch(cand, t.gen[cand].copy())
        return batch

    def try_finalise_many(self, leases: list, ack) -> bool:
        """Ack (``ack`` true) or nack many leases of this ring with one lock syscall,
        never waiting. ``ack``: a bool, or one bool per lease; leases already
        finalised are skipped. A lease whose payload views are still alive is
        treated as :meth:`SlotLease.ack` / :meth:`SlotLease.nack` treat it (PINNED
        until the views are gone; a nack applied only then). False (nothing
        changed) when some slot's lock is busy: finalise those leases one by one."""
        acks = np.broadcast_to(np.asarray(ack, bool), (len(leases),))
        live = [i for i, le in enumerate(leases) if not le._done]
        if not live or self._closed:
            return not live
        held = [leases[i] for i in live]
        pinned: list[bool] = []

        def views_alive() -> list[bool]:  # run under the batch's locks: nothing can fail after it
            for le in held:
                le._payload = None  # our own reference; the caller's views keep the slot
            pinned.extend(le.views_alive for le in held)
            return pinned

        if self._table.finalise_many(np.array([le.slot for le in held], np.int64),
                                     np.array([le._lease for le in held], np.uint64), acks[live],
                                     views_alive) < 0:
            return False
        for le, a, p in zip(held, acks[live].tolist(), pinned):
            le._done = True
            if p:
                le._decision = a
                if not le.views_alive:  # the last view went meanwhile: its callback saw no decision
                    self._table.finalise_soon(le.slot, le._lease, a)
        return True

    def wait_ready(self, timeout: float) -> bool:
        """Block (GIL released) until some slot may have become READY, or ``timeout``."""
        t = self._table
        if self.ready_count():
            return True
        word = t.ready_word()
        if self.ready_count():
            return True
        _sync.futex_wait(t.ready_addr, word, timeout)
        return self.ready_count() > 0

    def wake_waiters(self) -> None:
        """Wake every thread blocked in :meth:`wait_ready` (used at shutdown)."""
        self._table.signal_ready()

    # ---------------------------------------------------------- inspection --
    def ready_count(self) -> int:
        """Number of READY slots (a scan of slot states: never a drifting counter)."""
        return int(np.count_nonzero(self._table.state == READY))

    def state_counts(self) -> dict[str, int]:
        """Slots by state: FREE, WRITING, READY, READING, DEAD and PINNED (consumed, still
        viewed by its reader; see docs/RING.md)."""
        self._table.apply_pending()
        counts = np.bincount(self._table.state, minlength=len(SlotState))
        return {s.name: int(counts[s]) for s in SlotState}

    def recover(self) -> int:
        """Reclaim slots whose owner process died (WRITING -> FREE, READING ->
        READY). Returns how many. Never touches a slot whose owner is alive."""
        self._check_open()
        return self._table.recover()

    def stats(self) -> dict:
        """Counters (published, consumed, dropped, dead letters...) and slot states, as one dict."""
        c = self._table.ctrl
        return {
            "ring": self._name,
            "ring_id": self._ring_id,
            "slots": self._slots,
            "slot_bytes": self._slot_bytes,
            "on_full": self._on_full,
            "states": self.state_counts(),
            "published": int(c["generation"].sum()),
            "consumed": int(c["consumed"].sum()),
            "drops": int(c["drops"].sum()),
            "recovered": int(c["recovered"].sum()),
            "dead_letters": int(c["dead"].sum()),
            "dead": self.dead_letters(),
        }

    def dead_letters(self) -> list[dict]:
        """Payloads in DEAD (readers failed to decode them DEAD_LETTER_AFTER times):
        ``[{slot, generation, nbytes, failures}]``. Read one with :meth:`read_dead`,
        free its slot with :meth:`discard_dead`."""
        t = self._table
        return [{"slot": int(i), "generation": int(t.gen[i]), "nbytes": int(t.nbytes[i]),
                 "failures": int(t.failures[i])} for i in np.flatnonzero(t.state == DEAD)]

    def read_dead(self, slot: int) -> bytes:
        """A copy of a DEAD payload's frame bytes, for inspection."""
        t = self._table
        if t.state[slot] != DEAD:
            raise RingError(f"slot {slot} is not DEAD (it is {SlotState(int(t.state[slot])).name})")
        return bytes(self.slot_buffer(slot, int(t.nbytes[slot])))

    def discard_dead(self, slot: int, generation: int) -> bool:
        """Free a DEAD slot (its payload is gone for good). False if it is not DEAD at ``generation``."""
        self._check_open()
        return self._table.discard_dead(slot, generation)

    def stuck_slots(self, probe_s: float = 0.05) -> list[int]:
        """Slots whose transition lock is held by another process now and still
        ``probe_s`` later: a process frozen mid-transition (only that slot stalls)."""
        t = self._table
        held = [i for i in range(self._slots) if t.lock_held_elsewhere(i)]
        if held:
            time.sleep(probe_s)
            held = [i for i in held if t.lock_held_elsewhere(i)]
        return held

    def slot_info(self) -> list[dict]:
        """Per slot: state, generation, nbytes, owner pid and how long its holder has had it (held_s)."""
        t = self._table
        now = time.time_ns()
        held = (WRITING, READING, PINNED)
        return [
            {"slot": i, "state": SlotState(int(t.state[i])).name, "generation": int(t.gen[i]),
             "nbytes": int(t.nbytes[i]), "owner_pid": int(t.owner[i]) or None,
             # how long its current holder has had it (a lease nobody finalises shows here)
             "held_s": (now - int(t.claimed_ns[i])) / 1e9 if int(t.state[i]) in held and t.claimed_ns[i] else None}
            for i in range(self._slots)
        ]

    # ---------------------------------------------------- server address ---
    def set_server_address(self, host: str, ports: list[int]) -> None:
        """Advertise a server for this ring: refs published from now on carry
        ``host``/``ports``. Held until :meth:`clear_server_address` or death of
        this process (liveness is an OFD lock, so a dead server is never advertised)."""
        hb = host.encode("utf-8")
        if len(hb) > MAX_HOST_BYTES or len(ports) > MAX_PORTS:
            raise ValueError(f"host must be <= {MAX_HOST_BYTES} bytes and at most {MAX_PORTS} ports")
        if not _sync.lock_acquire(self._fd, LOCK_SERVER, blocking=False):
            self._server_busy()
        # only the holder of LOCK_SERVER writes these; readers look at server_pid first
        h = self._hdr
        h["server_pid"] = 0
        h["server_host"] = hb
        p = np.zeros(MAX_PORTS, dtype=np.uint16)
        p[: len(ports)] = ports
        h["server_ports"] = p
        h["server_nports"] = len(ports)
        h["last_ports"] = p
        h["last_nports"] = len(ports)
        h["server_pid"] = os.getpid()
        self._serving = True

    def last_server_ports(self) -> list[int]:
        """The ports the most recent server of this ring listened on (kept after it
        stopped or died), so a restarted server can take them again."""
        h = self._hdr
        return [int(p) for p in h["last_ports"][: int(h["last_nports"])]]

    def _server_busy(self):
        raise RingError(
            f"ring {self._name!r} is already served by a live process (pid {int(self._hdr['server_pid'])}); "
            f"one server per ring"
        )

    def clear_server_address(self) -> None:
        """Stop advertising this process as the ring's server (refs published later carry no address)."""
        if not self._serving or self._closed:
            return
        self._hdr["server_pid"] = 0
        self._hdr["server_nports"] = 0
        _sync.lock_release(self._fd, LOCK_SERVER)
        self._serving = False

    def server_address(self) -> tuple[str, tuple[int, ...]] | None:
        """(host, ports) of the live server exposing this ring, or None."""
        h = self._hdr
        pid = int(h["server_pid"])
        if not pid:
            return None
        if not self._serving and not _sync.lock_held_elsewhere(self._fd, LOCK_SERVER):
            return None
        n = int(h["server_nports"])
        return bytes(h["server_host"]).rstrip(b"\0").decode("utf-8"), tuple(int(p) for p in h["server_ports"][:n])

    def _make_ref(self, slot: int, gen: int, nbytes: int) -> SlotRef:
        addr = self.server_address()
        if addr is None:
            return SlotRef(self._name, slot, gen, nbytes, ring_id=self._ring_id)
        return SlotRef(self._name, slot, gen, nbytes, host=addr[0], ports=addr[1], ring_id=self._ring_id)
