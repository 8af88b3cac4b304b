"""TransportServer: exposes one shared-memory ring over UCX.

One asyncio loop in a dedicated thread owns every listener (N ports sharing
one UCX worker) and every connection handler. Per endpoint the protocol is
sequential: request -> response header(s) + payload(s) -> ACK/NACK -> next
request. The handler that claimed a slot is its only finaliser:

* ACK -> READING -> FREE (consumed)
* NACK, ACK timeout, endpoint error, cancellation, shutdown -> READY

A crash of the whole server process drops its ownership locks with it, so
the next reader (or a restarted server) recovers every leased slot to READY.

Deadlines: an idle endpoint is evicted after ``idle_timeout_s``; a client
that does not ACK within ``ack_timeout_s`` has its endpoint aborted and its
payloads returned. Both are enforced by one sweeper task (no per-request
timer cost on the hot path).

Why one module past 400 lines: a connection's handlers form one state machine
(request, answer, ACK, finalise) whose every path must return its leases;
GET, TAKE, GETV and TAKEV sit next to the one finaliser they share so that the
single-owner rule can be checked in one read.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import enum
import functools
import hmac
import ipaddress
import itertools
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field

import numpy as np

import shm
import shm.layout
from shm import RingBuffer
from shm.frame import parse_index, project_into, projected_size

from . import engine
from . import ucxx_compat as compat
from .buffers import BufferPool
from .config import resolve
from .metrics import ServerMetrics
from .protocol import (
    FLAG_MORE,
    FLAG_ONE_MESSAGE,
    FLAG_PAYLOADS_INLINE,
    RESPONSE,
    MAX_TAKE,
    REQUEST,
    Op,
    ProtocolError,
    Request,
    Response,
    Status,
    COALESCE_BELOW,
    FLAG_HOLD,
    FLAG_UNDECODABLE,
    FLAG_FIELDS,
    FLAG_VERDICTS,
    MAX_BATCH,
    GETV_MAX_BYTES,
    batch_array,
    batch_table_size,
    read_batch_array,
    write_batch_array,
    ONE_MESSAGE_MAX,
    one_message_layout,
    decode_fields,
    plan_batch,
    MAX_HOLD_S,
    NO_RING_ID,
    decode_request,
    encode_response,
)

log = logging.getLogger("ucxx_transport.server")
assert shm.layout.SLOT_HEADROOM >= RESPONSE.size, "the slot headroom must hold a response header"
SWEEP_INTERVAL_S = 0.1
RECOVER_INTERVAL_S = 0.25
#: staging buffers (coalesced small payloads) kept for reuse
STAGING_CACHE_BYTES = 64 << 20
#: longest the event loop polls a slot's lock before deferring a finaliser
LOOP_LOCK_TIMEOUT_S = 0.001
#: a deferred finaliser's lock busy this long is worth a warning (a frozen process, not a busy box)
FROZEN_LOCK_WARN_S = 1.0


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def default_host() -> str:
    """This host's primary IP (the one a default route would use), else 127.0.0.1."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: nothing is sent for UDP connect
            ip = s.getsockname()[0]
            if ip and not ip.startswith("0."):
                return ip
    except OSError:
        pass
    return "127.0.0.1"


class Phase(enum.Enum):
    """What a connection's handler is doing (what its deadline means)."""

    IDLE = "idle"  # waiting for the next request (deadline: idle eviction)
    ACK = "ack"  # payloads sent, waiting for the ACK (deadline: the ack timeout)
    WAIT = "wait"  # a TAKE long-polls for READY payloads (no deadline of its own)


class EndReason(enum.Enum):
    """Why the server ended a connection."""

    ACK_TIMEOUT = "ack_timeout"
    IDLE = "idle"
    PEER_CLOSED = "peer_closed"
    SHUTDOWN = "shutdown"


@dataclass
class _Deferred:
    """A finaliser that met a busy slot lock: retried later."""

    lease: object  # shm.SlotLease
    ack: bool
    undecodable: bool
    since: float = field(default_factory=time.monotonic)
    warned: bool = False


@dataclass
class _Conn:
    ep: object
    port_index: int
    deadline: float | None
    phase: Phase = Phase.IDLE
    #: set once the server ended this connection (its handler is being cancelled)
    ended: EndReason | None = None
    task: asyncio.Task | None = None


def _observed(fut: asyncio.Future) -> None:
    """Done callback of a send nobody awaits any more: its failure is known (quiet)."""
    if not fut.cancelled():
        fut.exception()


class _ReadyWaiters:
    """FIFO of TAKE long-pollers; woken in order when payloads become READY."""

    def __init__(self):
        self._q: collections.deque[asyncio.Future] = collections.deque()
        self.present = threading.Event()

    async def wait(self, timeout: float) -> None:
        fut = asyncio.get_running_loop().create_future()
        self._q.append(fut)
        self.present.set()
        try:
            await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            try:
                self._q.remove(fut)
            except ValueError:
                pass
            if not self._q:
                self.present.clear()

    def notify(self, k: int) -> None:
        for fut in list(self._q)[: max(1, k)]:
            if not fut.done():
                fut.set_result(None)

    def notify_all(self) -> None:
        self.notify(len(self._q))


