"""FanIn: one trainer pulling from every live server of a directory, fairly.

Built on the client's public API only (``submit_take`` with a hold, ``present``,
``delivered``): every TAKE is *held* by its server until this module settles
it, so whatever was fetched but not handed out (a slow server's answer that
came after ``take`` returned, the rest of a long-poll, a stream closed early)
goes back to READY instead of being lost.

Fairness: the demand ``n`` of one ``take`` is split over the admitted servers
round robin, ``n // k`` each and one more for the next ``n % k`` servers of a
rotation that carries over between calls, so with every server full each one
serves the same number of payloads in the long run (also when ``n < k``). A
server that had fewer than its share is empty; its shortfall goes to the
servers that gave all they were asked, in one more round. When nothing is
ready anywhere, ``take(wait=...)`` long-polls every server at once and returns
with the first answer; the other polls stay in flight and are harvested by the
next call.

Liveness: the directory lists live servers (heartbeats); it is read every
``refresh_s`` and at once after a failure. A server whose TAKE failed
(connection lost, deadline, refused, busy) is skipped for ``retry_s``, doubling
to ``max_retry_s`` while it keeps failing; a server that re-registers (a new
incarnation: it was restarted) is re-admitted at once. A slow server never
stalls the others: one round waits at most ``round_s`` and a late answer is
parked with that server until the next call.

Exactly once per client: the client's dedup drops repeats (keys it delivered
before); across clients, see README "Guarantees".
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass, field

from ucxx_transport import engine
from ucxx_transport.directory import Directory, DirectoryError, ServerEntry
from ucxx_transport.protocol import MAX_TAKE

from .errors import AuthError, TransportError
from .kept import KeptWhenSettled

log = logging.getLogger("clients.fanin")

#: how long a server holds a payload this module fetched but has not handed out yet
DEFAULT_HOLD_S = 60.0


@dataclass(eq=False)
class _Server:
    entry: ServerEntry
    listed: bool = True  # in the directory's live set
    inflight: concurrent.futures.Future | None = None  # a held TAKE not harvested yet
    down_until: float = 0.0
    backoff: float = 0.0
    failures: int = 0
    served: int = 0
    last_error: str | None = field(default=None, repr=False)

    def admitted(self, now: float) -> bool:
        return self.listed and self.inflight is None and now >= self.down_until

    @property
    def state(self) -> str:
        if not self.listed:
            return "gone"
        if time.monotonic() < self.down_until:
            return "down"
        return "busy" if self.inflight is not None else "live"


class FanIn:
    """Pull payloads from every live server that ``directory`` lists.

    ``client``: a :class:`~clients.TransportClient` (its token, deadlines,
    pool and dedup are used). ``take(n, wait)`` returns up to ``n`` payloads
    from any servers; :meth:`stream` iterates them. Not thread-safe: one FanIn
    per consuming thread. :meth:`close` gives back whatever was fetched and not
    handed out (it does not close the client).
    """

    def __init__(self, client, directory: Directory, *, refresh_s: float = 2.0, round_s: float = 1.0,
                 retry_s: float = 1.0, max_retry_s: float = 10.0, hold_s: float = DEFAULT_HOLD_S):
        if min(refresh_s, round_s, retry_s, max_retry_s, hold_s) <= 0:
            raise ValueError("refresh_s, round_s, retry_s, max_retry_s and hold_s must be > 0 seconds")
        self.client = client
        self.directory = directory
        self.refresh_s = refresh_s
        self.round_s = round_s
        self.retry_s = retry_s
        self.max_retry_s = max_retry_s
        self.hold_s = hold_s
        self._servers: dict[str, _Server] = {}
        self._rr = 0
        self._next_refresh = 0.0
        self._lock = threading.Lock()
        self._closed = False
        # payloads consumed but not handed out: Ctrl-C landed while their delivery was settled (the
        # settle runs on to its end); handed out by the next take / next()
        self._kept = KeptWhenSettled("fan-in")
        self.counters = {"refreshes": 0, "refresh_errors": 0, "failures": 0, "readmitted": 0, "given_back": 0,
                         "rounds": 0, "long_polls": 0}

    # ------------------------------------------------------------ directory --
    def refresh(self) -> list[ServerEntry]:
        """Read the directory now; the live entries (what this FanIn pulls from)."""
        try:
            live = self.directory.refresh()
        except (DirectoryError, OSError, TimeoutError) as exc:
            self.counters["refresh_errors"] += 1
            log.warning("directory refresh failed (%r): keeping the %d server(s) known", exc, len(self._servers))
            self._next_refresh = time.monotonic() + self.refresh_s
            return [s.entry for s in self._servers.values() if s.listed]
        self.counters["refreshes"] += 1
        seen = set()
        for e in live:
            seen.add(e.ring_id)
            s = self._servers.get(e.ring_id)
            if s is None:
                self._servers[e.ring_id] = _Server(e)
                log.info("fan-in: server of ring %r at %s:%s joined", e.ring, e.host, list(e.ports))
                continue
            if (e.incarnation, e.host, e.ports) != (s.entry.incarnation, s.entry.host, s.entry.ports) or not s.listed:
                if s.down_until or not s.listed:
                    self.counters["readmitted"] += 1
                    log.info("fan-in: server of ring %r is back at %s:%s", e.ring, e.host, list(e.ports))
                s.down_until, s.backoff = 0.0, 0.0
            s.entry, s.listed = e, True
        for rid, s in list(self._servers.items()):
            if rid not in seen and s.listed:
                s.listed = False
                log.info("fan-in: server of ring %r left the directory (no heartbeat)", s.entry.ring)
            if not s.listed and s.inflight is None and rid not in seen:
                del self._servers[rid]
        self._next_refresh = time.monotonic() + self.refresh_s
        return live

    def _maybe_refresh(self) -> None:
        if time.monotonic() >= self._next_refresh:
            self.refresh()

    def _down(self, s: _Server, exc: BaseException) -> None:
        s.failures += 1
        self.counters["failures"] += 1
        s.backoff = self.max_retry_s if isinstance(exc, AuthError) else \
            min(self.max_retry_s, s.backoff * 2 if s.backoff else self.retry_s)
        s.down_until = time.monotonic() + s.backoff
        s.last_error = f"{type(exc).__name__}: {exc}"
        log.warning("fan-in: skipping the server of ring %r at %s:%s for %.1f s (%s)", s.entry.ring,
                    s.entry.host, list(s.entry.ports), s.backoff, s.last_error[:200])
        self._next_refresh = 0.0  # ask the directory again at the next call

    # -------------------------------------------------------------- rounds --
    def _submit(self, s: _Server, n: int, wait: float) -> concurrent.futures.Future:
        s.inflight = self.client.submit_take(s.entry.address, n=min(n, MAX_TAKE), wait=wait, hold_s=self.hold_s)
        return s.inflight

    def _harvest(self, s: _Server, out: list, need: int) -> int | None:
        """Collect ``s``'s finished TAKE into ``out`` as (server, delivery, k); the
        number of payloads it brought (None: it failed). ``k``: how many of them
        to hand out (at most ``need``; the rest go back at settle)."""
        fut, s.inflight = s.inflight, None
        try:
            d = fut.result(0)
        except TransportError as exc:
            self._down(s, exc)
            return None
        s.backoff = 0.0
        if not d.items:
            return 0
        if d.expired:  # its server may have returned these already: never hand them out
            out.append((s, d, 0))
            return 0
        out.append((s, d, max(0, min(len(d.items), need))))
        return len(d.items)

    def _plan(self, servers: list[_Server], need: int) -> list[tuple[_Server, int]]:
        """Split ``need`` over ``servers``: ``need // k`` each, one more for the next
        ``need % k`` of the rotation (which carries over to the next call)."""
        k = len(servers)
        base, extra = divmod(need, k)
        start = self._rr % k
        order = servers[start:] + servers[:start]
        self._rr = (start + extra) % k
        plan = [(s, base + (1 if i < extra else 0)) for i, s in enumerate(order)]
        return [(s, m) for s, m in plan if m > 0]

    def _round(self, servers: list[_Server], need: int, out: list) -> tuple[int, list[_Server]]:
        """One TAKE per planned server at once, waiting at most ``round_s``; (payloads
        collected, servers that gave all they were asked for: they may have more)."""
        self.counters["rounds"] += 1
        plan = [(s, min(m, MAX_TAKE)) for s, m in self._plan(servers, need)]
        futs = {self._submit(s, m, 0.0): (s, m) for s, m in plan}
        concurrent.futures.wait(futs, timeout=self.round_s)
        got, full = 0, []
        for fut, (s, m) in futs.items():
            if not fut.done():
                continue  # parked: harvested by a later call
            brought = self._harvest(s, out, need - got)
            if brought is None:
                continue
            got += min(brought, need - got)
            if brought >= m:
                full.append(s)
        return got, full

    def _collect(self, n: int, wait: float) -> list:
        """Up to ``n`` payloads as held deliveries [(server, delivery, k)]."""
        if not 1 <= n:
            raise ValueError(f"n must be >= 1, got {n}")
        if wait < 0:
            raise ValueError("wait must be >= 0 seconds")
        if self._closed:
            raise TransportError("fan-in is closed")
        deadline = time.monotonic() + wait
        self._maybe_refresh()
        out: list = []
        need = n
        for s in list(self._servers.values()):  # answers that came after an earlier call returned
            if s.inflight is not None and s.inflight.done():
                if need > 0:
                    brought = self._harvest(s, out, need)
                    need -= min(brought or 0, need)
                else:
                    self._harvest(s, out, 0)
        if need > 0:
            now = time.monotonic()
            servers = [s for s in self._servers.values() if s.admitted(now)]
            if servers:
                got, full = self._round(servers, need, out)
                need -= got
                if need > 0 and full:
                    need -= self._round(full, need, out)[0]
        if need == n and wait > 0:
            self._long_poll(need, deadline, out)
        return out

    def _long_poll(self, need: int, deadline: float, out: list) -> None:
        """Nothing was ready: TAKE with a wait from every admitted server at once;
        return with the first answer (the others stay in flight, parked)."""
        self.counters["long_polls"] += 1
        while not out and time.monotonic() < deadline:
            now = time.monotonic()
            admitted = [s for s in self._servers.values() if s.admitted(now)]
            share = max(1, -(-need // max(1, len(admitted))))
            for s in admitted:
                self._submit(s, share, max(0.0, deadline - now))
            pending = {s.inflight: s for s in self._servers.values() if s.inflight is not None}
            step = min(deadline - time.monotonic(), self.refresh_s)
            if not pending:
                time.sleep(max(0.0, min(step, self.retry_s)))
            else:
                done, _ = concurrent.futures.wait(pending, timeout=max(0.0, step),
                                                  return_when=concurrent.futures.FIRST_COMPLETED)
                for fut in done:
                    self._harvest(pending[fut], out, need - sum(k for _, _, k in out))
            self._maybe_refresh()

    # -------------------------------------------------------------- settle --
    def _settle(self, pairs: list[tuple[object, int]], handing=None) -> list:
        """Settle deliveries at once on the UCX loop: ``settle(k)`` consumes the first
        ``k`` of each and returns the rest to READY. Per delivery True/None.
        ``handing``: per delivery, the payloads the caller hands out once it is settled;
        if the caller is interrupted (Ctrl-C) meanwhile, the settle runs on and what it
        consumed is kept for the next take, not lost."""
        if not pairs:
            return []

        async def all_of():
            return await asyncio.gather(*(d.settle(k) for d, k in pairs), return_exceptions=True)

        try:
            res = engine.run(all_of(), self.client.timeout + 5.0,
                             on_interrupt=None if handing is None else self._kept.on_interrupt(handing))
        except TimeoutError:
            res = [None] * len(pairs)
        for (d, k), r in zip(pairs, res):
            if isinstance(r, BaseException):
                raise r
            if r is None:
                log.info("fan-in: settling %d of %d payload(s) not confirmed; the server decides", k, len(d.items))
            self.counters["given_back"] += len(d.items) - k
        return res

    def _hand_out(self, s: _Server, d, k: int) -> list:
        got = []
        for key, payload in d.items[:k]:
            if d.may_repeat and self.client.delivered(key):
                continue  # a repeat after a server crash: consumed with the rest, not handed out
            got.append(payload)
        s.served += len(got)
        return got

    # ---------------------------------------------------------------- API --
    def take(self, n: int = 16, wait: float = 0.0) -> list:
        """Up to ``n`` payloads from any live servers, fairly; waits up to ``wait``
        seconds for the first when none is ready. Each is consumed (exactly once
        for this client). Raises ValueError for a bad ``n``/``wait``; a failing
        server is skipped (see :meth:`stats`), never raised."""
        with self._lock:
            self._kept.wait(wait)
            if self._kept and n >= 1:  # consumed by a take that was interrupted while it settled
                out = self._kept.pop(n)
            else:
                held = self._collect(n, wait)
                given = [self._hand_out(s, d, k) for s, d, k in held]  # before settling remembers the keys
                self._settle([(d, k) for _, d, k in held], handing=given)
                out = [p for got in given for p in got]
            try:
                return [self.client.present(p) for p in out]
            except BaseException:  # interrupted, or a conversion failed: consumed, kept for the next take
                self._kept.put_back(out)
                raise

    def stream(self, n: int = 16, wait: float = 1.0) -> "FanInStream":
        """Iterate payloads from every server until closed (``with`` block); only what
        was handed out is consumed, the rest goes back to READY on close."""
        return FanInStream(self, n, wait)

    def stats(self) -> dict:
        """Counters plus, per ring id: address, state (live/busy/down/gone), payloads served, failures."""
        return dict(self.counters, servers={
            rid: {"ring": s.entry.ring, "address": s.entry.address, "node_id": s.entry.node_id, "state": s.state,
                  "served": s.served, "failures": s.failures, "last_error": s.last_error}
            for rid, s in self._servers.items()})

    def close(self, timeout: float | None = None) -> None:
        """Wait (bounded) for TAKEs in flight and give back what they brought. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            limit = time.monotonic() + (timeout if timeout is not None else self.client.call_budget() + 5.0)
            held = []
            for s in self._servers.values():
                if s.inflight is None:
                    continue
                try:
                    s.inflight.result(max(0.0, limit - time.monotonic()))
                except (TransportError, concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
                    s.inflight = None  # nothing held (or its server returns it when the hold ends)
                    continue
                self._harvest(s, held, 0)
            self._settle([(d, 0) for _, d, _ in held])
            self._kept.release(max(0.0, limit - time.monotonic()))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class FanInStream:
    """Payloads from :meth:`FanIn.take` one at a time; a delivery is consumed when its
    last payload is handed out, and :meth:`close` consumes what was handed out of the
    current one and gives back the rest."""

    def __init__(self, fanin: FanIn, n: int, wait: float):
        self._f = fanin
        self._n = n
        self._wait = wait
        self._queue: list = []  # [server, delivery, k, handed]
        self._closed = False

    def __iter__(self):
        return self

    def __next__(self):
        f = self._f
        while not self._closed:
            f._kept.wait(self._wait)
            if f._kept:  # consumed by a next() interrupted while it settled
                return f.client.present(f._kept.pop(1)[0])
            while self._queue:
                item = self._queue[0]
                s, d, k, handed = item
                while handed < k:
                    key, payload = d.items[handed]
                    handed += 1
                    item[3] = handed
                    if d.may_repeat and f.client.delivered(key):
                        continue
                    if handed == k:
                        self._queue.pop(0)
                        f._settle([(d, k)], handing=[[payload]])
                    s.served += 1
                    return f.client.present(payload)
                self._queue.pop(0)
                f._settle([(d, k)])
            with f._lock:
                self._queue = [list(x) + [0] for x in f._collect(self._n, self._wait)]
            for x in [x for x in self._queue if x[2] == 0]:  # expired or nothing to hand out
                self._queue.remove(x)
                f._settle([(x[1], 0)])
        raise StopIteration

    def close(self) -> None:
        """Consume what was handed out, give back the rest."""
        if self._closed:
            return
        self._closed = True
        q, self._queue = self._queue, []
        self._f._settle([(d, handed) for _, d, _, handed in q])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
