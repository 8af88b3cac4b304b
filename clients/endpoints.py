"""Endpoint lifecycle and one call on one endpoint (layer 1 of the retry stack).

:class:`Connector` opens (and authenticates) endpoints, lends pooled ones to a
call under its deadline, recycles or aborts them afterwards, rotates ports and
quarantines failing ones (:class:`~clients.pool.EndpointPool`), and retires
healthy endpoints only after their last ACK is confirmed. Everything here runs
on the client's UCX loop thread.
"""

from __future__ import annotations

import asyncio
import itertools
import logging

import numpy as np

from ucxx_transport import engine
from ucxx_transport.protocol import RESPONSE, Op, Request, Status, answer_to, encode_request

from .errors import AuthError, CallTimeoutError, ConnectionLostError, TransportError, classify
from .ledger import Ledger
from .pool import EndpointPool, PooledEndpoint

log = logging.getLogger("clients.endpoints")

#: ports tried by one call before it gives up (layer 1)
PORTS_PER_CALL = 2
#: how long closing an endpoint waits to confirm its last ACK
RETIRE_TIMEOUT_S = 2.0
#: ``body`` result flag: the endpoint stays with a HeldDelivery (no checkin, no abort)
HELD = object()


class CallDeadline:
    """Deadline of one call (cheaper than ``asyncio.wait_for`` on the hot path).

    When it fires it aborts the endpoint and cancels the calling task: a UCX
    receive whose peer is already gone is not cancelled by the abort alone
    (measured with ucxx 0.52), so the await is interrupted by cancellation.
    """

    __slots__ = ("fired", "_h", "_loop", "_when", "_fire")

    def __init__(self, loop, seconds: float, pe: PooledEndpoint):
        self.fired = False
        task = asyncio.current_task()

        def fire():
            self.fired = True
            pe.abort()
            if task is not None:
                task.cancel()

        self._loop, self._fire = loop, fire
        self._when = loop.time() + max(0.0, seconds)
        self._h = loop.call_at(self._when, fire)

    def extend(self, seconds: float) -> None:
        """Push the deadline back (a TAKE learns each payload's size as it arrives)."""
        if seconds > 0 and not self.fired:
            self._h.cancel()
            self._when += seconds
            self._h = self._loop.call_at(self._when, self._fire)

    def cancel(self):
        self._h.cancel()


def uncancel() -> None:
    """Undo the cancellation our own deadline caused (Python >= 3.11)."""
    task = asyncio.current_task()
    if task is not None and hasattr(task, "uncancel"):
        task.uncancel()


class Answered(Exception):
    """The server answered with an error status: not a connection failure."""

    def __init__(self, error: TransportError):
        super().__init__(str(error))
        self.error = error


