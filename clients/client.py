"""TransportClient: fetch payloads from ucxx-transport servers, exactly once.

Three retry layers (DESIGN.md "Client retry stack"):

1. one call: round-robin start port; a connection-level failure quarantines
   the (host, port) and the call moves to the next healthy port;
2. one ref: up to ``max_attempts`` tries of transient errors; STALE, DENIED,
   BAD_REQUEST are final;
3. a batch: up to ``max_rounds`` rounds of at most ``max_inflight``
   concurrent fetches, each round retrying only what is still retryable.

All UCX work runs on the process's UCX loop thread (``ucxx_transport.engine``):
sync methods block the calling thread with a deadline; async methods await
it from any other loop, which therefore never runs UCX work itself.

A payload is acknowledged only after it was received whole and its frame
validated; a payload seen before (same ring id, slot, generation) is ACKed and
dropped, never returned twice.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

import shm
from shm.frame import decode, decode_views, index_tail_range, parse_index
from shm.views import anchored
from ucxx_transport import engine
from ucxx_transport.config import resolve
from ucxx_transport.metrics import Reservoir
from ucxx_transport.protocol import (
    FLAG_FIELDS,
    FLAG_ONE_MESSAGE,
    MAX_TAKE,
    RESPONSE,
    Op,
    ProtocolError,
    Request,
    Status,
    FLAG_HOLD,
    FLAG_UNDECODABLE,
    FLAG_VERDICTS,
    MAX_BATCH,
    MAX_HOLD_S,
    ONE_MESSAGE_MAX,
    batch_table_size,
    read_batch_array,
    write_batch_array,
    REQUEST,
    batch_array,
    one_message_layout,
    plan_batch,
    decode_response,
    encode_fields,
    encode_request,
    ring_id_bytes,
    ring_id_hex,
)

from ucxx_transport.buffers import BufferPool
from .held import HeldDelivery, LocalDelivery
from .errors import (
    AlreadyDeliveredError,
    AuthError,
    CallTimeoutError,
    ConnectionLostError,
    CorruptPayloadError,
    InvalidRefError,
    NoAddressError,
    PayloadTooLargeError,
    ServerBusyError,
    StaleSlotError,
    TransportError,
    classify,
    status_error,
)
from .pool import EndpointPool, PooledEndpoint

log = logging.getLogger("clients.client")

#: ports tried by one call before it gives up (layer 1)
PORTS_PER_CALL = 2
#: how long closing an endpoint waits to confirm its last ACK
RETIRE_TIMEOUT_S = 2.0
#: a ring name that did not attach locally is tried again after this long
RING_RETRY_S = 5.0


@dataclass
class FetchResult:
    """Outcome of one ref in a batch: ``payload`` or ``error``."""

    ref: shm.SlotRef
    payload: shm.Payload | None = None
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _local_addresses() -> frozenset[str]:
    addrs = {"127.0.0.1", "localhost", "::1", socket.gethostname()}
    try:
        import psutil

        for infos in psutil.net_if_addrs().values():
            for a in infos:
                if a.family in (socket.AF_INET, socket.AF_INET6):
                    addrs.add(a.address.split("%")[0])
    except Exception:  # pragma: no cover
        pass
    return frozenset(addrs)


class _Timeout:
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


class TransportClient:
    """Trainer-side client. Every argument left as None reads its
    ``UCXX_TRANSPORT_*`` environment variable, else the documented default.

    ``timeout``: deadline (s) of one network call, plus ``nbytes / min_rate``
    for a payload transfer (slow links are slow, not impossible); ``device``: ``"cpu"``
    (numpy views) or ``"cuda"`` (cupy views, received straight into device
    memory); ``local_fast_path``: claim refs of rings on this host straight
    from shared memory (no network; the payload's views stay valid until it
    is released, and releasing it consumes the slot). ``resolver``: optional
    ``callable(ref) -> (host, ports) | None`` for refs without a usable address
    (published while no server ran, or before a server restart on new ports);
    the ring's own header is consulted first when the ring is on this host.
    ``tensor_type``: ``"numpy"`` (default) or ``"torch"`` (zero-copy torch
    tensors, bf16/fp8 included; on the GPU with ``device="cuda"``).
    ``copy``: hand out owned copies instead of views, so the slot or receive
    buffer is recycled at once whatever the caller keeps (costs one copy).
    """

    def __init__(self, *, token=None, timeout=None, max_attempts=None, max_rounds=None, quarantine_s=None,
                 endpoint_max_age_s=None, pool_size=None, max_inflight=None, device="cpu",
                 local_fast_path=True, progress_mode=None, max_nbytes: int = 0, dedup_window: int = 100_000,
                 min_rate=None, resolver=None, tensor_type: str = "numpy", copy: bool = False):
        if tensor_type not in ("numpy", "torch"):
            raise ValueError(f"tensor_type must be 'numpy' or 'torch', got {tensor_type!r}")
        #: "torch": payload values are zero-copy torch tensors (on the GPU for device="cuda")
        self.tensor_type = tensor_type
        #: True: hand out owned copies; the slot or receive buffer is freed at once, whatever the caller keeps
        self.copy = copy
        self.token = token.decode() if isinstance(token, bytes) else token
        self.timeout = resolve("timeout", timeout)
        self.min_rate = resolve("min_rate", min_rate)
        self._resolver = resolver
        self.max_attempts = resolve("max_attempts", max_attempts)
        self.max_rounds = resolve("max_rounds", max_rounds)
        self.max_inflight = resolve("max_inflight", max_inflight)
        self._pool = EndpointPool(pool_size=resolve("pool_size", pool_size),
                                  endpoint_max_age_s=resolve("endpoint_max_age_s", endpoint_max_age_s),
                                  quarantine_s=resolve("quarantine_s", quarantine_s), retire=self._retire_soon)
        self._retiring: set = set()
        self._buffers = BufferPool(device)
        self.device = device
        self.local_fast_path = local_fast_path
        self.max_nbytes = max_nbytes
        self._mode = progress_mode
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_lock = threading.Lock()
        self._closed = False
        self._ids = itertools.count(1)
        self._delivered: collections.OrderedDict = collections.OrderedDict()
        self._dedup_window = dedup_window
        self._rings: dict[str, tuple[shm.RingBuffer | None, float]] = {}  # name -> (handle, attached at)
        self._rings_lock = threading.Lock()
        self._local_addrs = _local_addresses()
        self._stats = collections.Counter()
        self._latency = Reservoir()

    # ----------------------------------------------------------- lifetime --
    def _ucx_loop(self) -> asyncio.AbstractEventLoop:
        if self._closed:
            raise TransportError("client is closed")
        with self._loop_lock:
            if self._loop is None:
                self._loop = engine.acquire(self._mode)
            return self._loop

    def close(self, timeout: float = 5.0) -> None:
        """Close pooled endpoints and release UCX (bounded; idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._loop is not None:
            try:
                asyncio.run_coroutine_threadsafe(self._aclose_pool(), self._loop).result(timeout)
            except Exception as exc:
                log.debug("closing pool: %r", exc)
            engine.release(timeout)
            self._loop = None
        self._rings.clear()  # handles close when no payload view uses them
        self._buffers.clear()

    async def _aclose_pool(self):
        for pe in self._pool.drain():
            self._retire_soon(pe)
        if self._retiring:
            await asyncio.wait(list(self._retiring), timeout=RETIRE_TIMEOUT_S + 0.5)

    def _retire_soon(self, pe: PooledEndpoint) -> None:
        """Close a healthy endpoint; first confirm its last ACK if needed (on the UCX loop)."""
        if not pe.unconfirmed_ack:
            pe.abort()
            return
        task = asyncio.get_running_loop().create_task(self._retire(pe))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _retire(self, pe: PooledEndpoint) -> None:
        t = _Timeout(asyncio.get_running_loop(), RETIRE_TIMEOUT_S, pe)
        try:
            await self._request(pe, Request(Op.PING, next(self._ids)))  # answered after the ACK was applied
        except BaseException as exc:  # noqa: BLE001 - best effort; the server's ack timeout covers the rest
            if isinstance(exc, asyncio.CancelledError) and not t.fired:
                raise
            log.debug("could not confirm the last ACK on %s:%d (%r)", pe.host, pe.port, exc)
        finally:
            t.cancel()
            pe.abort()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await asyncio.get_running_loop().run_in_executor(None, self.close)

    # ------------------------------------------------------ sync / async ---
    def _run(self, coro_fn, *args, budget: float):
        self._ucx_loop()
        try:
            return engine.run(coro_fn(*args), budget + 5.0)
        except TimeoutError:
            raise CallTimeoutError(f"no answer within {budget + 5.0:.1f} s") from None

    async def _arun(self, coro_fn, *args):
        loop = self._ucx_loop()
        if asyncio.get_running_loop() is loop:
            return await coro_fn(*args)
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro_fn(*args), loop))

    def _transfer_s(self, nbytes: int) -> float:
        """Extra deadline for moving ``nbytes`` over the slowest expected link."""
        return nbytes / self.min_rate

    def call_budget(self, nbytes: int = 0) -> float:
        """The longest one ref's fetch (of ``nbytes``) can take, every retry included:
        how long a caller waiting on :meth:`submit`'s future should wait at most."""
        return (self.timeout + self._transfer_s(nbytes)) * PORTS_PER_CALL * self.max_attempts \
            + 0.5 * self.max_attempts

    @staticmethod
    def _checked(ref) -> shm.SlotRef:
        """A valid SlotRef from ``ref`` (a SlotRef or its ``to_dict()``), checked
        again here: a ref may have been built around its constructor."""
        try:
            if isinstance(ref, dict):
                return shm.SlotRef.from_dict(ref)
            if not isinstance(ref, shm.SlotRef):
                raise InvalidRefError(f"expected a shm.SlotRef or its to_dict(), got {type(ref).__name__}: "
                                      f"{ref!r:.200}")
            ref.__post_init__()
            return ref
        except shm.InvalidRefError as exc:
            if isinstance(exc, InvalidRefError):
                raise
            raise InvalidRefError(str(exc)) from None

    def fetch(self, ref: shm.SlotRef, *, fields=None) -> shm.Payload:
        """Fetch one payload (local fast path when possible). Raises a
        :class:`TransportError` subclass when every attempt failed
        (:class:`InvalidRefError` for a malformed ref, before any I/O).
        ``fields``: only these top-level fields travel (see :meth:`fetch_many`)."""
        if fields is not None:
            r = self.fetch_many([ref], fields=fields)[0]
            if r.error is not None:
                raise r.error
            return r.payload
        ref = self._checked(ref)
        local = self._fetch_local(ref)
        if local is not None:
            return self.present(local)
        return self.present(self._run(self._fetch_ref, ref, budget=self.call_budget(ref.nbytes)))

    async def afetch(self, ref: shm.SlotRef, *, fields=None) -> shm.Payload:
        """:meth:`fetch` for callers with their own event loop (awaits instead of blocking)."""
        if fields is not None:
            r = (await self.afetch_many([ref], fields=fields))[0]
            if r.error is not None:
                raise r.error
            return r.payload
        ref = self._checked(ref)
        local = self._fetch_local(ref)
        if local is not None:
            return self.present(local)
        return self.present(await self._arun(self._fetch_ref, ref))

    def present(self, payload: shm.Payload) -> shm.Payload:
        """``payload`` as this client hands payloads out (``copy``, ``tensor_type``)."""
        if self.copy:
            owned = payload.copy()
            payload.release()  # its slot / receive buffer goes back now: nothing else holds it
            payload = owned
        if self.tensor_type == "numpy" or payload.is_raw:
            return payload
        return payload.with_values(payload.as_dict(torch=True, device="cuda" if self.device == "cuda" else None))

    def _present_results(self, results: list) -> list:
        if self.tensor_type != "numpy" or self.copy:
            for r in results:
                if r.payload is not None:
                    r.payload = self.present(r.payload)
        return results

    def fetch_many(self, refs: Sequence[shm.SlotRef], *, fields=None) -> list[FetchResult]:
        """Fetch a batch; one result per ref, in order (payload or error). Never
        raises for one ref's sake: a malformed ref is its own result
        (:class:`InvalidRefError`) and the rest of the batch is delivered.

        ``fields`` (a list of top-level field names): the server sends only those
        fields of each payload (absent ones are skipped). The payload is still
        consumed whole: what was not asked for is dropped with it (a payload is the
        unit of exactly-once delivery; leaving part of it behind would let it be
        consumed twice). Same-host refs are read in place and simply restricted;
        with ``device="cuda"`` the whole payload travels and is restricted here."""
        if fields is not None:
            encode_fields(fields)  # a bad list fails here, before anything is claimed
        refs = list(refs)
        total = sum(getattr(r, "nbytes", 0) if isinstance(getattr(r, "nbytes", 0), int) else 0 for r in refs)
        waves = max(1, -(-len(refs) // self.max_inflight))
        budget = (self.call_budget() * waves + self._transfer_s(min(total, 1 << 50))) * self.max_rounds
        return self._present_results(self._run(self._fetch_many, refs, fields, budget=budget))

    async def afetch_many(self, refs: Sequence[shm.SlotRef], *, fields=None) -> list[FetchResult]:
        """:meth:`fetch_many` for callers with their own event loop."""
        if fields is not None:
            encode_fields(fields)
        return self._present_results(await self._arun(self._fetch_many, list(refs), fields))

    def take(self, address, n: int = 1, wait: float = 0.0, *, fields=None) -> list[shm.Payload]:
        """The next ``n`` READY payloads of a server (publish order), waiting up
        to ``wait`` seconds for the first (long-poll). ``address``: (host, ports) or a ref.
        ``fields``: only those top-level fields travel (see :meth:`fetch_many`)."""
        host, ports = self._address(address)
        blob = None if fields is None else encode_fields(fields)
        got = self._run(self._take, host, ports, n, wait, 0, blob,
                        budget=self.call_budget() + wait + self._transfer_s(n << 24))
        return [self.present(p) for p in got]

    async def atake(self, address, n: int = 1, wait: float = 0.0, *, fields=None) -> list[shm.Payload]:
        """:meth:`take` for callers with their own event loop."""
        host, ports = self._address(address)
        blob = None if fields is None else encode_fields(fields)
        return [self.present(p) for p in await self._arun(self._take, host, ports, n, wait, 0, blob)]

    def server_stats(self, address) -> dict:
        """The server's STATS answer (counters, slot states, latencies) as a dict."""
        host, ports = self._address(address)
        return self._run(self._server_stats, host, ports, budget=self.call_budget())

    async def aserver_stats(self, address) -> dict:
        """:meth:`server_stats` for callers with their own event loop."""
        host, ports = self._address(address)
        return await self._arun(self._server_stats, host, ports)

    def ping(self, address) -> float:
        """Round-trip time (s) of a PING."""
        host, ports = self._address(address)
        return self._run(self._ping, host, ports, budget=self.call_budget())

    def connect(self, *addresses) -> dict:
        """Open and authenticate pooled endpoints to every port of each address
        ((host, ports) or a ref) now, so the first fetch does not pay for it (a first
        connection costs ~0.5 s over TCP here). Returns {(host, port): PING round trip
        in s} for the ports that answered; the others are logged. Raises
        :class:`ConnectionLostError` when no port answered."""
        targets = [(h, p) for a in addresses for h, ps in [self._address(a)] for p in ps]
        got = self._run(self._connect_all, targets, budget=self.call_budget())
        ok = {t: r for t, r in got.items() if not isinstance(r, BaseException)}
        for (h, p), r in got.items():
            if isinstance(r, BaseException):
                log.warning("connect %s:%s failed: %s: %s", h, p, type(r).__name__, r)
        if targets and not ok:
            raise ConnectionLostError(f"connect: none of {len(targets)} port(s) answered "
                                      f"({', '.join(f'{h}:{p}' for h, p in targets[:4])}...)")
        return ok

    async def _connect_all(self, targets: list) -> dict:
        async def one(h, p):
            try:
                return await self._ping_port(h, p)
            except Exception as exc:  # noqa: BLE001 - one port's failure is its own result
                return exc
        outs = await asyncio.gather(*(one(h, p) for h, p in targets))
        return dict(zip(targets, outs))

    def stats(self) -> dict:
        d = dict(self._stats)
        d.update(self._pool.stats)
        d["latency_s"] = self._latency.percentiles()
        d["buffer_allocations"] = self._buffers.allocations
        d["buffer_reuses"] = self._buffers.reuses
        return d

    def stream(self, refs=None, *, address=None, depth: int = 4, take_n: int = 1, wait: float = 1.0,
               hold_s: float | None = None):
        """A :class:`~clients.stream.FetchStream` over ``refs`` or over TAKE from ``address``
        (only what it hands out is consumed; see its docs)."""
        from .stream import DEFAULT_HOLD_S, FetchStream

        return FetchStream(self, refs, address=address, depth=depth, take_n=take_n, wait=wait,
                           hold_s=hold_s or DEFAULT_HOLD_S)

    def _address(self, address) -> tuple[str, list[int]]:
        if isinstance(address, shm.SlotRef):
            return self._where(address)
        host, ports = address
        if isinstance(ports, int):
            ports = [ports]
        return host, list(ports)

    # -------------------------------------------------------- local path ---
    def _local_ring(self, ref: shm.SlotRef) -> shm.RingBuffer | None:
        """The ring of ``ref`` for the local fast path, or None (use the network)."""
        if not self.local_fast_path or self.device != "cpu":
            return None
        return self._ring_here(ref)

    def _ring_here(self, ref: shm.SlotRef) -> shm.RingBuffer | None:
        """This host's handle of the very ring ``ref`` names (same ring id), or None.

        A cached handle whose segment was unlinked or replaced (a ring re-created
        under the same name) is dropped and the name attached again; a name that
        did not attach is tried again after RING_RETRY_S.
        """
        if ref.host is not None and ref.host not in self._local_addrs:
            return None
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

    def _where(self, ref: shm.SlotRef) -> tuple[str, list[int]]:
        """(host, ports) to ask for ``ref``: its own address, else the live server
        recorded in the ring's header (ring on this host), else the resolver."""
        if ref.host and ref.ports:
            return ref.host, list(ref.ports)
        found = self._resolve(ref)
        if found is None:
            raise NoAddressError(
                f"ref {ref.key} carries no server address (published while no server ran) and no server is "
                f"known for ring {ref.ring!r}: start one (`ucxx-transport serve --ring {ref.ring}`) or give "
                f"TransportClient a resolver")
        return found

    def _resolve(self, ref: shm.SlotRef) -> tuple[str, list[int]] | None:
        """The current server address of ref's ring, or None."""
        ring = self._ring_here(ref)
        addr = ring.server_address() if ring is not None else None
        if addr is not None and addr[1]:
            return addr[0], list(addr[1])
        if self._resolver is not None:
            found = self._resolver(ref)
            if found:
                host, ports = found
                return host, [ports] if isinstance(ports, int) else list(ports)
        return None

    def submit(self, ref, *, hold_s: float = 0) -> concurrent.futures.Future:
        """Start fetching ``ref`` now; a future of its payload. With ``hold_s`` the
        future's result is a delivery (``.payloads``, ``.settle_sync(k, timeout)``)
        that is not consumed until settled: ``settle_sync(1, ...)`` consumes it,
        ``settle_sync(0, ...)`` gives it back to READY; the server holds it up to
        ``hold_s`` seconds. Same-host refs are claimed synchronously."""
        ref = self._checked(ref)
        if self._local_ring(ref) is not None:
            fut: concurrent.futures.Future = concurrent.futures.Future()
            try:
                got = self._claim_local(ref)
            except BaseException as exc:  # noqa: BLE001 - delivered through the future
                fut.set_exception(exc)
                return fut
            if got is not None:
                payload, lease = got
                if not hold_s:
                    lease.ack()  # consumed now; the slot stays PINNED while views of it live
                fut.set_result(LocalDelivery(self, ref.key, payload, lease) if hold_s else payload)
                return fut
        return asyncio.run_coroutine_threadsafe(self._fetch_ref(ref, hold_s), self._ucx_loop())

    def submit_many(self, refs: Sequence[shm.SlotRef]) -> concurrent.futures.Future:
        """Start :meth:`fetch_many` in the background: a future of its results."""
        return asyncio.run_coroutine_threadsafe(self._fetch_many(list(refs)), self._ucx_loop())

    def delivered(self, key) -> bool:
        """Has this client already returned the payload ``key`` ((ring id, slot, generation))?"""
        return key in self._delivered

    def submit_take(self, address, n: int = 1, wait: float = 0.0, *, hold_s: float) -> concurrent.futures.Future:
        """Start a TAKE now; a future of a held delivery (see :meth:`submit`) of up to
        ``n`` payloads, consumed only as far as it is settled."""
        host, ports = self._address(address)
        return asyncio.run_coroutine_threadsafe(self._take(host, ports, n, wait, hold_s), self._ucx_loop())

    def _fetch_local(self, ref: shm.SlotRef) -> shm.Payload | None:
        got = self._claim_local(ref)
        if got is None:
            return None
        payload, lease = got
        lease.ack()  # consumed now, like a network fetch; the slot stays PINNED while views of it live
        return payload

    def _fetch_local_many(self, ring: shm.RingBuffer, refs: list) -> list:
        """Same-host refs of one ring, claimed and acked together (one lock syscall
        each way): per ref its Payload or the error it would have raised. Refs that
        the batch cannot settle (a slot named twice, a slot busy right now, a repeat
        delivery) go through :meth:`_fetch_local` one by one, with its retries."""
        t0 = time.perf_counter()
        out: list = [_ALONE] * len(refs)
        first: dict[int, int] = {}  # slot -> index of the first ref naming it
        for j, r in enumerate(refs):
            if r.key not in self._delivered and r.slot not in first:
                first[r.slot] = j
        idx = list(first.values())
        try:
            claims = ring.claim_many([refs[j].slot for j in idx], [refs[j].generation for j in idx])
        except ValueError:  # a slot beyond this ring's size: each ref gets its own error below
            claims = [_ALONE] * len(idx)
        leases = []
        for j, got in zip(idx, claims):
            if isinstance(got, shm.StaleSlotError):
                self._stats["stale"] += 1
                out[j] = StaleSlotError(f"local claim of {refs[j].key}: {got}")
            elif isinstance(got, shm.SlotLease):
                try:
                    out[j] = got.payload
                except shm.FrameError as exc:
                    got.nack(undecodable=True)
                    out[j] = CorruptPayloadError(f"local frame of {refs[j].key}: {exc}")
                    continue
                leases.append((j, got))
        if leases and not ring.try_finalise_many([le for _, le in leases], True):
            for _, le in leases:  # some slot's lock is busy: one by one, each waits up to its timeout
                le.ack()
        per = (time.perf_counter() - t0) / max(1, len(leases))
        for j, le in leases:
            self._remember(refs[j].key)
            self._stats["local_fetches"] += 1
            self._stats["bytes"] += le.nbytes
            self._latency.add(per)
        for j, o in enumerate(out):
            if o is _ALONE:
                try:
                    out[j] = self._fetch_local(refs[j])
                except (TransportError, shm.RingError) as exc:
                    out[j] = exc
        return out

    def _claim_local(self, ref: shm.SlotRef):
        """(payload, lease) claimed from this host's shared memory, or None."""
        ring = self._local_ring(ref)
        if ring is None:
            return None
        t0 = time.perf_counter()
        last: BaseException | None = None
        for attempt in range(self.max_attempts):
            try:
                lease = ring.claim(ref, timeout=0 if attempt == 0 else 0.05)
                break
            except shm.StaleSlotError as exc:
                self._stats["stale"] += 1
                raise StaleSlotError(str(exc)) from None
            except shm.SlotBusyError as exc:
                last = exc
                self._stats["retries"] += 1
        else:
            raise ServerBusyError(f"local claim of {ref.key}: {last}")
        if ref.key in self._delivered:  # served again after a crash between our ACK and its apply
            lease.ack()
            self._stats["duplicates_dropped"] += 1
            raise AlreadyDeliveredError(f"{ref.key} was already delivered to this client (ACKed again, dropped)")
        try:
            payload = lease.payload
        except shm.FrameError as exc:
            lease.nack(undecodable=True)
            raise CorruptPayloadError(f"local frame of {ref.key}: {exc}") from exc
        self._remember(ref.key)
        self._stats["local_fetches"] += 1
        self._stats["bytes"] += lease.nbytes
        self._latency.add(time.perf_counter() - t0)
        return payload, lease

    # ------------------------------------------------------ network core ---
    async def _connect(self, host: str, port: int, budget: float) -> PooledEndpoint:
        self._stats["connects"] += 1
        try:
            ep = await engine.connect(host, port, budget)
        except Exception as exc:
            raise classify(exc, f"connect {host}:{port}") from exc
        pe = PooledEndpoint(ep, host, port)
        if self.token is not None:
            t = _Timeout(asyncio.get_running_loop(), budget, pe)
            try:
                resp = await self._request(pe, Request(Op.HELLO, next(self._ids), text=self.token))
            except asyncio.CancelledError:
                pe.abort()
                if not t.fired:
                    raise
                _uncancel()
                raise CallTimeoutError(f"HELLO {host}:{port}: no answer within {budget:.1f} s") from None
            except BaseException as exc:
                pe.abort()
                raise self._map(exc, t, f"HELLO {host}:{port}") from exc
            finally:
                t.cancel()
            if resp.status != Status.OK:
                pe.abort()
                raise AuthError(f"{host}:{port} refused the token: {resp.message}")
        return pe

    async def _confirm(self, pe: PooledEndpoint) -> None:
        """PING on ``pe`` under the call deadline: the server answers after applying
        everything sent before it on this endpoint (used to confirm an ACK)."""
        t = _Timeout(asyncio.get_running_loop(), self.timeout, pe)
        try:
            await self._request(pe, Request(Op.PING, next(self._ids)))
        except asyncio.CancelledError:
            if not t.fired:
                raise
            _uncancel()
            raise CallTimeoutError("PING after ACK: no answer within the deadline") from None
        finally:
            t.cancel()
        pe.unconfirmed_ack = False

    async def _request(self, pe: PooledEndpoint, req: Request):
        await engine.send(pe.ep, encode_request(req))
        hdr = np.zeros(RESPONSE.size, np.uint8)
        await engine.recv(pe.ep, hdr)
        pe.unconfirmed_ack = False  # the server answers in order: any earlier ACK was applied
        resp = decode_response(hdr)
        if resp.request_id != req.request_id:
            raise ProtocolError(f"response for request {resp.request_id}, expected {req.request_id}")
        return resp

    @staticmethod
    def _map(exc: BaseException, t: _Timeout, where: str) -> BaseException:
        if t.fired:
            err = CallTimeoutError(f"{where}: no answer within the deadline")
            err.__cause__ = exc
            return err
        return classify(exc, where)

    async def _with_endpoint(self, host: str, port: int, budget: float, body, where: str, fresh: bool = False):
        """Run ``body(pe)`` on a pooled endpoint under a deadline; recycle or discard it.

        A *pooled* endpoint that turns out dead (its server restarted on the same port:
        the connection was reset) is not a failed attempt: its idle siblings are dropped
        and the call runs once more on a fresh connection (nothing was ACKed, so the
        server gave back whatever it had sent)."""
        loop = asyncio.get_running_loop()
        pe = None if fresh else self._pool.checkout(host, port)
        reused = pe is not None
        if pe is None:
            pe = await self._connect(host, port, budget)
        t = pe.timer = _Timeout(loop, budget, pe)
        healthy = False
        stale = False
        try:
            result, healthy = await body(pe)
            if healthy is _HELD:  # the endpoint now belongs to the HeldDelivery until it is settled
                pe.timer, pe = None, None
                t.cancel()
            return result
        except _Answered:
            healthy = True  # the server answered with an error status: the endpoint is fine
            raise
        except asyncio.CancelledError:
            if not t.fired:
                raise
            _uncancel()
            raise CallTimeoutError(f"{where}: no answer within {budget:.1f} s") from None
        except BaseException as exc:
            err = self._map(exc, t, where)
            if not (reused and isinstance(err, ConnectionLostError)):
                raise err from exc
            stale = True
        finally:
            t.cancel()
            if pe is None:
                pass
            elif healthy and not t.fired:
                pe.timer = None
                self._pool.checkin(pe)
            else:
                pe.timer = None
                pe.abort()
            pe = None  # an exception's traceback keeps this frame: do not let it pin the endpoint
        if stale:
            self._stats["stale_endpoints"] += 1
            self._pool.discard(host, port)
            log.debug("%s: pooled endpoint to %s:%d was dead; retrying on a fresh connection", where, host, port)
            return await self._with_endpoint(host, port, budget, body, where, fresh=True)

    async def _call(self, host: str, ports, fn, where: str):
        """Layer 1: try ``fn(host, port)`` on up to PORTS_PER_CALL healthy ports."""
        last: TransportError | None = None
        for port in self._pool.order(host, ports)[:PORTS_PER_CALL]:
            self._stats["attempts"] += 1
            try:
                return await fn(host, port)
            except TransportError as exc:
                if not exc.quarantine:
                    raise
                self._pool.quarantine(host, port, str(exc))
                last = exc
        assert last is not None
        raise last

    def _remember(self, key) -> bool:
        """Record a delivered payload; False if it was delivered before (a duplicate)."""
        if key in self._delivered:
            self._stats["duplicates_dropped"] += 1
            return False
        self._delivered[key] = None
        if len(self._delivered) > self._dedup_window:
            self._delivered.popitem(last=False)
        return True

    async def _recv_payload(self, pe: PooledEndpoint, nbytes: int):
        base = self._buffers.get(nbytes)
        view = base[:nbytes]
        await engine.recv(pe.ep, view)
        return base, view

    def _make_payload(self, base, view, nbytes: int, expected: int | None, where: str) -> shm.Payload:
        pool = self._buffers
        try:
            if (expected and nbytes != expected) or self.device == "cuda":
                try:
                    if expected and nbytes != expected:
                        raise shm.FrameError(f"server sent {nbytes} bytes, the ref says {expected}")
                    head = view[:64].get().tobytes()
                    table_off, total = index_tail_range(head)
                    if total != nbytes:
                        raise shm.FrameError(f"frame length {total} != received {nbytes}")
                    tail = view[table_off:total].get().tobytes()
                    return decode_views(parse_index(head, nbytes, tail=tail), view)  # device buffers: not pooled
                except shm.FrameError:
                    pool.put(base)  # nothing views it
                    raise
            # the buffer goes back to the pool once no view of the payload is left (also when
            # decoding fails: the anchor is made first, and its callback gives the buffer back once)
            p = decode(view, readonly=False, on_gone=lambda: pool.put(base))
            if p.nbytes != nbytes:
                raise shm.FrameError(f"frame length {p.nbytes} != received {nbytes}")
            return p
        except shm.FrameError as exc:
            raise CorruptPayloadError(f"{where}: {exc}") from exc

    async def _get_once(self, ref: shm.SlotRef, host: str, port: int, hold: float = 0):
        """GET ``ref`` from one port: its payload, or with ``hold`` a :class:`HeldDelivery`."""
        where = f"GET {ref.ring}[{ref.slot}]@{ref.generation} from {host}:{port}"
        one = ref.nbytes > 0  # size known: header + payload arrive as one message

        async def body(pe):
            rid = next(self._ids)
            if one:  # allocate before asking: a buffer we cannot get fails this ref alone, nothing in flight
                total = RESPONSE.size + ref.nbytes
                base = self._buffers.get(total)
                msg = base[:total]
                msg[: RESPONSE.size] = 0  # a short answer must never leave an old header to be parsed
            await engine.send(pe.ep, encode_request(Request(
                Op.GET, rid, ref.slot, ref.generation, max_nbytes=ref.nbytes if one else self.max_nbytes,
                text=ref.ring, flags=(FLAG_ONE_MESSAGE if one else 0) | (FLAG_HOLD if hold else 0),
                ring_id=ring_id_bytes(ref.ring_id), hold_s=_hold_s(hold))))
            if one:
                await engine.recv(pe.ep, msg)
                pe.unconfirmed_ack = False
                head = msg[: RESPONSE.size]
                resp = decode_response(head.get() if self.device == "cuda" else head)
                if resp.request_id != rid:
                    self._buffers.put(base)
                    raise ProtocolError(f"response for request {resp.request_id}, expected {rid}")
                if resp.status != Status.OK:
                    self._buffers.put(base)
                    raise _Answered(status_error(resp.status, resp.message, where))
                view = msg[RESPONSE.size:]
            else:
                hdr = np.zeros(RESPONSE.size, np.uint8)
                await engine.recv(pe.ep, hdr)
                pe.unconfirmed_ack = False
                resp = decode_response(hdr)
                if resp.request_id != rid:
                    raise ProtocolError(f"response for request {resp.request_id}, expected {rid}")
                if resp.status != Status.OK:
                    raise _Answered(status_error(resp.status, resp.message, where))
                base, view = await self._recv_payload(pe, resp.nbytes)
            try:
                payload = self._make_payload(base, view, resp.nbytes, ref.nbytes or None, where)
            except CorruptPayloadError:
                await engine.send(pe.ep, encode_request(Request(Op.NACK, rid, resp.slot, resp.generation,
                                                                flags=FLAG_UNDECODABLE)))
                raise _Answered(CorruptPayloadError(f"{where}: corrupt payload (NACKed)"))
            if hold:
                return HeldDelivery(self, pe, rid, [(ref.key, payload)], hold), _HELD
            await engine.send(pe.ep, encode_request(Request(Op.ACK, rid)))
            pe.unconfirmed_ack = True
            return payload, True

        if self.max_nbytes and ref.nbytes > self.max_nbytes:
            raise PayloadTooLargeError(f"{where}: {ref.nbytes} bytes exceeds max_nbytes={self.max_nbytes}")
        try:
            return await self._with_endpoint(host, port, self.timeout + self._transfer_s(ref.nbytes), body, where)
        except _Answered as a:  # the server answered: the endpoint is fine, the error is real
            raise a.error from None

    async def _fetch_ref(self, ref: shm.SlotRef, hold: float = 0):
        """Layer 2: bounded retries of transient errors for one ref. With ``hold``,
        a :class:`HeldDelivery` whose ACK waits for :meth:`HeldDelivery.settle`."""
        host, ports = self._where(ref)
        t0 = time.perf_counter()
        last: TransportError | None = None
        for attempt in range(self.max_attempts):
            if attempt:
                self._stats["retries"] += 1
                await asyncio.sleep(min(0.05 * attempt, 0.5))
            try:
                payload = await self._call(host, ports, lambda h, p: self._get_once(ref, h, p, hold),
                                           f"GET {ref.key}")
            except TransportError as exc:
                if isinstance(exc, StaleSlotError):
                    self._stats["stale"] += 1
                if not exc.retryable:
                    raise
                last = exc
                if exc.quarantine:  # the address may be stale (server restarted on other ports)
                    found = self._resolve(ref)
                    if found is not None and found != (host, ports):
                        log.info("GET %s: server of ring %r moved to %s:%s", ref.key, ref.ring, *found)
                        host, ports = found
                continue
            if hold:
                held, payload = payload, payload.payloads[0]
                if ref.key in self._delivered:
                    await held.settle(1)
                    raise AlreadyDeliveredError(f"GET {ref.key}: this client already returned this payload once "
                                                f"(served again after a server crash); ACKed and dropped")
            elif not self._remember(ref.key):
                payload.release()  # ACKed (consumed) but never returned twice
                raise AlreadyDeliveredError(f"GET {ref.key}: this client already returned this payload once "
                                            f"(served again after a server crash); ACKed and dropped")
            self._stats["fetches"] += 1
            self._stats["bytes"] += payload.nbytes
            dt = time.perf_counter() - t0
            self._latency.add(dt)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("fetched %s (%d bytes) in %.0f us, attempt %d", ref.key, payload.nbytes, dt * 1e6,
                          attempt + 1)
            return held if hold else payload
        assert last is not None
        raise last

    async def _fetch_many(self, refs: list, fields=None) -> list[FetchResult]:
        """Layer 3: rounds; only retryable failures go to the next round. Refs of one
        server and ring travel as batches (GETV: one request, one entry table, small
        payloads coalesced, one ACK), several batches in flight at once."""
        results = [FetchResult(r) for r in refs]
        checked: dict[int, shm.SlotRef] = {}
        for i, r in enumerate(refs):
            try:
                checked[i] = self._checked(r)
            except Exception as exc:  # noqa: BLE001 - any failure is this ref's result; siblings go on
                results[i].error = exc.with_traceback(None)
        sem = asyncio.Semaphore(self.max_inflight)
        loop = asyncio.get_running_loop()

        def put(i, outcome):
            if isinstance(outcome, BaseException):
                results[i].payload, results[i].error = None, outcome.with_traceback(None)
            else:
                results[i].payload, results[i].error = outcome, None

        async def one(i):  # same host: a shared-memory claim; GPU receive: GET by GET
            async with sem:
                ref = checked[i]
                try:
                    local = await loop.run_in_executor(None, self._fetch_local, ref) \
                        if self._local_ring(ref) is not None else None
                    got = local if local is not None else await self._fetch_ref(ref)
                    put(i, got if fields is None else got.select(fields))
                except Exception as exc:  # noqa: BLE001 - any failure is this ref's result; siblings go on
                    put(i, exc)

        async def local_batch(idxs, ring):
            async with sem:
                try:
                    outs = await loop.run_in_executor(None, self._fetch_local_many, ring,
                                                      [checked[i] for i in idxs])
                except Exception as exc:  # noqa: BLE001 - the whole batch failed the same way
                    outs = [exc] * len(idxs)
                for i, o in zip(idxs, outs):
                    put(i, o if fields is None or isinstance(o, BaseException) else o.select(fields))

        async def batch(idxs, host, ports):
            async with sem:
                try:
                    outs = await self._call(host, ports, lambda h, p: self._getv_once(
                        [checked[i] for i in idxs], h, p, fields), f"GETV {len(idxs)}")
                except Exception as exc:  # noqa: BLE001 - the whole batch failed the same way
                    outs = [exc] * len(idxs)
                for i, o in zip(idxs, outs):
                    put(i, o)

        pending = list(checked)
        for rnd in range(self.max_rounds):
            if not pending:
                break
            if rnd:
                self._stats["rounds_retried"] += 1
                log.info("batch round %d: retrying %d ref(s)", rnd + 1, len(pending))
                await asyncio.sleep(min(0.05 * rnd, 0.5))
            tasks = []
            groups: dict = collections.defaultdict(list)
            here: dict = {}  # id(ring) -> (ring, indices): same-host refs, claimed a ring at a time
            rings: dict = {}  # (ring, ring id, host) -> this host's ring or None: looked up once a round
            for i in pending:
                ref = checked[i]
                try:
                    if self.device != "cpu":
                        tasks.append(one(i))
                        continue
                    where = (ref.ring, ref.ring_id, ref.host)
                    if where not in rings:
                        rings[where] = self._local_ring(ref)
                    ring = rings[where]
                    if ring is not None:
                        here.setdefault(id(ring), (ring, []))[1].append(i)
                        continue
                    host, ports = self._where(ref)
                except Exception as exc:  # noqa: BLE001 - e.g. no address: this ref's result
                    put(i, exc)
                    continue
                if ref.key in self._delivered:  # served again after a crash: GET it alone (ACKed, dropped)
                    tasks.append(one(i))
                    continue
                groups[(host, tuple(ports), ref.ring, ref.ring_id)].append(i)
            for ring, idxs in here.values():
                tasks.append(local_batch(idxs, ring))
            for (host, ports, _, _), idxs in groups.items():
                for chunk in _chunks(idxs, [checked[i].nbytes for i in idxs], len(ports) * self._pool.pool_size):
                    tasks.append(batch(chunk, host, list(ports)))
            await asyncio.gather(*tasks)
            pending = [i for i in pending if results[i].error is not None
                       and getattr(results[i].error, "retryable", False)]
        return results

    async def _recv_planned(self, pe: PooledEndpoint, ok: list[tuple[int, int]], where: str) -> dict:
        """Receive a batch answer's payloads as protocol.plan_batch lays them out;
        {item index: Payload, or CorruptPayloadError}. Payloads that shared a message
        share its buffer, returned to the pool when the last of them is released."""
        plan = plan_batch(ok)
        sizes = dict(ok)
        bufs = []
        for msg in plan:
            last_i, last_off = msg[-1]
            total = last_off + sizes[last_i]
            base = self._buffers.get(total)
            bufs.append((base, base[:total]))
        pe.timer.extend(self._transfer_s(sum(sizes.values())))
        if len(bufs) == 1:
            await engine.recv(pe.ep, bufs[0][1])
        else:
            await asyncio.gather(*(engine.recv(pe.ep, view) for _, view in bufs))
        out: dict = {}
        for msg, (base, view) in zip(plan, bufs):
            out.update(self._decode_shared(base, view, [(i, off, sizes[i]) for i, off in msg], where))
        return out

    def _decode_shared(self, base, view, items: list, where: str) -> dict:
        """Payloads at ``items`` [(index, offset, nbytes)] of one received message;
        {index: Payload or CorruptPayloadError}. They share the message's pooled
        buffer (one anchor): it goes back to the pool once no view of any of them is left."""
        pool = self._buffers
        out: dict = {}
        if not items:
            pool.put(base)
            return out
        u8, _ = anchored(view, readonly=False, on_gone=lambda: pool.put(base))
        for i, off, n in items:
            try:
                p = decode(u8[off:off + n], readonly=False)
                if p.nbytes != n:
                    raise CorruptPayloadError(f"{where}: item {i}: frame length {p.nbytes} != {n}")
                out[i] = p
            except shm.FrameError as exc:
                out[i] = CorruptPayloadError(f"{where}: item {i}: {exc}")
            except CorruptPayloadError as exc:
                out[i] = exc
        return out

    async def _recv_batch_head(self, pe: PooledEndpoint, rid: int, n: int, where: str):
        """The batch answer's header and entry table (or an error status)."""
        head = np.zeros(RESPONSE.size + batch_table_size(n), np.uint8)
        await engine.recv(pe.ep, head)
        pe.unconfirmed_ack = False
        return self._parse_batch_head(head, rid, n)

    @staticmethod
    def _parse_batch_head(head, rid: int, n: int):
        resp = decode_response(head[:RESPONSE.size])
        if resp.request_id != rid:
            raise ProtocolError(f"response for request {resp.request_id}, expected {rid}")
        if resp.status != Status.OK:
            return resp, None
        if not 1 <= resp.count <= n:
            raise ProtocolError(f"batch answer of {resp.count} items to a request of {n}")
        t = read_batch_array(head, resp.count, RESPONSE.size)
        return resp, list(zip(t["status"].tolist(), t["slot"].tolist(), t["generation"].tolist(),
                              t["nbytes"].tolist()))

    async def _getv_once(self, refs: list, host: str, port: int, fields=None) -> list:
        """GETV ``refs`` (one ring) from one port: per ref a Payload or an error
        (with ``fields``: projected by the server to those fields)."""
        n = len(refs)
        where = f"GETV {n} of {refs[0].ring} from {host}:{port}"
        if self.max_nbytes:
            big = [i for i, r in enumerate(refs) if r.nbytes > self.max_nbytes]
            if big:
                raise PayloadTooLargeError(f"{where}: {len(big)} ref(s) exceed max_nbytes={self.max_nbytes}")

        sizes = [r.nbytes for r in refs]
        slots = [r.slot for r in refs]
        gens = [r.generation for r in refs]
        blob = b"" if fields is None else encode_fields(fields)
        one = sum(sizes) <= ONE_MESSAGE_MAX and self.device == "cpu" and not blob  # projected sizes are unknown

        async def body(pe):
            rid = next(self._ids)
            table = batch_array(n)
            table["slot"], table["generation"], table["nbytes"] = slots, gens, sizes
            end = REQUEST.size + batch_table_size(n)
            req = np.empty(end + len(blob), np.uint8)  # header + entry table (+ field list): one message
            req[:REQUEST.size] = np.frombuffer(encode_request(Request(
                Op.GETV, rid, n=n, text=refs[0].ring, ring_id=ring_id_bytes(refs[0].ring_id), slot=len(blob),
                flags=(FLAG_ONE_MESSAGE if one else 0) | (FLAG_FIELDS if blob else 0))), np.uint8)
            write_batch_array(table, req, REQUEST.size)
            req[end:] = np.frombuffer(blob, np.uint8)
            if one:  # the whole answer is one message: receive it straight into one pooled buffer
                offsets, size = one_message_layout(n, sizes)
                base = self._buffers.get(size)
                msg = base[:size]
                msg[:RESPONSE.size] = 0
                recv = asyncio.ensure_future(engine.recv(pe.ep, msg))
                try:
                    await engine.send(pe.ep, req)
                    await recv
                except BaseException:
                    recv.cancel()
                    raise
                pe.unconfirmed_ack = False
                resp, entries = self._parse_batch_head(msg, rid, n)
                if entries is None:
                    self._buffers.put(base)
            else:
                await engine.send(pe.ep, req)
                resp, entries = await self._recv_batch_head(pe, rid, n, where)
            if entries is None:
                raise _Answered(status_error(resp.status, resp.message, where))
            if len(entries) != n:
                raise ProtocolError(f"{where}: {len(entries)} answers for {n} refs")
            out: list = [None] * n
            ok = []
            for i, (st, slot, gen, nbytes) in enumerate(entries):
                r = refs[i]
                if (slot, gen) != (r.slot, r.generation):
                    raise ProtocolError(f"{where}: item {i} answers slot {slot}@{gen}, asked {r.slot}@{r.generation}")
                if st == Status.OK:
                    if nbytes != r.nbytes and not blob:
                        raise ProtocolError(f"{where}: item {i} has {nbytes} bytes, the ref says {r.nbytes}")
                    ok.append((i, nbytes))
                else:
                    try:
                        out[i] = status_error(Status(st), "", f"{where}: item {i}")
                    except ValueError:
                        raise ProtocolError(f"{where}: unknown status {st}") from None
                    if st == Status.STALE:
                        self._stats["stale"] += 1
            if one:
                got = self._decode_shared(base, msg, [(i, offsets[i], nb) for i, nb in ok], where)
            else:
                got = await self._recv_planned(pe, ok, where)
            await self._ack_batch(pe, rid, n, got)
            for i, p in got.items():
                if isinstance(p, BaseException):
                    out[i] = p
                elif not self._remember(refs[i].key):
                    p.release()
                    out[i] = AlreadyDeliveredError(f"{where}: {refs[i].key} already returned by this client "
                                                   f"(served again after a server crash); ACKed and dropped")
                else:
                    out[i] = p
                    self._stats["fetches"] += 1
                    self._stats["bytes"] += p.nbytes
            return out, True

        try:
            return await self._with_endpoint(host, port, self.timeout, body, where)
        except _Answered as a:
            raise a.error from None

    async def _ack_batch(self, pe: PooledEndpoint, rid: int, n: int, got: dict) -> None:
        """One message finalises the batch: ACK (all), or per-item verdicts when some
        payload did not decode (those go back to READY, counted towards DEAD)."""
        if all(not isinstance(p, BaseException) for p in got.values()):
            req = Request(Op.ACK, rid)
        else:
            verdict = "".join("U" if isinstance(got.get(i), BaseException) else "A" if i in got else "-"
                              for i in range(n))
            req = Request(Op.ACK, rid, text=verdict, flags=FLAG_VERDICTS)
        await engine.send(pe.ep, encode_request(req))
        pe.unconfirmed_ack = True

    async def _takev_once(self, host: str, port: int, n: int, wait: float, hold: float = 0, fields_blob=None):
        """TAKEV from one port: the next READY payloads (or, with ``hold``, a HeldDelivery)."""
        where = f"TAKE {n} from {host}:{port}"

        async def body(pe):
            rid = next(self._ids)
            req = encode_request(Request(Op.TAKEV, rid, n=n, wait_ms=int(wait * 1000), max_nbytes=self.max_nbytes,
                                         flags=(FLAG_HOLD if hold else 0) | (FLAG_FIELDS if fields_blob else 0),
                                         hold_s=_hold_s(hold), slot=len(fields_blob or b"")))
            await engine.send(pe.ep, req + fields_blob if fields_blob else req)
            resp, entries = await self._recv_batch_head(pe, rid, n, where)
            if entries is None:
                if resp.status == Status.EMPTY:
                    return (HeldDelivery(self, None, rid, [], 0) if hold else []), True
                raise _Answered(status_error(resp.status, resp.message, where))
            rid_hex = ring_id_hex(resp.ring_id)
            for st, _, _, nbytes in entries:
                if st != Status.OK or (self.max_nbytes and nbytes > self.max_nbytes):
                    raise ProtocolError(f"{where}: item status {st}, {nbytes} bytes (max_nbytes={self.max_nbytes})")
            got = await self._recv_planned(pe, [(i, e[3]) for i, e in enumerate(entries)], where)
            keys = [(rid_hex, e[1], e[2]) for e in entries]
            corrupt = [i for i, p in got.items() if isinstance(p, BaseException)]
            if hold:
                if corrupt:
                    e = entries[corrupt[0]]
                    await engine.send(pe.ep, encode_request(Request(Op.NACK, rid, e[1], e[2],
                                                                    flags=FLAG_UNDECODABLE)))
                    for p in got.values():
                        if not isinstance(p, BaseException):
                            p.release()
                    raise _Answered(CorruptPayloadError(f"{where}: corrupt payload (batch NACKed)"))
                return HeldDelivery(self, pe, rid, [(keys[i], got[i]) for i in range(len(entries))], hold), _HELD
            await self._ack_batch(pe, rid, len(entries), got)
            kept = []
            for i in range(len(entries)):
                p = got[i]
                if isinstance(p, BaseException):
                    continue
                if self._remember(keys[i]):
                    kept.append(p)
                else:
                    p.release()
            if corrupt and not kept:
                raise _Answered(CorruptPayloadError(f"{where}: {len(corrupt)} corrupt payload(s) (NACKed)"))
            return kept, True

        try:
            return await self._with_endpoint(host, port, self.timeout + wait, body, where)
        except _Answered as a:
            raise a.error from None

    async def _take(self, host: str, ports, n: int, wait: float, hold: float = 0, fields_blob=None):
        if not 1 <= n <= MAX_TAKE:
            raise ValueError(f"n must be in [1, {MAX_TAKE}], got {n}")
        if wait < 0:
            raise ValueError("wait must be >= 0 seconds")
        last = None
        for attempt in range(self.max_attempts):
            if attempt:
                self._stats["retries"] += 1
            try:
                got = await self._call(host, ports, lambda h, p: self._takev_once(h, p, n, wait, hold, fields_blob),
                                       f"TAKE {n}")
                self._stats["takes"] += 1
                self._stats["bytes"] += sum(p.nbytes for p in (got.payloads if hold else got))
                return got
            except TransportError as exc:
                if not exc.retryable:
                    raise
                last = exc
        raise last

    async def _server_stats(self, host: str, ports) -> dict:
        import json

        async def once(h, p):
            async def body(pe):
                resp = await self._request(pe, Request(Op.STATS, next(self._ids)))
                if resp.status != Status.OK:
                    raise _Answered(status_error(resp.status, resp.message, f"STATS {h}:{p}"))
                buf = np.empty(resp.nbytes, np.uint8)
                await engine.recv(pe.ep, buf)
                return json.loads(buf.tobytes()), True
            try:
                return await self._with_endpoint(h, p, self.timeout, body, f"STATS {h}:{p}")
            except _Answered as a:
                raise a.error from None

        return await self._call(host, ports, once, "STATS")

    async def _ping_port(self, h: str, p: int) -> float:
        """Round trip (s) of one PING on a pooled endpoint to ``h:p`` (opened if needed)."""
        async def body(pe):
            t0 = time.perf_counter()
            await self._request(pe, Request(Op.PING, next(self._ids)))
            return time.perf_counter() - t0, True
        return await self._with_endpoint(h, p, self.timeout, body, f"PING {h}:{p}")

    async def _ping(self, host: str, ports) -> float:
        return await self._call(host, ports, self._ping_port, "PING")


#: ``body`` result flag: the endpoint stays with a HeldDelivery (no checkin, no abort)
_HELD = object()
_ALONE = object()  # a same-host ref the batch leaves to the one-by-one path


#: a batch of more bytes than this is cut into several GETV requests in flight at once
CHUNK_BYTES = 32 << 20


def _chunks(idxs: list, sizes: list, endpoints: int) -> list[list]:
    """Split one server's refs into GETV requests: at most MAX_BATCH refs each, and
    for large batches up to ``endpoints`` requests of about equal bytes (each keeps
    one pooled endpoint busy; more would only open new connections)."""
    total = sum(sizes)
    k = max(-(-len(idxs) // MAX_BATCH), min(endpoints, -(-total // CHUNK_BYTES)), 1)
    target = total / k
    out, cur, fill = [], [], 0
    for i, n in zip(idxs, sizes):
        if cur and (len(cur) >= MAX_BATCH or (fill + n > target * 1.01 and len(out) < k - 1)):
            out.append(cur)
            cur, fill = [], 0
        cur.append(i)
        fill += n
    if cur:
        out.append(cur)
    return out


def _hold_s(hold: float) -> int:
    return max(1, min(int(hold + 0.999), MAX_HOLD_S)) if hold else 0


def _uncancel() -> None:
    """Undo the cancellation our own deadline caused (Python >= 3.11)."""
    task = asyncio.current_task()
    if task is not None and hasattr(task, "uncancel"):
        task.uncancel()


class _Answered(Exception):
    """The server answered with an error status: not a connection failure."""

    def __init__(self, error: TransportError):
        super().__init__(str(error))
        self.error = error