class TransportServer:
    """Serve ``ring`` (a :class:`shm.RingBuffer` or its name) over UCX.

    ``ports``: explicit listener ports (0 = any free port); else ``n_ports``
    free ports. ``start()`` returns the ports actually bound, and those are
    what the ring advertises in new refs. ``token``: shared secret every
    endpoint must present in a HELLO first. Timeouts are seconds.
    Every argument left as None reads its ``UCXX_TRANSPORT_*`` variable.
    """

    def __init__(self, ring, *, host=None, ports=None, n_ports=None, token=None, ack_timeout_s=None,
                 idle_timeout_s=None, progress_mode=None, max_take=None, min_rate=None):
        self._own_ring = isinstance(ring, str)
        self.ring: RingBuffer = RingBuffer.attach(ring) if isinstance(ring, str) else ring
        self._host = resolve("host", host) or default_host()
        explicit = resolve("ports", ports)
        # a restarted server takes the ports its predecessor used (when free), so refs
        # published before the restart stay fetchable; --ports / --n-ports override
        self._prefer = [] if explicit else self.ring.last_server_ports()
        if explicit:
            self._req_ports = explicit
        elif n_ports is None and not os.environ.get("UCXX_TRANSPORT_N_PORTS") and self._prefer:
            self._req_ports = [0] * len(self._prefer)
        else:
            self._req_ports = [0] * resolve("n_ports", n_ports)
        self._token = token.encode() if isinstance(token, str) else token
        self._ack_timeout = resolve("ack_timeout_s", ack_timeout_s)
        self._idle_timeout = resolve("idle_timeout_s", idle_timeout_s)
        self._mode = resolve("progress_mode", progress_mode)
        self._max_take = min(resolve("max_take", max_take), MAX_TAKE)
        self.metrics = ServerMetrics()
        self._ring_id = bytes.fromhex(self.ring.ring_id)
        self._min_rate = resolve("min_rate", min_rate)
        self._ports: list[int] = []
        self._future: concurrent.futures.Future | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stopping = False
        self._stop_evt: asyncio.Event | None = None
        self._conns: dict[asyncio.Task, _Conn] = {}
        self._waiters = _ReadyWaiters()
        self._watch_ack = threading.Event()
        self._req_ids = itertools.count(1)
        self._deferred: list[_Deferred] = []  # finalisers waiting for a slot lock
        self._staging = BufferPool("cpu", max_cached_bytes=STAGING_CACHE_BYTES)

    # ---------------------------------------------------------- lifetime --
    @property
    def address(self) -> tuple[str, list[int]]:
        """(host, ports) clients should use, once started."""
        return self._host, list(self._ports)

    @property
    def ports(self) -> list[int]:
        """The bound listener ports (empty before :meth:`start`)."""
        return list(self._ports)

    def start(self, timeout: float = 30.0) -> list[int]:
        """Bind the listeners and start serving; returns the bound ports.
        Raises the startup error (e.g. a port in use) if binding fails."""
        if self._future is not None:
            raise RuntimeError("server already started")
        self._stopping = False
        self._ready.clear()
        self._error = None
        self._loop = engine.acquire(self._mode)
        self._future = asyncio.run_coroutine_threadsafe(self._main(), self._loop)
        if not self._ready.wait(timeout) or self._error is not None:
            err = self._error or TimeoutError(f"server did not start within {timeout} s")
            self.stop()
            raise err
        return list(self._ports)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, drain, return every lease to READY, release UCX
        (the last user in the process resets it). Bounded by ``timeout``."""
        fut, loop = self._future, self._loop
        if fut is None:
            return
        self._stopping = True
        if self._stop_evt is not None:
            try:
                loop.call_soon_threadsafe(self._stop_evt.set)
            except RuntimeError:
                pass
        try:
            fut.result(timeout)
        except Exception as exc:  # noqa: BLE001 - stop() goes on whatever the loop ended with; it is logged
            if not isinstance(exc, concurrent.futures.CancelledError) and self._error is None:
                log.warning("server stopped with %r", exc)
            fut.cancel()
        self._future = None
        self._stop_evt = None
        engine.release()
        self._loop = None
        if self._own_ring:
            self.ring.close()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    @property
    def running(self) -> bool:
        """Is the server's loop serving (started and not stopped)?"""
        return self._future is not None and not self._future.done()

    def serve_forever(self) -> None:
        """Block until the server stops (e.g. :meth:`stop` from a signal handler)."""
        while self.running:
            time.sleep(0.2)

    async def _main(self):
        import ucxx

        self._stop_evt = asyncio.Event()
        listeners = []
        try:
            for i, port in enumerate(self._req_ports):
                cb = functools.partial(self._serve_endpoint, port_index=i)
                if port == 0 and i < len(self._prefer):
                    try:
                        listeners.append(ucxx.create_listener(cb, self._prefer[i]))
                        continue
                    except Exception as exc:  # noqa: BLE001 - ucxx raises plain exceptions for a busy port
                        log.warning("previous port %d of ring %r is taken (%s): using a new port; refs that "
                                    "name it resolve through the ring's header", self._prefer[i],
                                    self.ring.name, str(exc).splitlines()[0][:120])
                try:
                    listeners.append(ucxx.create_listener(cb, port))
                except (compat.ucx_errors() + (OSError, RuntimeError)) as exc:  # reported by start()
                    self._error = OSError(f"cannot listen on port {port}: {exc} (in use? pick another with "
                                          f"--ports, or 0 for any free port)")
                    self._ready.set()
                    return
            self._ports = [lst.port for lst in listeners]
            self.ring.set_server_address(self._host, self._ports)
            self.ring.recover()
            watcher = threading.Thread(target=self._watch_ready, name="ucxx-transport-ready-watch", daemon=True)
            watcher.start()
            bg = [asyncio.create_task(c) for c in (self._sweeper(), self._recoverer(),
                                                   self.metrics.sample_loop_lag())]
            log.info("serving ring %r on %s ports %s (progress mode %s)", self.ring.name, self._host,
                     self._ports, engine.mode())
            self._ready.set()
            await self._stop_evt.wait()
            # ---- shutdown: stop accepting, drain, cancel, return leases ----
            self._stopping = True
            for lst in listeners:
                lst.close()
            self._waiters.notify_all()
            busy = [t for t, c in self._conns.items() if c.phase is not Phase.IDLE]
            if busy:
                await asyncio.wait(busy, timeout=min(2.0, self._ack_timeout))
            for t, c in list(self._conns.items()):
                self._abort(c, EndReason.SHUTDOWN)
                t.cancel()
            if self._conns:
                await asyncio.wait(list(self._conns), timeout=2.0)
            for t in bg:
                t.cancel()
            await asyncio.gather(*bg, return_exceptions=True)
            self._waiters.present.set()  # let the watcher observe _stopping
            self.ring.wake_waiters()
            watcher.join(2.0)
        except BaseException as exc:
            if not self._ready.is_set():
                self._error = exc
                self._ready.set()
            raise
        finally:
            for lst in listeners:
                lst.close()
            listeners.clear()
            if self._ports:
                self.ring.clear_server_address()
            log.info("server for ring %r stopped", self.ring.name)

    # ------------------------------------------------------- background --
    async def _sweeper(self):
        """Enforce idle and ACK deadlines by aborting late endpoints."""
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            now = time.monotonic()
            for c in list(self._conns.values()):
                if c.deadline is not None and now > c.deadline and c.ended is None:
                    self._abort(c, EndReason.ACK_TIMEOUT if c.phase is Phase.ACK else EndReason.IDLE)

    async def _recoverer(self):
        while True:
            await asyncio.sleep(RECOVER_INTERVAL_S)
            if self._deferred:
                self._retry_deferred()
            if self.ring.recover():
                self._waiters.notify_all()

    def _watch_ready(self):
        """Thread: sleep on the ring's futex while TAKE long-pollers wait; wake them in order."""
        ring, loop = self.ring, self._loop
        while not self._stopping:
            if not self._waiters.present.wait(0.5) or self._stopping:
                continue
            if ring.wait_ready(0.25) and not self._stopping:
                self._watch_ack.clear()
                try:
                    loop.call_soon_threadsafe(self._notify_from_watcher, ring.ready_count())
                except RuntimeError:
                    return
                self._watch_ack.wait(0.25)

    def _notify_from_watcher(self, k: int):
        self._waiters.notify(k)
        self._watch_ack.set()

    def _abort(self, c: _Conn, reason: EndReason):
        """End connection ``c``: abort its endpoint and cancel its handler task.

        A pending UCX tag receive is *not* cancelled when its peer is already
        gone (measured with ucxx 0.52), so the handler is interrupted by task
        cancellation instead; its ``finally`` returns every lease to READY.
        """
        if c.ended is not None:
            return
        c.ended = reason
        if reason is EndReason.ACK_TIMEOUT:
            self.metrics.ack_timeouts += 1
            log.warning("client on port index %d did not ACK within %.1f s: returning its payloads",
                        c.port_index, self._ack_timeout)
        elif reason is EndReason.IDLE:
            self.metrics.evictions += 1
            log.debug("evicting idle endpoint (port index %d)", c.port_index)
        elif reason is EndReason.PEER_CLOSED:
            log.debug("peer closed endpoint (port index %d, phase %s)", c.port_index, c.phase.value)
        try:
            engine.abort(c.ep)
        except Exception as exc:  # noqa: BLE001 - the sweeper and shutdown must go on; the handler is cancelled below
            log.warning("aborting an endpoint (port index %d) raised %r; its handler is cancelled anyway",
                        c.port_index, exc)
        if c.task is not None and c.task is not asyncio.current_task():
            c.task.cancel()

    def _on_ep_closed(self, conn: _Conn):
        """UCX close/error callback (peer died or closed): end the handler now."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._abort, conn, EndReason.PEER_CLOSED)

    # ---------------------------------------------------------- handlers --
    async def _serve_endpoint(self, ep, port_index: int = 0):
        task = asyncio.current_task()
        conn = _Conn(ep, port_index, time.monotonic() + self._idle_timeout, task=task)
        self._conns[task] = conn
        try:
            ep.set_close_callback(self._on_ep_closed, cb_args=(conn,))
        except compat.ucx_errors() as exc:  # pragma: no cover - the peer is gone already: the recv fails next
            log.debug("set_close_callback: %s", exc)
        self.metrics.endpoints += 1
        authed = self._token is None
        buf = np.empty(GETV_MAX_BYTES, np.uint8)  # a request, or a GETV with its entry table
        try:
            while True:
                conn.phase, conn.deadline = Phase.IDLE, time.monotonic() + self._idle_timeout
                buf[:] = 0  # a short message must never leave the previous request to be parsed again
                try:
                    await engine.recv(ep, buf)
                except compat.ucx_errors() as exc:
                    log.debug("endpoint closed (%s: %s)", type(exc).__name__, exc)
                    return
                try:
                    req = decode_request(buf[:REQUEST.size])
                except ProtocolError as exc:
                    self.metrics.count("?", exc.status.name)
                    log.info("bad request (%s); closing endpoint", exc)
                    await self._reply(ep, Response(exc.status, 0, message=str(exc)))
                    return
                if self._stopping:
                    await self._reply(ep, Response(Status.SHUTTING_DOWN, req.request_id, message="server stopping"))
                    return
                if not authed:
                    if req.op != Op.HELLO or not hmac.compare_digest(req.text.encode(), self._token):
                        self.metrics.count(req.op.name, "DENIED")
                        log.warning("denied: %s without a valid token; closing endpoint", req.op.name)
                        await self._reply(ep, Response(Status.DENIED, req.request_id,
                                                       message="authentication required: HELLO with the token"))
                        return
                    authed = True
                self.metrics.by_port[port_index] += 1
                if not await self._dispatch(ep, conn, req, buf):
                    return
        except asyncio.CancelledError:
            pass
        finally:
            self._conns.pop(task, None)
            self.metrics.endpoints -= 1
            if conn.ended is None:
                try:
                    engine.abort(ep)
                except compat.ucx_errors() as exc:  # an endpoint that already failed may refuse
                    log.debug("abort after the handler ended: %s", exc)

    async def _reply(self, ep, resp: Response) -> bool:
        """Send ``resp``; False when the endpoint failed (a bad response is a bug: it raises)."""
        return await self._send(ep, encode_response(resp))

    async def _dispatch(self, ep, conn: _Conn, req: Request, buf) -> bool:
        """Serve one request. Returns False to close the endpoint."""
        op = req.op
        if op in (Op.HELLO, Op.PING):
            self.metrics.count(op.name, "OK")
            return await self._reply(ep, Response(Status.OK, req.request_id))
        if op == Op.GET:
            return await self._get(ep, conn, req, buf)
        if op == Op.TAKE:
            return await self._take(ep, conn, req, buf)
        if op == Op.GETV:
            return await self._getv(ep, conn, req, buf)
        if op == Op.TAKEV:
            return await self._takev(ep, conn, req, buf)
        if op == Op.STATS:
            body = json.dumps(self.snapshot()).encode()
            self.metrics.count(op.name, "OK")
            return await self._reply(ep, Response(Status.OK, req.request_id, nbytes=len(body))) and \
                await self._send(ep, np.frombuffer(body, np.uint8))
        self.metrics.count(op.name, "BAD_REQUEST")
        await self._reply(ep, Response(Status.BAD_REQUEST, req.request_id, message=f"unexpected {op.name}"))
        return False

    async def _send(self, ep, buf) -> bool:
        """Send ``buf``; False when the endpoint or its peer failed."""
        try:
            await engine.send(ep, buf)
            return True
        except compat.ucx_errors() as exc:
            log.debug("send failed: %s", exc)
            return False

    async def _get(self, ep, conn, req: Request, buf) -> bool:
        ring = self.ring
        if req.text != ring.name:
            self.metrics.count("GET", "BAD_REQUEST")
            await self._reply(ep, Response(Status.BAD_REQUEST, req.request_id,
                                           message=f"this server serves ring {ring.name!r}"))
            return False
        if req.ring_id != NO_RING_ID and req.ring_id != self._ring_id:
            self.metrics.count("GET", "STALE")
            return await self._reply(ep, Response(Status.STALE, req.request_id, req.slot, req.generation,
                                                  message="ring re-created or another host's ring"))
        if req.slot >= ring.slots:
            self.metrics.count("GET", "STALE")
            return await self._reply(ep, Response(Status.STALE, req.request_id, req.slot, req.generation,
                                                  message="slot out of range"))
        try:
            lease = ring.try_claim(shm.SlotRef(ring.name, req.slot, req.generation, 0))
        except shm.StaleSlotError:
            self.metrics.count("GET", "STALE")
            return await self._reply(ep, Response(Status.STALE, req.request_id, req.slot, req.generation,
                                                  message="generation gone"))
        except shm.SlotBusyError:
            self.metrics.count("GET", "BUSY")
            return await self._reply(ep, Response(Status.BUSY, req.request_id, req.slot, req.generation,
                                                  message="leased by another reader"))
        if req.flags & FLAG_ONE_MESSAGE and lease.nbytes != req.max_nbytes:
            lease.nack()
            self.metrics.count("GET", "BAD_REQUEST")
            return await self._reply(ep, Response(Status.BAD_REQUEST, req.request_id, req.slot, req.generation,
                                                  lease.nbytes, message="ref nbytes does not match the payload"))
        if req.max_nbytes and lease.nbytes > req.max_nbytes:
            lease.nack()
            self.metrics.count("GET", "TOO_LARGE")
            return await self._reply(ep, Response(Status.TOO_LARGE, req.request_id, req.slot, req.generation,
                                                  lease.nbytes, message="payload exceeds max_nbytes"))
        return await self._deliver(ep, conn, req, [lease], buf)

    async def _take(self, ep, conn, req: Request, buf) -> bool:
        n = max(1, min(req.n or 1, self._max_take))
        leases = self._claim_ready(n, req.max_nbytes)
        if not leases and req.wait_ms:
            deadline = time.monotonic() + req.wait_ms / 1000.0
            conn.phase, conn.deadline = Phase.WAIT, None
            while not leases and not self._stopping:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                await self._waiters.wait(remaining)
                leases = self._claim_ready(n, req.max_nbytes)
        if not leases:
            self.metrics.count("TAKE", "EMPTY")
            status = Status.SHUTTING_DOWN if self._stopping else Status.EMPTY
            return await self._reply(ep, Response(status, req.request_id))
        return await self._deliver(ep, conn, req, leases, buf)

    # ------------------------------------------------------------ batches --
    async def _getv(self, ep, conn, req: Request, buf) -> bool:
        """GETV: n refs of this ring in one request (its entry table follows the header
        in the same message)."""
        ring, n = self.ring, req.n
        if not 1 <= n <= MAX_BATCH or req.text != ring.name:
            self.metrics.count("GETV", "BAD_REQUEST")
            why = f"GETV of {n} refs (1..{MAX_BATCH})" if req.text == ring.name else \
                f"this server serves ring {ring.name!r}"
            await self._reply(ep, Response(Status.BAD_REQUEST, req.request_id, message=why))
            return False
        try:
            table = read_batch_array(buf, n, REQUEST.size)
            fields = decode_fields(buf, REQUEST.size + batch_table_size(n), req.slot) \
                if req.flags & FLAG_FIELDS else None
        except ProtocolError as exc:
            self.metrics.count("GETV", "BAD_REQUEST")
            await self._reply(ep, Response(Status.BAD_REQUEST, req.request_id, message=str(exc)))
            return False
        slots = table["slot"].astype(np.int64)
        ordered = np.sort(slots)
        if (ordered[1:] == ordered[:-1]).any() or (req.flags & FLAG_ONE_MESSAGE
                                           and (int(table["nbytes"].sum()) > ONE_MESSAGE_MAX
                                                or fields is not None)):
            self.metrics.count("GETV", "BAD_REQUEST")
            await self._reply(ep, Response(Status.BAD_REQUEST, req.request_id,
                                           message="a slot appears twice, or one message above its maximum"))
            return False
        table["status"] = Status.STALE
        batch = None
        if req.ring_id == NO_RING_ID or req.ring_id == self._ring_id:
            inr = np.flatnonzero(slots < ring.slots)
            batch, codes = ring.claim_batch(slots[inr], table["generation"][inr])
            table["status"][inr[codes < 0]] = Status.BUSY
            got = inr[codes > 0]
            wrong = batch.nbytes != table["nbytes"][got].astype(np.int64)  # the ref's size must match
            if wrong.any():
                bad = np.flatnonzero(wrong)
                for lease in batch.leases(bad):
                    lease.nack()
                table["status"][got[bad]] = Status.BAD_REQUEST
                table["status"][got[~wrong]] = Status.OK
                batch = batch.subset(np.flatnonzero(~wrong))
            else:
                table["status"][got] = Status.OK
        counts = np.bincount(table["status"], minlength=len(Status))
        for st in Status:
            if counts[st]:
                self.metrics.requests[("GETV", st.name)] += int(counts[st])
        return await self._answer_batch(ep, conn, req, table, batch, fields)

    async def _takev(self, ep, conn, req: Request, buf) -> bool:
        """TAKEV: like TAKE (oldest READY first, long-poll), answered in the batch format."""
        n = max(1, min(req.n or 1, self._max_take))  # (up to MAX_TAKE: a take(256) is one request)
        try:
            fields = decode_fields(buf, REQUEST.size, req.slot) if req.flags & FLAG_FIELDS else None
        except ProtocolError as exc:
            self.metrics.count("TAKEV", "BAD_REQUEST")
            await self._reply(ep, Response(Status.BAD_REQUEST, req.request_id, message=str(exc)))
            return False
        batch = self.ring.claim_oldest_batch(n, req.max_nbytes)
        if not len(batch) and req.wait_ms:
            deadline = time.monotonic() + req.wait_ms / 1000.0
            conn.phase, conn.deadline = Phase.WAIT, None
            while not len(batch) and not self._stopping:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                await self._waiters.wait(remaining)
                batch = self.ring.claim_oldest_batch(n, req.max_nbytes)
        if not len(batch):
            self.metrics.count("TAKEV", "EMPTY")
            status = Status.SHUTTING_DOWN if self._stopping else Status.EMPTY
            return await self._reply(ep, Response(status, req.request_id))
        self.metrics.count("TAKEV", "OK")
        table = batch_array(len(batch))
        table["status"] = Status.OK
        table["slot"], table["generation"], table["nbytes"] = batch.slots, batch.generations, batch.nbytes
        return await self._answer_batch(ep, conn, req, table, batch, fields)

    async def _answer_batch(self, ep, conn, req: Request, table: np.ndarray, batch, fields=None) -> bool:
        """Send the batch answer (header + entry table, then the payloads: with
        FLAG_ONE_MESSAGE all in that same message at the places the client expects,
        else as protocol.plan_batch lays them out: small ones coalesced through one
        staging copy, large ones straight from shared memory), then finalise every
        lease by the client's ACK/NACK. ``batch``: the OK items, in table order.
        ``fields``: send each payload projected to those top-level fields (the table
        then gives the projected sizes; every projection is one staging copy)."""
        m = self.metrics
        n = len(table)
        ok = np.flatnonzero(table["status"] == Status.OK)
        held = 0 if batch is None else len(batch)
        m.inflight += 1
        done = False
        try:  # from here on, whatever fails returns the batch (the finally below)
            indexes = None
            if fields is not None and held:
                try:
                    indexes = [parse_index(batch.frame(k)) for k in range(held)]
                    table["nbytes"][ok] = [projected_size(ix, fields) for ix in indexes]
                except shm.FrameError as exc:  # validated at publish: only corruption after it gets here
                    log.warning("batch projection skipped, a frame does not parse (%s): payloads sent whole", exc)
                    indexes = None
            total = int(table["nbytes"][ok].sum())
            # FLAG_ONE_MESSAGE: GETV always (its refs gave the sizes); TAKEV when it fits the client's buffer
            layout = one_message_layout(n, table["nbytes"].tolist()) \
                if req.flags & FLAG_ONE_MESSAGE and fields is None else None
            inline = req.op == Op.TAKEV and layout is not None and layout[1] <= min(req.generation, ONE_MESSAGE_MAX)
            one = inline or (req.op == Op.GETV and layout is not None)
            staged = []  # pooled staging buffers: back to the pool once their send completed
            if one:  # header, table and every payload in one message
                offsets, size = layout
                staged.append(self._staging.get(size))
                msg = staged[-1][:size]
                if held:
                    batch.copy_frames(msg, [offsets[i] for i in ok.tolist()])
            else:
                msg = np.empty(RESPONSE.size + batch_table_size(n), np.uint8)
            encode_response(Response(Status.OK, req.request_id, nbytes=total, count=n, ring_id=self._ring_id,
                                     flags=FLAG_PAYLOADS_INLINE if inline else 0), msg[:RESPONSE.size].data.cast("B"))
            write_batch_array(table, msg, RESPONSE.size)
            t0 = time.monotonic()
            hold = min(req.hold_s, MAX_HOLD_S) if req.flags & FLAG_HOLD else 0
            conn.phase, conn.deadline = Phase.ACK, time.monotonic() + self._ack_timeout + hold + total / self._min_rate
            # each message is posted as soon as it is ready, the header first: what a post sends at
            # once (the header, each rendezvous request) leaves while later stages are copied, so
            # the client plans its receives and answers those requests meanwhile
            sends = [engine.post_send(ep, msg)]
            try:
                if not one:
                    sizes = table["nbytes"].tolist()
                    pos = {i: k for k, i in enumerate(ok.tolist())}  # table index -> batch item
                    for plan in plan_batch([(i, sizes[i]) for i in ok.tolist()]):
                        if indexes is None and len(plan) == 1 and sizes[plan[0][0]] >= COALESCE_BELOW:
                            sends.append(engine.post_send(ep, batch.frame(pos[plan[0][0]])))  # zero-copy, the slot
                            continue
                        size = plan[-1][1] + sizes[plan[-1][0]]
                        staged.append(self._staging.get(size))
                        stage = staged[-1][:size]
                        if indexes is None:
                            batch.copy_frames(stage, [off for _, off in plan], [pos[i] for i, _ in plan])
                        else:
                            for i, off in plan:
                                k = pos[i]
                                project_into(stage[off:off + sizes[i]], batch.frame(k), indexes[k], fields)
                        sends.append(engine.post_send(ep, stage))
                await (sends[0] if len(sends) == 1 else asyncio.gather(*sends))
            except BaseException:  # the endpoint failed mid-answer: the sends posted end on their own
                for f in sends:
                    f.add_done_callback(_observed)
                raise
            for b in staged:  # sent: UCX is done reading them (a failed send keeps its buffer out of the pool)
                self._staging.put(b)
            m.bytes_out += total
            m.payloads_out += held
            log.debug("sent batch of %d (%d OK) for request %d; awaiting ACK", n, held, req.request_id)
            ack_buf = np.zeros(REQUEST.size, np.uint8)
            await engine.recv(ep, ack_buf)
            ack = decode_request(ack_buf)
            if ack.op not in (Op.ACK, Op.NACK) or ack.request_id != req.request_id:
                raise ProtocolError(f"expected ACK/NACK for request {req.request_id}, got {ack.op.name} "
                                    f"for {ack.request_id}")
            if held:
                if ack.op == Op.ACK and not ack.flags & FLAG_VERDICTS:
                    k = held if not 0 < ack.n < held else ack.n  # ACK n: the first n consumed
                    self._finalise_batch(batch, np.arange(held) < k)
                elif ack.op == Op.ACK:
                    verdict = np.frombuffer(ack.text.ljust(n, "N").encode()[:n], np.uint8)[ok]
                    self._finalise_batch(batch, verdict == ord("A"), np.flatnonzero(verdict == ord("U")))
                else:
                    bad = np.flatnonzero((table["slot"][ok] == ack.slot) & (table["generation"][ok] == ack.generation)) \
                        if ack.flags & FLAG_UNDECODABLE else np.zeros(0, np.int64)
                    self._finalise_batch(batch, np.zeros(held, bool), bad)
            done = True
            m.handler_latency.add(time.monotonic() - t0)
            return True
        except ProtocolError as exc:
            log.info("protocol violation while awaiting a batch ACK (%s); payloads returned, endpoint closed", exc)
            await self._reply(ep, Response(exc.status, req.request_id, message=str(exc)))
            return False
        except asyncio.CancelledError:
            raise
        except compat.ucx_errors() as exc:
            log.info("endpoint failed during a batch delivery (%s: %s); payloads returned to READY",
                     type(exc).__name__, exc)
            return False
        except Exception:  # noqa: BLE001 - a bug: logged with its traceback; the server lives on, nothing lost
            log.exception("internal error during a batch delivery; payloads returned to READY, endpoint closed")
            return False
        finally:
            m.inflight -= 1
            if not done and held:
                self._finalise_batch(batch, np.zeros(held, bool))

    def _finalise_batch(self, batch, acks: np.ndarray, undecodable=()) -> None:
        """Finalise a batch with one lock syscall; item by item (deferring what a frozen
        process blocks) when that range is busy or some payload was undecodable."""
        m = self.metrics
        acks = np.asarray(acks, bool)
        if len(undecodable):
            for i, lease in zip(undecodable, batch.leases(undecodable)):
                self._finalise([lease], False, (lease.slot, lease.generation))
            m.nacks += len(undecodable)
        live = batch.live()
        if not len(live):
            return
        if not batch.finalise(acks):
            for i, lease in zip(live, batch.leases(live)):
                self._finalise([lease], bool(acks[i]))
        k = int(acks[live].sum())
        m.acks += k
        m.nacks += len(live) - k
        if k < len(live):
            self._waiters.notify(len(live) - k)

    def _claim_ready(self, n: int, max_nbytes: int) -> list:
        """Up to ``n`` READY payloads, oldest first, skipping (leaving READY) any
        larger than the client's ``max_nbytes`` (0 = no limit)."""
        out = []
        while len(out) < n:
            lease = self.ring.try_claim(max_nbytes=max_nbytes)
            if lease is None:
                break
            out.append(lease)
        return out

    async def _deliver(self, ep, conn, req: Request, leases: list, buf) -> bool:
        """Send each (header, payload) straight from shared memory, then wait for ACK/NACK."""
        m = self.metrics
        t0 = time.monotonic()
        m.inflight += 1
        # the ACK comes after the client received everything: slow links are slow, not impossible
        hold = min(req.hold_s, MAX_HOLD_S) if req.flags & FLAG_HOLD else 0
        conn.phase, conn.deadline = Phase.ACK, (time.monotonic() + self._ack_timeout + hold
                                            + sum(lease.nbytes for lease in leases) / self._min_rate)
        ok = False
        try:
            count = len(leases)
            one_message = req.op == Op.GET and req.flags & FLAG_ONE_MESSAGE
            for i, lease in enumerate(leases):
                resp = Response(Status.OK, req.request_id, lease.slot, lease.generation, lease.nbytes, i, count,
                                flags=FLAG_MORE if i + 1 < count else 0, ring_id=self._ring_id)
                if one_message:  # header in the slot's headroom: one message straight from shm
                    msg = lease.array(headroom=True)
                    encode_response(resp, msg[: RESPONSE.size].data.cast("B"))
                    await engine.send(ep, msg)
                else:
                    await engine.send(ep, encode_response(resp))
                    await engine.send(ep, lease.array())
                m.bytes_out += lease.nbytes
                m.payloads_out += 1
            m.count(req.op.name, "OK")
            log.debug("sent %d payload(s) for request %d; awaiting ACK", count, req.request_id)
            buf[:] = 0
            await engine.recv(ep, buf)
            ack = decode_request(buf[:REQUEST.size])
            if ack.op not in (Op.ACK, Op.NACK) or ack.request_id != req.request_id:
                raise ProtocolError(f"expected ACK/NACK for request {req.request_id}, got {ack.op.name} "
                                    f"for {ack.request_id}")
            if ack.op == Op.ACK:
                k = count if not 0 < ack.n < count else ack.n  # ACK n: the first n consumed, the rest back
                self._finalise(leases[:k], True)
                self._finalise(leases[k:], False)
                m.acks += k
                m.nacks += count - k
                if k < count:
                    self._waiters.notify(count - k)
            else:
                bad = (ack.slot, ack.generation) if ack.flags & FLAG_UNDECODABLE else None
                self._finalise(leases, False, bad)
                m.nacks += count
                self._waiters.notify(count)
            ok = True
            m.handler_latency.add(time.monotonic() - t0)
            return True
        except ProtocolError as exc:
            log.info("protocol violation while awaiting ACK (%s); payloads returned, endpoint closed", exc)
            await self._reply(ep, Response(exc.status, req.request_id, message=str(exc)))
            return False
        except asyncio.CancelledError:
            raise
        except compat.ucx_errors() as exc:
            log.info("endpoint failed during delivery (%s: %s); payloads returned to READY",
                     type(exc).__name__, exc)
            return False
        except Exception:  # noqa: BLE001 - a bug: logged with its traceback; the server lives on, nothing lost
            log.exception("internal error during delivery; payloads returned to READY, endpoint closed")
            return False
        finally:
            m.inflight -= 1
            if not ok:
                returned = [lease for lease in leases if not lease.finalised]
                self._finalise(returned, False)
                if returned:
                    m.nacks += len(returned)
                    self._waiters.notify(len(returned))

    def _finalise(self, leases: list, ack: bool, undecodable: tuple[int, int] | None = None) -> None:
        """ACK (``ack``) or NACK ``leases`` without ever blocking the loop on a cross-process
        lock: a slot whose lock is held by a frozen process is finalised later
        (its lease stays ours, so nothing is lost and no one else serves it)."""
        for lease in leases:
            bad = undecodable == (lease.slot, lease.generation)
            try:
                if ack:
                    lease.ack(lock_timeout=LOOP_LOCK_TIMEOUT_S)
                else:
                    lease.nack(undecodable=bad, lock_timeout=LOOP_LOCK_TIMEOUT_S)
                    if lease.dead_lettered:
                        self.metrics.dead_letters += 1
            except shm.SlotLockTimeoutError:
                # busy for LOOP_LOCK_TIMEOUT_S: on a loaded box, most often a producer descheduled
                # mid-transition; said as a warning only if it stays busy (_retry_deferred)
                log.debug("slot %d: lock busy; %s deferred", lease.slot, "ACK" if ack else "NACK")
                self._deferred.append(_Deferred(lease, ack, bad))

    def _retry_deferred(self) -> None:
        todo, self._deferred = self._deferred, []
        for d in todo:
            try:
                if d.ack:
                    d.lease.ack(lock_timeout=0)
                else:
                    d.lease.nack(undecodable=d.undecodable, lock_timeout=0)
            except shm.SlotLockTimeoutError:
                self._deferred.append(d)
                waited = time.monotonic() - d.since
                if not d.warned and waited >= FROZEN_LOCK_WARN_S:
                    d.warned = True
                    log.warning("slot %d: its lock has been held for %.1f s (a process frozen mid-transition: "
                                "SIGSTOP, a debugger, swapped out); its %s waits, the payload is not served "
                                "meanwhile; `ucxx-transport status --ring %s` lists stuck slots", d.lease.slot,
                                waited, "ACK" if d.ack else "NACK", self.ring.name)

    # --------------------------------------------------------- inspection --
    def snapshot(self) -> dict:
        """Everything STATS answers: server settings, metrics and the ring's state."""
        return {
            "server": {"ring": self.ring.name, "host": self._host, "ports": self._ports,
                       "progress_mode": engine.mode(), "auth": self._token is not None,
                       "ucx_progress_call_max_s": engine.progress_call_max_s()},
            "metrics": self.metrics.snapshot(),
            "ring": dict(self.ring.stats(), stuck_slots=self.ring.stuck_slots(probe_s=0),
                         deferred_finalisers=len(self._deferred)),
        }
