"""Payloads that a call consumed but could not hand out, because its caller was
interrupted while it waited (Ctrl-C in the calling thread).

A sync call's work runs on the UCX loop. Abandoning it when the caller is
interrupted would drop payloads that a server already counts as consumed (the
ACK went out, or was about to). So the work is left to finish within its own
deadline, and what it delivered is kept here. The next call that consumes
payloads first waits for such interrupted work still running (bounded by that
work's deadline), then gets what is kept for it: a ``fetch`` or ``fetch_many``
of the same refs, or a ``take`` from the same server. ``close()`` releases what
nobody asked for.
"""

from __future__ import annotations

import collections
import logging
import threading
import time

import shm

log = logging.getLogger("clients.kept")


class Kept:
    """Delivered payloads waiting for the next call that asks for them (thread-safe:
    filled on the UCX loop thread, emptied by callers' threads)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._by_key: dict = {}  # payload key -> Payload, from fetch / fetch_many
        self._taken: dict = collections.defaultdict(collections.deque)  # (host, ports) -> Payloads, from take
        self._running: dict = {}  # interrupted work still running: its outcome future -> (done event, deadline)

    def after_interrupt(self, outcome, keep, seconds: float) -> None:
        """A call was interrupted while its work runs on: ``outcome`` (a concurrent future)
        will hold its result, which ``keep`` stores here; the work ends within ``seconds``."""
        settled = threading.Event()
        with self._lock:
            self._running[outcome] = (settled, time.monotonic() + seconds)

        def done(f) -> None:
            try:
                if not f.cancelled() and f.exception() is None:
                    keep(f.result())
            finally:
                with self._lock:
                    self._running.pop(f, None)
                settled.set()

        outcome.add_done_callback(done)

    def settle(self) -> None:
        """Wait for interrupted work still running (each up to its own deadline), so
        that what it delivers is kept before the next call looks."""
        if not self._running:
            return
        with self._lock:
            running = list(self._running.values())
        for settled, deadline in running:
            if not settled.wait(max(0.0, deadline - time.monotonic())):
                log.warning("interrupted work did not end by its deadline: going on without it")

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_key) + sum(map(len, self._taken.values()))

    def keep(self, key, payload) -> None:
        """Keep one fetched payload under its key."""
        with self._lock:
            self._by_key[key] = payload
        log.warning("a fetch was interrupted after %s was consumed: kept for the next fetch of that ref", key)

    def keep_results(self, results) -> None:
        """Keep the payloads of a batch's results (``FetchResult`` objects) under their refs' keys."""
        self.keep_many([(_key(r.ref), r.payload) for r in results if r.payload is not None])

    def keep_many(self, pairs: list) -> None:
        """Keep fetched payloads, given as (key, payload) pairs."""
        with self._lock:
            self._by_key.update(pairs)
        if pairs:
            log.warning("a fetch_many was interrupted after %d payload(s) were consumed: kept for the next "
                        "fetch or fetch_many of those refs", len(pairs))

    def keep_taken(self, address: tuple, payloads) -> None:
        """Keep a take's payloads for the next take from ``address`` ((host, ports tuple))."""
        payloads = list(payloads)
        with self._lock:
            self._taken[address].extend(payloads)
        if payloads:
            log.warning("a take from %s:%s was interrupted after %d payload(s) were consumed: kept for the "
                        "next take from that server", address[0], list(address[1]), len(payloads))

    def pop(self, key):
        """The payload kept under ``key`` (no longer kept), or None."""
        if not self._by_key:
            return None
        with self._lock:
            return self._by_key.pop(key, None)

    def pop_taken(self, address: tuple, n: int) -> list:
        """Up to ``n`` payloads kept from takes from ``address`` (oldest first)."""
        if not self._taken:
            return []
        with self._lock:
            queue = self._taken.get(address)
            if not queue:
                return []
            out = [queue.popleft() for _ in range(min(n, len(queue)))]
            if not queue:
                del self._taken[address]
            return out

    def clear(self) -> int:
        """Release every kept payload (the client closes); how many there were."""
        with self._lock:
            payloads = list(self._by_key.values()) + [p for q in self._taken.values() for p in q]
            self._by_key.clear()
            self._taken.clear()
        for p in payloads:
            p.release()
        if payloads:
            log.warning("closing with %d payload(s) kept from interrupted calls that nobody asked for again: "
                        "released (they were consumed)", len(payloads))
        return len(payloads)


def _key(ref) -> tuple:
    """The payload key of a result's ref (a SlotRef, or the dict a caller passed)."""
    return ref.key if isinstance(ref, shm.SlotRef) else shm.SlotRef.from_dict(ref).key
