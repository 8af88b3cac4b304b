"""Payloads that a call consumed but could not hand out, because its caller was
interrupted while it waited (Ctrl-C in the calling thread), or, for an async call,
cancelled its ``await`` (``asyncio.wait_for`` ran out, a task group ended).

A sync call's work runs on the UCX loop. Abandoning it when the caller is
interrupted would drop payloads that a server already counts as consumed (the
ACK went out, or was about to). So the work is left to finish within its own
deadline, and what it delivered is kept here, with the fields it was asked for.
The next call that asks for those payloads gets them: a ``fetch`` or
``fetch_many`` of the same refs (which first waits for interrupted work on any
of those refs to end, within that work's deadline), or a ``take`` from the same
server (which waits for an interrupted take from there at most as long as it
would wait for payloads, its ``wait``). ``close()`` waits for interrupted work
(up to its timeout), then releases what nobody asked for.
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
    filled on the UCX loop thread, emptied by callers' threads). Each is kept with
    the ``fields`` its call asked for (None: the whole payload)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._by_key: dict = {}  # payload key -> (Payload, fields), from fetch / fetch_many
        self._taken: dict = collections.defaultdict(collections.deque)  # (host, ports) -> (Payload, fields)
        self._running: dict = {}  # interrupted work still running: outcome future -> (event, deadline, keys)
        self._closed = False

    # ------------------------------------------------- interrupted work ---
    def after_interrupt(self, outcome, keep, seconds: float, keys=None) -> None:
        """A call was interrupted while its work runs on: ``outcome`` (a concurrent future)
        will hold its result, which ``keep`` stores here; the work ends within ``seconds``.
        ``keys``: the payload keys it fetches (for a take: ``("take", address)``)."""
        settled = threading.Event()
        with self._lock:
            self._running[outcome] = (settled, time.monotonic() + seconds, frozenset(keys or ()))

        def done(f) -> None:
            try:
                if not f.cancelled() and f.exception() is None:
                    keep(f.result())
            finally:
                with self._lock:
                    self._running.pop(f, None)
                settled.set()

        outcome.add_done_callback(done)

    def settle(self, keys=None, limit: float | None = None) -> None:
        """Wait for interrupted work that fetches any of ``keys`` (None: all work), each up
        to its own deadline (and at most ``limit`` s in all), so that what it delivers is
        kept before the caller looks."""
        if not self._running:
            return
        wanted = None if keys is None else set(keys)
        with self._lock:
            running = [(ev, dl) for ev, dl, ks in self._running.values() if wanted is None or not wanted.isdisjoint(ks)]
        end = None if limit is None else time.monotonic() + limit
        for settled, deadline in running:
            if end is not None:
                deadline = min(deadline, end)
            if not settled.wait(max(0.0, deadline - time.monotonic())):
                log.warning("interrupted work did not end by its deadline: going on without it")

    # --------------------------------------------------------- keeping ---
    def any(self) -> bool:
        """Is anything kept, or interrupted work still running? (a cheap check, no lock)"""
        return bool(self._by_key or self._taken or self._running)

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_key) + sum(map(len, self._taken.values()))

    def keep(self, key, payload, fields=None, cancelled: bool = False) -> None:
        """Keep one fetched payload under its key."""
        self.keep_many([(key, payload)], fields, cancelled)

    def keep_results(self, results, fields=None, cancelled: bool = False) -> None:
        """Keep the payloads of a batch's results (``FetchResult`` objects) under their refs' keys."""
        self.keep_many([(_key(r.ref), r.payload) for r in results if r.payload is not None], fields, cancelled)

    def keep_many(self, pairs: list, fields=None, cancelled: bool = False) -> None:
        """Keep fetched payloads, given as (key, payload) pairs. ``cancelled``: by an async
        call its caller cancelled (routine under ``asyncio.wait_for``: logged at INFO, not
        as a warning like a Ctrl-C)."""
        if not pairs:
            return
        with self._lock:
            closed = self._closed
            if not closed:
                self._by_key.update((k, (p, fields)) for k, p in pairs)
        if closed:
            self._release([p for _, p in pairs], "the client closed before they could be kept")
            return
        log.log(logging.INFO if cancelled else logging.WARNING, "a fetch was %s after %d payload(s) were "
                "consumed: kept for the next fetch or fetch_many of those refs (%s...)",
                "cancelled" if cancelled else "interrupted", len(pairs), pairs[0][0])

    def keep_taken(self, address: tuple, payloads, fields=None, cancelled: bool = False) -> None:
        """Keep a take's payloads for the next take from ``address`` ((host, ports tuple));
        ``cancelled``: as for :meth:`keep_many`."""
        payloads = list(payloads)
        if not payloads:
            return
        with self._lock:
            closed = self._closed
            if not closed:
                self._taken[address].extend((p, fields) for p in payloads)
        if closed:
            self._release(payloads, "the client closed before they could be kept")
            return
        log.log(logging.INFO if cancelled else logging.WARNING, "a take from %s:%s was %s after %d payload(s) "
                "were consumed: kept for the next take from that server", address[0], list(address[1]),
                "cancelled" if cancelled else "interrupted", len(payloads))

    # ------------------------------------------------------- handing out ---
    def pop(self, key, fields=None):
        """The payload kept under ``key`` (no longer kept), or None. ``fields``: what the
        caller asks for (see :func:`_as_asked`)."""
        if not self._by_key:
            return None
        with self._lock:
            got = self._by_key.pop(key, None)
        return None if got is None else _as_asked(key, *got, fields)

    def pop_taken(self, address: tuple, n: int, fields=None) -> list:
        """Up to ``n`` payloads kept from takes from ``address`` (oldest first)."""
        if not self._taken:
            return []
        with self._lock:
            queue = self._taken.get(address)
            if not queue:
                return []
            got = [queue.popleft() for _ in range(min(n, len(queue)))]
            if not queue:
                del self._taken[address]
        return [_as_asked(address, p, had, fields) for p, had in got]

    def close(self, limit: float) -> int:
        """The client closes: wait up to ``limit`` s for interrupted work, then release every
        kept payload (and any kept later); how many were released."""
        self.settle(limit=limit)
        with self._lock:
            self._closed = True
            payloads = [p for p, _ in self._by_key.values()] + [p for q in self._taken.values() for p, _ in q]
            self._by_key.clear()
            self._taken.clear()
        self._release(payloads, "nobody asked for them again before the client closed")
        return len(payloads)

    @staticmethod
    def _release(payloads: list, why: str) -> None:
        for p in payloads:
            p.release()
        if payloads:
            log.warning("released %d payload(s) consumed by interrupted calls (%s): they were consumed and are "
                        "not served again", len(payloads), why)


def _as_asked(where, payload, had, fields):
    """A kept payload for a call asking for ``fields``: restricted to them; a field the
    interrupted call did not fetch (``had``) is not in it, which is logged."""
    if fields is None and had is None:
        return payload
    if had is not None:
        missing = [f for f in (fields if fields is not None else ()) if f not in had]
        if fields is None or missing:
            log.warning("payload %s was consumed by an interrupted call that asked only for fields %s: %s "
                        "not in it", where, list(had), missing or "the other fields are")
    return payload if fields is None else payload.select(fields)


def _key(ref) -> tuple:
    """The payload key of a result's ref (a SlotRef, or the dict a caller passed)."""
    return ref.key if isinstance(ref, shm.SlotRef) else shm.SlotRef.from_dict(ref).key


