"""Endpoint pool with port rotation and quarantine (layer 1 of the retry stack).

Rules, all of them:

* ``order(host, ports)``: successive calls start on successive ports (round
  robin per host); quarantined ports are skipped; if every port is
  quarantined, all are used anyway (never starve).
* a (host, port) whose call failed with a connection-level error (reset,
  cancel, close, truncation, timeout) is quarantined for ``quarantine_s``.
* up to ``pool_size`` idle endpoints are kept per (host, port); an endpoint
  older than ``endpoint_max_age_s`` is closed on checkout and a new one made
  (keep it below the server's idle eviction, 120 s by default).
* an endpoint that saw any error is never returned to the pool.
* a healthy endpoint leaving the pool (overflow, age, close) whose last message
  was an ACK goes through ``retire``: the ACK is confirmed (a PING answered
  after it) before the endpoint is closed, so closing never drops an ACK and
  never makes the server return a delivered payload to READY.

Endpoint budget (UCX's TCP transport allows ``UCX_TCP_MAX_NUM_EPS`` endpoints
per worker, 256 by default; a client pulling from 64 servers x 4 ports with
``pool_size`` 2 would otherwise keep 512 idle):

* at most ``max_idle`` idle endpoints in all (default 3/4 of
  ``UCX_TCP_MAX_NUM_EPS``) and at most ``max_idle_per_server`` across one
  server's ports (default: no cap beyond ``pool_size`` per port); over a cap,
  the least recently used idle endpoint (of that server, or of all) is retired;
* an endpoint idle for ``idle_s`` is retired at the next pool operation.

Endpoints in use are not pooled: their number is the concurrency of the calls
in flight (``max_inflight`` for a batch, one per server for ``clients.fanin``),
so open endpoints <= ``max_idle`` + calls in flight.
"""

from __future__ import annotations

import collections
import itertools
import logging
import functools
import os
import threading
import time
from dataclasses import dataclass, field

from ucxx_transport import engine
from ucxx_transport import ucxx_compat as compat
from ucxx_transport.config import resolve

log = logging.getLogger("clients.pool")


@dataclass
class PooledEndpoint:
    ep: object
    host: str
    port: int
    created: float = field(default_factory=time.monotonic)
    #: an ACK was sent and no answer received since (the server may not have applied it yet)
    unconfirmed_ack: bool = False
    #: the deadline of the call using this endpoint now (set by the client)
    timer: object = None
    #: when it last went idle (checked into the pool)
    returned: float = 0.0

    def abort(self) -> None:
        try:
            engine.abort(self.ep)
        except (*compat.ucx_errors(), RuntimeError) as exc:  # an endpoint that already failed may refuse
            log.debug("abort %s:%d: %r", self.host, self.port, exc)


#: UCX's own default of UCX_TCP_MAX_NUM_EPS (endpoints one TCP interface of a worker may have)
UCX_TCP_MAX_NUM_EPS_DEFAULT = 256


def tcp_max_num_eps() -> int:
    """The effective ``UCX_TCP_MAX_NUM_EPS`` (the environment's, else UCX's default)."""
    v = os.environ.get("UCX_TCP_MAX_NUM_EPS", "")
    return int(v) if v.isdigit() and int(v) > 0 else UCX_TCP_MAX_NUM_EPS_DEFAULT


def _locked(method):
    """``method`` under the pool's lock; the endpoints it retires or aborts are closed after the
    lock is released (an abort can block for a while: other threads' calls use the pool meanwhile)."""
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        try:
            with self._lock:
                return method(self, *args, **kwargs)
        finally:
            self._close_leaving()
    return locked


