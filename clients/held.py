"""HeldDelivery: payloads received whole whose ACK waits for the caller.

A stream fetches ahead of its consumer. If it ACKed on receipt, payloads it
fetched but never handed out (the consumer closed the stream, or it failed)
would be consumed and lost. Instead a stream asks the server to *hold* the
delivery (``FLAG_HOLD``: the server extends its ACK deadline by ``hold_s``)
and settles it when it knows what the consumer got: :meth:`settle` ``(k)``
consumes the first ``k`` payloads and returns the rest to READY in one
message, then confirms it with a PING on the same endpoint (the server answers
in order, so an answer proves the ACK was applied).
"""

from __future__ import annotations

import logging
import time

from ucxx_transport import engine
from ucxx_transport.protocol import Op, Request, encode_request

log = logging.getLogger("clients.held")


class HeldDelivery:
    """``payloads`` of one GET/TAKE (request ``rid``) on endpoint ``pe``, not ACKed yet."""

    #: a payload this client already returned once may be among the items (TAKE after a crash)
    may_repeat = True

    def __init__(self, ledger, net, pe, rid: int, items: list, hold_s: float):
        self._ledger = ledger  # clients.ledger.Ledger: what this client delivered
        self._net = net  # clients.endpoints.Connector: confirms the settle, takes the endpoint back
        self._pe = pe
        self._rid = rid
        #: [(key, payload)] in delivery order
        self.items = items
        self.expires = time.monotonic() + hold_s
        self.settled = False

    @property
    def payloads(self) -> list:
        return [p for _, p in self.items]

    @property
    def expired(self) -> bool:
        """The server may have given these payloads back (its hold ran out)."""
        return time.monotonic() >= self.expires

    def settle_sync(self, k: int, timeout: float, on_interrupt=None) -> bool | None:
        """:meth:`settle` from a plain thread (not the UCX loop). ``on_interrupt``: as for
        ``engine.run`` (the caller is interrupted: the settle runs on, its outcome goes there)."""
        if self.settled or self._pe is None:
            return self._settle_empty(k)
        try:
            return engine.run(self.settle(k), timeout, on_interrupt=on_interrupt)
        except TimeoutError:
            return None

    def _settle_empty(self, k: int) -> bool:
        self.settled = True
        return True

    async def settle(self, k: int) -> bool | None:
        """Consume the first ``k`` payloads, return the rest to READY (k=0: all back).

        True: the server confirmed it. None: unknown (the endpoint failed): the
        server applies it if the message arrived, else returns everything to READY.
        Runs on the UCX loop; idempotent (later calls return True and do nothing).
        """
        if self.settled or self._pe is None:
            return self._settle_empty(k)
        self.settled = True
        pe = self._pe
        n = len(self.items)
        k = max(0, min(k, n))
        # what the caller got is its, whatever becomes of the ACK: if the server never applies
        # it and serves those payloads again, this client must drop them (exactly once per client)
        for key, _ in self.items[:k]:
            self._ledger.remember(key)
        for _, p in self.items[k:]:
            p.release()
        req = Request(Op.ACK, self._rid, n=0 if k == n else k) if k else Request(Op.NACK, self._rid)
        try:
            await engine.send(pe.ep, encode_request(req))
            await self._net.confirm(pe)
        except BaseException as exc:  # noqa: BLE001 - any failure (or our deadline) leaves it to the server
            log.info("settling request %d (%d of %d consumed) not confirmed: %r", self._rid, k, n, exc)
            pe.abort()
            if not isinstance(exc, Exception):
                raise
            return None
        finally:
            self._pe = None
        self._net.pool.checkin(pe)
        return True


class LocalDelivery:
    """A payload claimed straight from this host's shared memory, not consumed yet:
    ``settle(1)`` consumes it (the slot stays PINNED while views of it live),
    ``settle(0)`` gives it back (READY once the voided payload's views are gone)."""

    expired = False
    may_repeat = False  # the claim already checked

    def __init__(self, ledger, key, payload, lease):
        self._ledger = ledger
        self.items = [(key, payload)]
        self._lease = lease
        self.settled = False

    @property
    def payloads(self) -> list:
        return [self.items[0][1]]

    def settle_sync(self, k: int, timeout: float = 0, on_interrupt=None) -> bool:  # (local: no wait to interrupt)
        if not self.settled:
            self.settled = True
            key, payload = self.items[0]
            if k <= 0:
                payload.release()  # voided: the slot goes back to READY when nothing views it
                self.items = []
                self._lease.nack()
                self._ledger.forget(key)
            else:
                self._lease.ack()
        return True

    async def settle(self, k: int) -> bool:
        return self.settle_sync(k)