class KeptWhenSettled:
    """Payloads a consumer was handing out when its caller's Ctrl-C interrupted the settle
    (the ACK) of their delivery: the settle runs on to its end, and what it consumed is kept
    here for that consumer's next call (a fan-in take, a stream's ``next()``). Thread-safe:
    filled on the UCX loop thread, emptied by the consumer's thread."""

    def __init__(self, what: str):
        self._what = what
        self._kept: collections.deque = collections.deque()
        self._running: set = set()  # an Event per settle still running, set once what it kept is here

    def on_interrupt(self, handing: list):
        """An ``on_interrupt`` for the settle of deliveries whose payloads are ``handing``
        (one list per delivery; the settle's result is one verdict per delivery, or one
        verdict for one delivery). A delivery whose settle failed consumed nothing (its
        server gives it back); one confirmed or unknown is kept (as a settle that returns
        hands it out: if the server never applies it, this client drops its repeats)."""
        def register(outcome) -> None:
            settled = threading.Event()
            self._running.add(settled)

            def done(f) -> None:
                try:
                    if f.cancelled() or f.exception() is not None:
                        return
                    verdicts = f.result() if isinstance(f.result(), list) else [f.result()]
                    got = [p for v, ps in zip(verdicts, handing) if not isinstance(v, BaseException) for p in ps]
                    self._kept.extend(got)
                    if got:
                        log.warning("%s: interrupted while %d consumed payload(s) were settled: kept for its next "
                                    "call", self._what, len(got))
                finally:
                    self._running.discard(settled)
                    settled.set()
            outcome.add_done_callback(done)
        return register

    def wait(self, limit: float) -> None:
        """Wait up to ``limit`` s for settles still running (what they consume is then here)."""
        end = time.monotonic() + limit
        for settled in list(self._running):
            settled.wait(max(0.0, end - time.monotonic()))

    def __bool__(self) -> bool:
        return bool(self._kept)

    def pop(self, n: int) -> list:
        """Up to ``n`` kept payloads, oldest first."""
        return [self._kept.popleft() for _ in range(min(n, len(self._kept)))]

    def put_back(self, payloads: list) -> None:
        """Payloads popped but not handed out after all (a conversion failed, another Ctrl-C)."""
        self._kept.extendleft(reversed(payloads))

    def release(self, limit: float) -> None:
        """The consumer closes: wait up to ``limit`` s for running settles, then release what
        nobody took (consumed: never served again)."""
        self.wait(limit)
        left = self.pop(len(self._kept))
        Kept._release(left, f"{self._what} closed before they were handed out")