class EndpointPool:
    def __init__(self, *, pool_size: int, endpoint_max_age_s: float, quarantine_s: float, retire=None,
                 max_idle: int | None = None, max_idle_per_server: int | None = None, idle_s: float | None = None):
        self.retire = retire or (lambda pe: pe.abort())
        self.pool_size = pool_size
        self.max_age = endpoint_max_age_s
        self.quarantine_s = quarantine_s
        self.max_idle = resolve("max_idle_endpoints", max_idle) or max(1, tcp_max_num_eps() * 3 // 4)
        self.max_idle_per_server = resolve("max_idle_per_server", max_idle_per_server)  # None: no cap
        self.idle_s = resolve("endpoint_idle_s", idle_s)
        self._idle: dict[tuple[str, int], collections.deque[PooledEndpoint]] = collections.defaultdict(
            collections.deque)
        #: every idle endpoint, least recently returned first
        self._lru: collections.OrderedDict[int, PooledEndpoint] = collections.OrderedDict()
        #: (host, port) -> its server (host, ports), learnt from order(); a port never ordered is its own server
        self._server_of: dict[tuple[str, int], tuple] = {}
        self._per_server: collections.Counter = collections.Counter()
        self._quarantined: dict[tuple[str, int], float] = {}
        self._rr: dict[str, itertools.count] = collections.defaultdict(itertools.count)
        self.stats = collections.Counter()
        #: calls run on the UCX loop and in callers' own threads (engine.run_here): the pool's
        #: state changes under this lock
        self._lock = threading.Lock()
        #: closings decided under the lock, run once it is released (:func:`_locked`)
        self._leaving: list = []
        #: drained (its owner closes): nothing is pooled any more
        self._drained = False

    # --------------------------------------------------------- rotation ----
    @_locked
    def order(self, host: str, ports) -> list[int]:
        ports = list(ports)
        if not ports:
            raise ValueError(f"no ports known for host {host!r} (is a server running for this ring?)")
        server = (host, tuple(sorted(ports)))
        for p in ports:
            if self._server_of.get((host, p)) != server and not self._idle.get((host, p)):
                self._server_of[(host, p)] = server
        start = next(self._rr[host]) % len(ports)
        rotated = ports[start:] + ports[:start]
        healthy = [p for p in rotated if not self._quarantined_now(host, p)]
        return healthy or rotated

    @_locked
    def is_quarantined(self, host: str, port: int) -> bool:
        return self._quarantined_now(host, port)

    def _quarantined_now(self, host: str, port: int) -> bool:
        until = self._quarantined.get((host, port))
        if until is None:
            return False
        if time.monotonic() >= until:
            del self._quarantined[(host, port)]
            return False
        return True

    @_locked
    def quarantine(self, host: str, port: int, reason: str) -> None:
        again = self._quarantined_now(host, port)
        self._quarantined[(host, port)] = time.monotonic() + self.quarantine_s
        self.stats["quarantines"] += 1
        # one warning per state change (healthy -> quarantined), not one per failed attempt
        log.log(logging.DEBUG if again else logging.WARNING, "quarantining %s:%d for %.0f s (%s)", host, port,
                self.quarantine_s, reason)
        self._leaving.extend(pe.abort for pe in self._pop_all(host, port))

    # ----------------------------------------------------------- pooling ---
    def _server(self, key: tuple[str, int]) -> tuple:
        return self._server_of.get(key, key)

    def _take_out(self, pe: PooledEndpoint) -> None:
        """Bookkeeping of an idle endpoint leaving the pool (already off its deque)."""
        self._lru.pop(id(pe), None)
        self._per_server[self._server((pe.host, pe.port))] -= 1

    def _pop_all(self, host: str, port: int) -> list[PooledEndpoint]:
        out = list(self._idle.pop((host, port), ()))
        for pe in out:
            self._take_out(pe)
        return out

    def _evict(self, pe: PooledEndpoint, why: str) -> None:
        self._idle[(pe.host, pe.port)].remove(pe)
        self._take_out(pe)
        self.stats[why] += 1
        self._retire_later(pe)

    def _sweep(self, now: float) -> None:
        """Retire endpoints idle longer than ``idle_s`` (oldest first: stops at the first young one)."""
        while self._lru:
            pe = next(iter(self._lru.values()))
            if now - pe.returned < self.idle_s:
                return
            log.debug("endpoint to %s:%d idle for %.0f s: closing", pe.host, pe.port, now - pe.returned)
            self._evict(pe, "evicted_idle")

    @_locked
    def checkout(self, host: str, port: int) -> PooledEndpoint | None:
        """An idle pooled endpoint young enough to use, or None (caller connects)."""
        now = time.monotonic()
        self._sweep(now)
        q = self._idle.get((host, port))
        while q:
            pe = q.pop()
            self._take_out(pe)
            if now - pe.created < self.max_age:
                self.stats["reused"] += 1
                return pe
            self.stats["expired"] += 1
            log.debug("endpoint to %s:%d is %.0f s old: replacing", host, port, now - pe.created)
            self._retire_later(pe)
        return None

    @_locked
    def checkin(self, pe: PooledEndpoint) -> None:
        if self._drained:  # a call that ended after the client closed: not pooled, retired
            self._retire_later(pe)
            return
        key = (pe.host, pe.port)
        q = self._idle[key]
        now = time.monotonic()
        if len(q) >= self.pool_size or now - pe.created >= self.max_age:
            self._retire_later(pe)
            return
        pe.returned = now
        q.append(pe)
        self._lru[id(pe)] = pe
        server = self._server(key)
        self._per_server[server] += 1
        self._sweep(now)
        cap = self.max_idle_per_server
        if cap is not None and self._per_server[server] > cap:  # this server's least recently used
            oldest = next(p for p in self._lru.values() if self._server((p.host, p.port)) == server)
            self._evict(oldest, "evicted_server_cap")
        while len(self._lru) > self.max_idle:
            self._evict(next(iter(self._lru.values())), "evicted_lru")

    @property
    def idle(self) -> int:
        """Idle endpoints in the pool now."""
        return len(self._lru)

    @_locked
    def discard(self, host: str, port: int) -> None:
        """Abort every idle endpoint to (host, port) (one of them was found dead)."""
        self._leaving.extend(pe.abort for pe in self._pop_all(host, port))

    def _retire_later(self, pe: PooledEndpoint) -> None:
        self._leaving.append(functools.partial(self.retire, pe))

    def _close_leaving(self) -> None:
        while self._leaving:
            try:
                close = self._leaving.pop()
            except IndexError:  # another thread took the last one
                return
            close()

    @_locked
    def drain(self) -> list[PooledEndpoint]:
        """Remove and return every idle endpoint (the caller retires them); endpoints checked in
        afterwards are retired, not pooled (the pool's owner is closing)."""
        self._drained = True
        out = [pe for q in self._idle.values() for pe in q]
        self._idle.clear()
        self._lru.clear()
        self._per_server.clear()
        return out
