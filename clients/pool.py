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
"""

from __future__ import annotations

import collections
import itertools
import logging
import time
from dataclasses import dataclass, field

from ucxx_transport import engine

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

    def abort(self) -> None:
        try:
            engine.abort(self.ep)
        except Exception as exc:  # an endpoint that already failed may refuse; never fatal
            log.debug("abort %s:%d: %r", self.host, self.port, exc)


class EndpointPool:
    def __init__(self, *, pool_size: int, endpoint_max_age_s: float, quarantine_s: float, retire=None):
        self.retire = retire or (lambda pe: pe.abort())
        self.pool_size = pool_size
        self.max_age = endpoint_max_age_s
        self.quarantine_s = quarantine_s
        self._idle: dict[tuple[str, int], collections.deque[PooledEndpoint]] = collections.defaultdict(
            collections.deque)
        self._quarantined: dict[tuple[str, int], float] = {}
        self._rr: dict[str, itertools.count] = collections.defaultdict(itertools.count)
        self.stats = collections.Counter()

    # --------------------------------------------------------- rotation ----
    def order(self, host: str, ports) -> list[int]:
        ports = list(ports)
        if not ports:
            raise ValueError(f"no ports known for host {host!r} (is a server running for this ring?)")
        start = next(self._rr[host]) % len(ports)
        rotated = ports[start:] + ports[:start]
        healthy = [p for p in rotated if not self.is_quarantined(host, p)]
        return healthy or rotated

    def is_quarantined(self, host: str, port: int) -> bool:
        until = self._quarantined.get((host, port))
        if until is None:
            return False
        if time.monotonic() >= until:
            del self._quarantined[(host, port)]
            return False
        return True

    def quarantine(self, host: str, port: int, reason: str) -> None:
        again = self.is_quarantined(host, port)
        self._quarantined[(host, port)] = time.monotonic() + self.quarantine_s
        self.stats["quarantines"] += 1
        # one warning per state change (healthy -> quarantined), not one per failed attempt
        log.log(logging.DEBUG if again else logging.WARNING, "quarantining %s:%d for %.0f s (%s)", host, port,
                self.quarantine_s, reason)
        for pe in self._idle.pop((host, port), ()):
            pe.abort()

    # ----------------------------------------------------------- pooling ---
    def checkout(self, host: str, port: int) -> PooledEndpoint | None:
        """An idle pooled endpoint young enough to use, or None (caller connects)."""
        q = self._idle.get((host, port))
        now = time.monotonic()
        while q:
            pe = q.pop()
            if now - pe.created < self.max_age:
                self.stats["reused"] += 1
                return pe
            self.stats["expired"] += 1
            log.debug("endpoint to %s:%d is %.0f s old: replacing", host, port, now - pe.created)
            self.retire(pe)
        return None

    def checkin(self, pe: PooledEndpoint) -> None:
        q = self._idle[(pe.host, pe.port)]
        if len(q) < self.pool_size and time.monotonic() - pe.created < self.max_age:
            q.append(pe)
        else:
            self.retire(pe)

    def discard(self, host: str, port: int) -> None:
        """Abort every idle endpoint to (host, port) (one of them was found dead)."""
        for pe in self._idle.pop((host, port), ()):
            pe.abort()

    def drain(self) -> list[PooledEndpoint]:
        """Remove and return every idle endpoint (the caller retires them)."""
        out = [pe for q in self._idle.values() for pe in q]
        self._idle.clear()
        return out