class Connector:
    """Endpoints of one client: ``pool`` (rotation, quarantine, reuse), ``token``
    (sent in a HELLO on every new endpoint), ``timeout`` (deadline of a PING)."""

    def __init__(self, pool_kwargs: dict, *, token: str | None, timeout: float, ledger: Ledger):
        self.pool = EndpointPool(retire=self.retire_soon, **pool_kwargs)
        self.token = token
        self.timeout = timeout
        self._ledger = ledger
        self.retiring: set = set()
        self._ids = itertools.count(1)

    def next_id(self) -> int:
        """A fresh request id (echoed by the server's answer)."""
        return next(self._ids)

    async def connect(self, host: str, port: int, budget: float) -> PooledEndpoint:
        self._ledger.count("connects")
        try:
            ep = await engine.connect(host, port, budget)
        except Exception as exc:
            raise classify(exc, f"connect {host}:{port}") from exc
        pe = PooledEndpoint(ep, host, port)
        if self.token is not None:
            t = CallDeadline(asyncio.get_running_loop(), budget, pe)
            try:
                resp = await self.request(pe, Request(Op.HELLO, self.next_id(), text=self.token))
            except asyncio.CancelledError:
                pe.abort()
                if not t.fired:
                    raise
                uncancel()
                raise CallTimeoutError(f"HELLO {host}:{port}: no answer within {budget:.1f} s") from None
            except BaseException as exc:
                pe.abort()
                raise self.map_error(exc, t, f"HELLO {host}:{port}") from exc
            finally:
                t.cancel()
            if resp.status != Status.OK:
                pe.abort()
                raise AuthError(f"{host}:{port} refused the token: {resp.message}")
        return pe

    async def confirm(self, pe: PooledEndpoint) -> None:
        """PING on ``pe`` under the call deadline: the server answers after applying
        everything sent before it on this endpoint (used to confirm an ACK)."""
        t = CallDeadline(asyncio.get_running_loop(), self.timeout, pe)
        try:
            await self.request(pe, Request(Op.PING, self.next_id()))
        except asyncio.CancelledError:
            if not t.fired:
                raise
            uncancel()
            raise CallTimeoutError("PING after ACK: no answer within the deadline") from None
        finally:
            t.cancel()
        pe.unconfirmed_ack = False

    async def request(self, pe: PooledEndpoint, req: Request):
        await engine.send(pe.ep, encode_request(req))
        hdr = np.zeros(RESPONSE.size, np.uint8)
        await engine.recv(pe.ep, hdr)
        pe.unconfirmed_ack = False  # the server answers in order: any earlier ACK was applied
        return answer_to(hdr, req.request_id)

    @staticmethod
    def map_error(exc: BaseException, t: CallDeadline, where: str) -> BaseException:
        if t.fired:
            err = CallTimeoutError(f"{where}: no answer within the deadline")
            err.__cause__ = exc
            return err
        return classify(exc, where)

    async def with_endpoint(self, host: str, port: int, budget: float, body, where: str, fresh: bool = False):
        """Run ``body(pe)`` on a pooled endpoint under a deadline; recycle or discard it.

        A *pooled* endpoint that turns out dead (its server restarted on the same port:
        the connection was reset) is not a failed attempt: its idle siblings are dropped
        and the call runs once more on a fresh connection (nothing was ACKed, so the
        server gave back whatever it had sent)."""
        loop = asyncio.get_running_loop()
        pe = None if fresh else self.pool.checkout(host, port)
        reused = pe is not None
        if pe is None:
            pe = await self.connect(host, port, budget)
        t = pe.timer = CallDeadline(loop, budget, pe)
        healthy = False
        stale = False
        try:
            result, healthy = await body(pe)
            if healthy is HELD:  # the endpoint now belongs to the HeldDelivery until it is settled
                pe.timer, pe = None, None
                t.cancel()
            return result
        except Answered:
            healthy = True  # the server answered with an error status: the endpoint is fine
            raise
        except asyncio.CancelledError:
            if not t.fired:
                raise
            uncancel()
            raise CallTimeoutError(f"{where}: no answer within {budget:.1f} s") from None
        except BaseException as exc:
            err = self.map_error(exc, t, where)
            if not (reused and isinstance(err, ConnectionLostError)):
                raise err from exc
            stale = True
        finally:
            t.cancel()
            if pe is None:
                pass
            elif healthy and not t.fired:
                pe.timer = None
                self.pool.checkin(pe)
            else:
                pe.timer = None
                pe.abort()
            pe = None  # an exception's traceback keeps this frame: do not let it pin the endpoint
        if stale:
            self._ledger.count("stale_endpoints")
            self.pool.discard(host, port)
            log.debug("%s: pooled endpoint to %s:%d was dead; retrying on a fresh connection", where, host, port)
            return await self.with_endpoint(host, port, budget, body, where, fresh=True)

    async def call(self, host: str, ports, fn, where: str):
        """Layer 1: try ``fn(host, port)`` on up to PORTS_PER_CALL healthy ports."""
        last: TransportError | None = None
        for port in self.pool.order(host, ports)[:PORTS_PER_CALL]:
            self._ledger.count("attempts")
            try:
                return await fn(host, port)
            except TransportError as exc:
                if not exc.quarantine:
                    raise
                self.pool.quarantine(host, port, str(exc))
                last = exc
        assert last is not None
        raise last

    def retire_soon(self, pe: PooledEndpoint) -> None:
        """Close a healthy endpoint; first confirm its last ACK if needed (on the UCX loop,
        whichever loop or thread retires it: a caller's own loop stops between its calls)."""
        if not pe.unconfirmed_ack:
            pe.abort()
            return
        home = engine.ucx_loop()
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if here is not None and here is home:
            self._start_retire(pe)
        elif home is not None:
            home.call_soon_threadsafe(self._start_retire, pe)
        else:  # the UCX loop is gone (teardown): nothing can confirm the ACK any more
            pe.abort()

    def _start_retire(self, pe: PooledEndpoint) -> None:
        task = asyncio.get_running_loop().create_task(self.retire(pe))
        self.retiring.add(task)
        task.add_done_callback(self.retiring.discard)

    async def retire(self, pe: PooledEndpoint) -> None:
        t = CallDeadline(asyncio.get_running_loop(), RETIRE_TIMEOUT_S, pe)
        try:
            await self.request(pe, Request(Op.PING, self.next_id()))  # answered after the ACK was applied
        except BaseException as exc:  # noqa: BLE001 - best effort; the server's ack timeout covers the rest
            if isinstance(exc, asyncio.CancelledError) and not t.fired:
                raise
            log.debug("could not confirm the last ACK on %s:%d (%r)", pe.host, pe.port, exc)
        finally:
            t.cancel()
            pe.abort()

    async def aclose(self):
        for pe in self.pool.drain():
            self.retire_soon(pe)
        if self.retiring:
            await asyncio.wait(list(self.retiring), timeout=RETIRE_TIMEOUT_S + 0.5)
