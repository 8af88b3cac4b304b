"""The same-host fast path: refs of a ring on this host are claimed straight from
shared memory, through the ring's own state machine (no network, no copy).

One :class:`LocalReader` per client. It owns the cache of attached rings (one
lock guards it: callers' threads, the UCX loop and executor threads all use it)
and claims, decodes and acks same-host refs one by one or a ring's batch at a
time. Attaching a ring (an mmap) and claiming (lock syscalls) block briefly, so
the client calls these from its caller's thread or an executor, never on its
UCX loop.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

import numpy as np
import psutil

import shm

from .errors import (
    AlreadyDeliveredError,
    CorruptPayloadError,
    ForkedClientError,
    ServerBusyError,
    StaleSlotError,
    TransportError,
    any_failed,
)
from .kept import Kept
from .ledger import Ledger

log = logging.getLogger("clients.local")

#: a ring name that did not attach locally is tried again after this long
RING_RETRY_S = 5.0
_ALONE = object()  # a same-host ref the batch leaves to the one-by-one path
#: how long a batch's one-by-one ACK waits for one slot's lock (a frozen process may hold it)
ACK_LOCK_TIMEOUT_S = 0.5


def _local_addresses() -> frozenset[str]:
    """Every name and address this host answers to (a ref naming one is on this host)."""
    addrs = {"127.0.0.1", "localhost", "::1", socket.gethostname()}
    for infos in psutil.net_if_addrs().values():
        for a in infos:
            if a.family in (socket.AF_INET, socket.AF_INET6):
                addrs.add(a.address.split("%")[0])
    return frozenset(addrs)


class LocalReader:
    """Claims same-host refs from shared memory for one client.

    ``enabled``: the client's ``local_fast_path`` (and a host-memory device);
    ``max_attempts``: claims of a slot another reader holds right now are tried
    this often (50 ms apart) before the ref fails as busy; ``kept``: where a batch
    interrupted after it consumed payloads leaves them for the next call."""

    def __init__(self, ledger: Ledger, kept: Kept, *, enabled: bool, max_attempts: int):
        self._ledger = ledger
        self._kept = kept
        self._pid = os.getpid()  # the ring handles cached here are this process's, not a fork's
        self.enabled = enabled
        self.max_attempts = max_attempts
        self._rings: dict[str, tuple[shm.RingBuffer | None, float]] = {}  # name -> (handle, attached at)
        self._rings_lock = threading.Lock()
        self._local_addrs = _local_addresses()

    def may_be_here(self, ref: shm.SlotRef) -> bool:
        """Could ``ref`` name a ring of this host (worth a look at shared memory)? Decided
        from the ref alone, touching no ring: safe and cheap on the UCX loop, so a ref of
        another host costs no hop to an executor."""
        return self.enabled and self._names_this_host(ref)

    def _names_this_host(self, ref: shm.SlotRef) -> bool:
        """Does ``ref`` name this host (or no host at all)?"""
        return ref.host is None or ref.host in self._local_addrs

    def ring_for(self, ref: shm.SlotRef) -> shm.RingBuffer | None:
        """The ring of ``ref`` for the local fast path, or None (use the network)."""
        if not self.enabled:
            return None
        return self.ring_here(ref)

    def clear(self) -> None:
        """Forget the cached handles (each closes once no payload view uses it)."""
        with self._rings_lock:
            self._rings.clear()

    def ring_here(self, ref: shm.SlotRef) -> shm.RingBuffer | None:
        """This host's handle of the very ring ``ref`` names (same ring id), or None.

        A cached handle whose segment was unlinked or replaced (a ring re-created
        under the same name) is dropped and the name attached again; a name that
        did not attach is tried again after RING_RETRY_S.
        """
        if not self._names_this_host(ref):
            return None
        if self._pid != os.getpid():
            raise ForkedClientError(self._pid, os.getpid())
        with self._rings_lock:
            ring, checked = self._rings.get(ref.ring, (None, -RING_RETRY_S))
            now = time.monotonic()
            if ring is not None and not ring.is_current():
                log.info("ring %r was removed or re-created: dropping the cached handle", ref.ring)
                ring = None  # closed by GC once no payload view uses it
                checked = -RING_RETRY_S
            if ring is None and now - checked >= RING_RETRY_S:
                try:
                    ring = shm.RingBuffer.attach(ref.ring)
                except (FileNotFoundError, PermissionError, shm.RingError, OSError, ValueError) as exc:
                    log.debug("ring %r not attachable here: %s", ref.ring, exc)
                    ring = None
                self._rings[ref.ring] = (ring, now)
        if ring is None:
            return None
        if ref.ring_id is not None and ring.ring_id != ref.ring_id:
            if ref.host is not None:  # this host's ring of that name is another ring now
                raise StaleSlotError(f"ref {ref.key}: ring {ref.ring!r} on this host is now ring id "
                                     f"{ring.ring_id} (removed and re-created): the payload is gone")
            return None  # perhaps another host's ring of the same name
        return ring

    def fetch(self, ref: shm.SlotRef) -> shm.Payload | None:
        got = self.claim(ref)
        if got is None:
            return None
        payload, lease = got
        lease.ack()  # consumed now, like a network fetch; the slot stays PINNED while views of it live
        return payload

    def fetch_many(self, ring: shm.RingBuffer, refs: list) -> list:
        """Same-host refs of one ring, claimed, decoded and acked together (one lock
        syscall each way, one view anchor for the batch: the slots are freed together
        once no view of any of these payloads is left): per ref its Payload or the
        error it would have raised. Refs that the batch cannot settle (a slot named
        twice, a slot busy right now, a repeat delivery) go through :meth:`fetch` one
        by one, with its retries."""
        t0 = time.perf_counter()
        n = len(refs)
        keys = [r.key for r in refs]
        slots = [r.slot for r in refs]
        repeats = self._ledger.seen_of(keys)  # delivered before: the one-by-one path drops them
        if not repeats and len(set(slots)) == n:
            idx = list(range(n))  # the usual batch: every ref new, every slot named once
        else:
            first: dict[int, int] = {}  # slot -> index of the first ref naming it
            for j, (slot, key) in enumerate(zip(slots, keys)):
                if slot not in first and key not in repeats:
                    first[slot] = j
            idx = list(first.values())
        out: list = [_ALONE] * n
        claimed: list = []
        results: list = []
        try:
            batch, codes = ring.claim_batch([slots[j] for j in idx], [refs[j].generation for j in idx])
        except ValueError:  # a slot beyond this ring's size: each ref gets its own error below
            batch, codes = None, np.zeros(0, np.int64)
        try:
            if batch is not None and len(batch) == len(idx):
                claimed = idx
            else:
                claimed = []
                for j, code in zip(idx, codes.tolist()):
                    if code > 0:
                        claimed.append(j)
                    elif code == 0:
                        self._ledger.count("stale")
                        out[j] = StaleSlotError(f"local claim of {keys[j]}: slot {slots[j]} generation "
                                                f"{refs[j].generation} is gone")
                    # BUSY: left to the one-by-one path, which retries
            if claimed:
                results = batch.payloads()
                ok = range(len(claimed))
                broken = [k for k, p in enumerate(results) if isinstance(p, shm.FrameError)] \
                    if any_failed(results, shm.FrameError) else []
                for k in broken:
                    self._give_back_undecodable(batch, k)
                    results[k] = CorruptPayloadError(f"local frame of {keys[claimed[k]]}: {results[k]}")
                if broken:
                    ok = sorted(set(ok) - set(broken))
                if not batch.finalise(True):  # some slot's lock is busy: one by one, briefly each
                    acked = []
                    for k in ok:
                        try:
                            batch.finalise_item(k, True, lock_timeout=ACK_LOCK_TIMEOUT_S)
                            acked.append(k)
                        except shm.SlotLockTimeoutError as exc:  # that slot only (a frozen process holds its lock)
                            results[k] = ServerBusyError(f"local ack of {keys[claimed[k]]}: {exc}")  # payload dropped:
                            batch.give_back_soon(k)  # back to READY as soon as the lock is free
                    ok = acked
                for j, result in zip(claimed, results):
                    out[j] = result
                results = []  # (the payloads live on in out)
                if ok:
                    whole = len(ok) == n  # (every ref claimed and acked: the usual batch)
                    fresh = self._ledger.remember_batch(keys if whole else [keys[claimed[k]] for k in ok],
                                                        "local_fetches",
                                                        (batch.nbytes if whole else batch.nbytes[list(ok)]).tolist(),
                                                        (time.perf_counter() - t0) / len(ok))
                    for k, new in ([] if all(fresh) else zip(ok, fresh)):
                        if not new:  # delivered meanwhile by another path (a replay after a crash): acked, dropped
                            j = claimed[k]
                            out[j].release()
                            out[j] = AlreadyDeliveredError(f"{keys[j]} was already delivered to this client "
                                                           f"(ACKed again, dropped)")
            if len(claimed) < n:
                for j in [j for j, o in enumerate(out) if o is _ALONE]:
                    try:
                        out[j] = self.fetch(refs[j])
                    except (TransportError, shm.RingError) as exc:
                        out[j] = exc
        except BaseException:  # e.g. Ctrl-C: what was not acked goes back to READY, what was is kept
            held = [(keys[j], o) for j, o in enumerate(out) if isinstance(o, shm.Payload)]
            for k, p in enumerate(results):
                if isinstance(p, shm.Payload):
                    if batch.done[k]:  # acked: consumed, kept for the next call
                        held.append((keys[claimed[k]], p))
                    else:  # never handed out: its views go now, so the give-back below is not deferred
                        p.release()
            results = None
            if batch is not None:
                batch.abandon()
            self._kept.keep_many(held)
            raise
        return out

    @staticmethod
    def _give_back_undecodable(batch: shm.LeaseBatch, k: int) -> None:
        try:
            batch.finalise_item(k, False, undecodable=True, lock_timeout=ACK_LOCK_TIMEOUT_S)
        except shm.SlotLockTimeoutError:  # a frozen process holds its lock: given back later, uncounted
            batch.give_back_soon(k)

    def claim(self, ref: shm.SlotRef):
        """(payload, lease) claimed from this host's shared memory, or None."""
        ring = self.ring_for(ref)
        if ring is None:
            return None
        t0 = time.perf_counter()
        last = ""  # the message, not the exception: its traceback would tie this frame (and its
        # caller's, holding a batch's payloads) into a cycle that only the garbage collector frees
        for attempt in range(self.max_attempts):
            try:
                lease = ring.claim(ref, timeout=0 if attempt == 0 else 0.05)
                break
            except shm.StaleSlotError as exc:
                self._ledger.count("stale")
                raise StaleSlotError(str(exc)) from None
            except shm.SlotBusyError as exc:
                last = str(exc)
                self._ledger.count("retries")
        else:
            raise ServerBusyError(f"local claim of {ref.key}: {last}")
        if self._ledger.seen(ref.key):  # served again after a crash between our ACK and its apply
            lease.ack()
            self._ledger.count("duplicates_dropped")
            raise AlreadyDeliveredError(f"{ref.key} was already delivered to this client (ACKed again, dropped)")
        try:
            payload = lease.payload
        except shm.FrameError as exc:
            lease.nack(undecodable=True)
            raise CorruptPayloadError(f"local frame of {ref.key}: {exc}") from exc
        self._ledger.remember(ref.key)
        self._ledger.count("local_fetches")
        self._ledger.count("bytes", lease.nbytes)
        self._ledger.add_latency(time.perf_counter() - t0)
        return payload, lease
