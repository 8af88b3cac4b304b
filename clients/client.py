"""TransportClient: fetch payloads from ucxx-transport servers, exactly once.

Three retry layers (docs/PROTOCOL.md, "Client retries", has the rules by status):

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

Why one module past 400 lines: it is the public surface (each call in a sync
and an async form, with the docstrings docs/API.md is made from) plus the retry
layers those calls share; every part with a job of its own lives beside it
(``endpoints``, ``exchanges``, ``local``, ``ledger``).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import operator
import os
import threading
import time
from dataclasses import dataclass
from typing import Sequence

import shm
from ucxx_transport import engine
from ucxx_transport.buffers import BufferPool
from ucxx_transport.config import resolve
from ucxx_transport.protocol import MAX_BATCH, MAX_TAKE, encode_fields

from .endpoints import PORTS_PER_CALL, Connector
from .errors import (
    AlreadyDeliveredError,
    CallTimeoutError,
    ConnectionLostError,
    ForkedClientError,
    InvalidRefError,
    NoAddressError,
    StaleSlotError,
    TransportError,
    any_failed,
    detached,
)
from .exchanges import Exchanges
from .held import LocalDelivery
from .ledger import Ledger
from .kept import Kept
from .local import LocalReader

log = logging.getLogger("clients.client")


@dataclass
class FetchResult:
    """Outcome of one ref in a batch: ``payload`` or ``error``."""

    ref: shm.SlotRef
    payload: shm.Payload | None = None
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        """The ref was fetched (``payload`` is set, ``error`` is None)."""
        return self.error is None





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
    ``max_idle_endpoints`` / ``max_idle_per_server`` / ``endpoint_idle_s``: the
    endpoint budget (idle pooled endpoints kept in all and per server, least
    recently used closed first; docs/DEPLOYMENT.md has the UCX limits behind it).
    ``direct_calls`` (default on): a sync call runs its network exchange in the
    calling thread, on an event loop of that thread progressing the same UCX
    worker, instead of handing it to the UCX loop thread and waiting (two thread
    wake-ups saved per call); the same rules hold either way (deadlines, retries,
    Ctrl-C keeps what a call consumed).
    """

    def __init__(self, *, token=None, timeout=None, max_attempts=None, max_rounds=None, quarantine_s=None,
                 endpoint_max_age_s=None, pool_size=None, max_inflight=None, device="cpu",
                 local_fast_path=True, progress_mode=None, max_nbytes: int = 0, dedup_window: int = 100_000,
                 min_rate=None, resolver=None, tensor_type: str = "numpy", copy: bool = False,
                 max_idle_endpoints=None, max_idle_per_server=None, endpoint_idle_s=None, direct_calls=None):
        if tensor_type not in ("numpy", "torch"):
            raise ValueError(f"tensor_type must be 'numpy' or 'torch', got {tensor_type!r}")
        #: "torch": payload values are zero-copy torch tensors (on the GPU for device="cuda")
        self.tensor_type = tensor_type
        #: True: hand out owned copies; the slot or receive buffer is freed at once, whatever the caller keeps
        self.copy = copy
        self.token = token.decode() if isinstance(token, bytes) else token
        self._timeout = resolve("timeout", timeout)
        self._min_rate = resolve("min_rate", min_rate)
        self._resolver = resolver
        self._max_attempts = resolve("max_attempts", max_attempts)
        self.max_rounds = resolve("max_rounds", max_rounds)
        self.max_inflight = resolve("max_inflight", max_inflight)
        #: sync calls run their exchanges in the calling thread (engine.run_here) where they can
        self.direct_calls = resolve("direct_calls", direct_calls)
        self._ledger = Ledger(dedup_window)
        self._net = Connector(dict(pool_size=resolve("pool_size", pool_size),
                                   endpoint_max_age_s=resolve("endpoint_max_age_s", endpoint_max_age_s),
                                   quarantine_s=resolve("quarantine_s", quarantine_s),
                                   max_idle=max_idle_endpoints, max_idle_per_server=max_idle_per_server,
                                   idle_s=endpoint_idle_s),
                              token=self.token, timeout=self.timeout, ledger=self._ledger)
        self._pool = self._net.pool
        self._buffers = BufferPool(device)
        self.device = device
        self._local_fast_path = bool(local_fast_path)
        self._max_nbytes = max_nbytes
        self._mode = progress_mode
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_lock = threading.Lock()
        self._closed = False
        #: direct calls running now (in callers' threads): close() lets them end first (bounded)
        self._direct_calls = threading.Condition()
        self._direct_active = 0
        self._pid = os.getpid()  # a forked child must not use this client (its loop thread is not there)
        self._kept = Kept()  # payloads consumed by calls whose caller was interrupted (Ctrl-C)
        self._local = LocalReader(self._ledger, self._kept, enabled=local_fast_path and device == "cpu",
                                  max_attempts=self.max_attempts)
        self._fanins: dict = {}  # id(directory) -> FanIn, for take_any
        self._fanins_lock = threading.Lock()  # also makes close() run once
        self._exchanges = Exchanges(self._net, self._ledger, self._buffers, device=device, max_nbytes=max_nbytes,
                                    timeout=self.timeout, min_rate=self.min_rate)

    # ------------------------------------------- settings (live: settable) --
    # Each is read by the parts of the client that use it (connector, exchanges, same-host
    # reader): setting it on the client sets it there too, for the next call.
    @property
    def timeout(self) -> float:
        """Deadline (s) of one network call, plus ``nbytes / min_rate`` for a transfer."""
        return self._timeout

    @timeout.setter
    def timeout(self, value: float) -> None:
        self._timeout = self._net.timeout = self._exchanges.timeout = resolve("timeout", value)

    @property
    def min_rate(self) -> float:
        """Slowest expected link (bytes/s): a transfer's extra deadline is ``nbytes / min_rate``."""
        return self._min_rate

    @min_rate.setter
    def min_rate(self, value: float) -> None:
        self._min_rate = self._exchanges.min_rate = resolve("min_rate", value)

    @property
    def max_attempts(self) -> int:
        """Attempts per ref (network retries, and same-host claims of a busy slot)."""
        return self._max_attempts

    @max_attempts.setter
    def max_attempts(self, value: int) -> None:
        self._max_attempts = self._local.max_attempts = resolve("max_attempts", value)

    @property
    def max_nbytes(self) -> int:
        """Payloads larger than this are refused before asking (0: no limit)."""
        return self._max_nbytes

    @max_nbytes.setter
    def max_nbytes(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"max_nbytes must be an int >= 0 (0: no limit), got {value!r}")
        self._max_nbytes = self._exchanges.max_nbytes = value

    @property
    def local_fast_path(self) -> bool:
        """Read refs of this host's rings straight from shared memory (host memory only)."""
        return self._local_fast_path

    @local_fast_path.setter
    def local_fast_path(self, value: bool) -> None:
        self._local_fast_path = bool(value)
        self._local.enabled = self._local_fast_path and self.device == "cpu"

    # ----------------------------------------------------------- lifetime --
    def _ucx_loop(self) -> asyncio.AbstractEventLoop:
        if self._closed:
            raise TransportError("client is closed")
        if self._pid != os.getpid():
            raise ForkedClientError(self._pid, os.getpid())
        with self._loop_lock:
            if self._loop is None:
                self._loop = engine.acquire(self._mode)
            return self._loop

    def close(self, timeout: float = 5.0) -> None:
        """Close pooled endpoints and release UCX (bounded; idempotent)."""
        with self._fanins_lock:
            if self._closed:
                return
            self._closed = True
            fanins, self._fanins = list(self._fanins.values()), {}
        for fanin in fanins:  # give back what their TAKEs hold, while UCX still runs
            try:
                fanin.close(timeout)
            except Exception as exc:  # noqa: BLE001 - closing goes on; what it may cost is said
                log.warning("closing a FanIn failed (%r): payloads its TAKEs held go back to READY when "
                            "their servers' holds run out", exc)
        with self._direct_calls:  # calls other threads run now end within their deadlines: let them
            if not self._direct_calls.wait_for(lambda: self._direct_active == 0, timeout):
                log.warning("closing: %d call(s) in other threads still running after %.1f s: they are "
                            "cancelled as UCX stops", self._direct_active, timeout)
        self._kept.close(timeout)  # interrupted calls still running may keep payloads: released
        if self._loop is not None:
            try:
                asyncio.run_coroutine_threadsafe(self._net.aclose(), self._loop).result(timeout)
            except Exception as exc:  # noqa: BLE001 - closing goes on; what it may cost is said
                log.warning("closing the endpoint pool did not finish within %.1f s (%r): an ACK not yet "
                            "confirmed may be undone by its server (the payload is then served again)",
                            timeout, exc)
            engine.release(timeout)
            self._loop = None
        self._local.clear()  # handles close when no payload view uses them
        self._buffers.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await asyncio.get_running_loop().run_in_executor(None, self.close)

    # ------------------------------------------------------ sync / async ---
    def _run(self, coro_fn, *args, budget: float, keep=None, keys=None):
        """``coro_fn(*args)`` in this thread where it can (a direct call, ``engine.run_here``), else on the
        UCX loop, waited for up to ``budget`` (+5 s). ``keep``: for calls
        that consume payloads, what to do with the result if the caller is interrupted (Ctrl-C) while
        it waits: the call then finishes on the loop and hands its payloads to ``keep``; ``keys``: the
        payload keys it fetches, or a callable giving them (worked out only if the caller is
        interrupted; a later fetch of one of them waits for it)."""
        self._ucx_loop()
        seconds = budget + 5.0
        on_interrupt = None if keep is None else (
            lambda outcome: self._kept.after_interrupt(outcome, keep, seconds, keys() if callable(keys) else keys))
        direct = self.direct_calls and self.device == "cpu" and engine.can_run_here()
        if direct:
            with self._direct_calls:  # checked here, under the lock close() waits on: a call either
                if self._closed:      # counts before close() waits, or sees the client closed
                    raise TransportError("client is closed")
                self._direct_active += 1
        try:
            run = engine.run_here if direct else engine.run
            return run(coro_fn(*args), seconds, on_interrupt=on_interrupt)
        except TimeoutError:
            raise CallTimeoutError(f"no answer within {budget + 5.0:.1f} s") from None
        except (concurrent.futures.CancelledError, engine.UCXStoppedError):
            raise self._cancelled_by_close() from None
        finally:
            if direct:
                with self._direct_calls:
                    self._direct_active -= 1
                    self._direct_calls.notify_all()

    def _cancelled_by_close(self) -> Exception:
        """What a call cancelled under its caller raises (UCX's teardown cancels what still runs)."""
        if self._closed:
            return TransportError("the client was closed while this call ran (close() waits for calls in "
                                  "other threads only up to its timeout): what it had not ACKed is served again")
        return TransportError("the call was cancelled (UCX was stopped while it ran)")

    async def _arun(self, coro_fn, *args, budget: float | None = None, keep=None, keys=None):
        """``coro_fn(*args)`` on the UCX loop, awaited. ``keep``/``keys``/``budget``: as for
        :meth:`_run`: when the awaiting task is cancelled (``asyncio.wait_for`` ran out, a task
        group ended) the work runs on to its end (within ``budget`` + 5 s) and hands what it
        consumed to ``keep``, the rule of an interrupted sync call; without ``keep`` it is cancelled."""
        loop = self._ucx_loop()
        if asyncio.get_running_loop() is loop:
            work = asyncio.ensure_future(coro_fn(*args))
            waiter = work
        else:
            work = asyncio.run_coroutine_threadsafe(coro_fn(*args), loop)
            waiter = asyncio.wrap_future(work)
        if keep is None:
            return await waiter
        try:
            return await asyncio.shield(waiter)
        except asyncio.CancelledError:
            if waiter is not work:  # its outcome is read from ``work``: mark the copy's as seen
                waiter.add_done_callback(lambda f: f.cancelled() or f.exception())
            self._kept.after_interrupt(work, keep, (budget or self.call_budget()) + 5.0,
                                       keys() if callable(keys) else keys)
            raise

    async def _asettle(self, keys, limit: float | None = None) -> None:
        """:meth:`Kept.settle` for async callers (waits in a worker thread, not on the loop)."""
        if self._kept.any():
            await asyncio.get_running_loop().run_in_executor(None, self._kept.settle, keys, limit)

    def _transfer_s(self, nbytes: int) -> float:
        """Extra deadline for moving ``nbytes`` over the slowest expected link."""
        return nbytes / self.min_rate

    def call_budget(self, nbytes: int = 0) -> float:
        """The longest one ref's fetch (of ``nbytes``) can take, every retry included:
        how long a caller waiting on :meth:`submit`'s future should wait at most."""
        return (self.timeout + self._exchanges.transfer_s(nbytes)) * PORTS_PER_CALL * self.max_attempts \
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
        self._kept.settle([ref.key])
        payload = self._kept.pop(ref.key)  # consumed by an earlier call that was interrupted
        if payload is None:
            payload = self._local.fetch(ref)
        if payload is None:
            payload = self._run(self._fetch_ref, ref, budget=self.call_budget(ref.nbytes), keys=[ref.key],
                                keep=lambda got: self._kept.keep(ref.key, got))
        try:
            return self.present(payload)
        except BaseException:  # interrupted (or a conversion failed): consumed, kept for the next fetch
            self._kept.keep(ref.key, payload)
            raise

    async def afetch(self, ref: shm.SlotRef, *, fields=None) -> shm.Payload:
        """:meth:`fetch` for callers with their own event loop (awaits instead of blocking)."""
        if fields is not None:
            r = (await self.afetch_many([ref], fields=fields))[0]
            if r.error is not None:
                raise r.error
            return r.payload
        ref = self._checked(ref)
        await self._asettle([ref.key])
        kept = self._kept.pop(ref.key)  # consumed by an interrupted (or cancelled) call
        if kept is not None:
            return self.present(kept)
        local = self._local.fetch(ref)
        if local is not None:
            return self.present(local)
        got = await self._arun(self._fetch_ref, ref, budget=self.call_budget(ref.nbytes),
                               keys=[ref.key], keep=lambda got: self._kept.keep(ref.key, got, cancelled=True))
        try:
            return self.present(got)
        except BaseException:  # a conversion failed: consumed, kept for the next fetch of it
            self._kept.keep(ref.key, got)
            raise

    def present(self, payload: shm.Payload) -> shm.Payload:
        """``payload`` as this client hands payloads out (``copy``, ``tensor_type``)."""
        out = payload.copy() if self.copy else payload
        if self.tensor_type != "numpy" and not out.is_raw:
            out = out.with_values(out.as_dict(torch=True, device="cuda" if self.device == "cuda" else None))
        if self.copy:
            payload.release()  # its slot / receive buffer goes back now: nothing else holds it
        return out

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
        with ``device="cuda"`` the whole payload travels and is restricted here.

        The payloads of one batch share their memory's lifetime (one anchor per
        received message, or per same-host ring): a view kept from any of them keeps
        the memory of all of them (slots stay PINNED) until it is gone; ``copy()``
        what must outlive the step. A batch whose refs all name one ring of this
        host is fetched in the calling thread, without the hop to the UCX loop."""
        if fields is not None:
            encode_fields(fields)  # a bad list fails here, before anything is claimed
        refs = list(refs)
        kept = self._pop_kept(refs, fields)  # consumed by earlier calls that were interrupted
        results = None
        try:
            if kept:
                rest = [i for i in range(len(refs)) if i not in kept]
                got = dict(zip(rest, self._fetch_now([refs[i] for i in rest], fields) if rest else ()))
                results = [kept[i] if i in kept else got[i] for i in range(len(refs))]
            else:
                results = self._fetch_now(refs, fields)
            return self._present_results(results)
        except BaseException:  # interrupted (or a conversion failed): what this call holds is kept
            if results is not None:
                self._kept.keep_results(results, fields)
            else:
                self._kept.keep_results(kept.values(), fields)
            raise

    def _fetch_now(self, refs: list, fields) -> list[FetchResult]:
        here = self._fetch_same_host(refs, fields)
        if here is not None:
            return here
        return self._run(self._fetch_many, refs, fields, budget=self._batch_budget(refs), keys=lambda: _keys(refs),
                         keep=lambda results: self._kept.keep_results(results, fields))

    def _pop_kept(self, refs: list, fields) -> dict[int, FetchResult]:
        """{index: result} for the refs whose payloads an interrupted call kept (after
        waiting for interrupted work on any of these refs to end)."""
        if not self._kept.any():
            return {}
        keys = _keys(refs)
        self._kept.settle(keys)
        out = {}
        for i, r in enumerate(refs):
            try:
                ref = self._checked(r)
            except InvalidRefError:
                continue  # the fetch gives it its own error
            payload = self._kept.pop(ref.key, fields)
            if payload is not None:
                out[i] = FetchResult(ref, payload)
        return out

    def _batch_budget(self, refs: list) -> float:
        try:
            total = sum(map(_NBYTES, refs))  # the usual batch: SlotRefs
        except (AttributeError, TypeError):
            total = None
        if type(total) is not int:  # refs as dicts, or forged ones (each gets its own error later)
            total = sum(getattr(r, "nbytes", 0) if isinstance(getattr(r, "nbytes", 0), int) else 0 for r in refs)
        waves = max(1, -(-len(refs) // self.max_inflight))
        return (self.call_budget() * waves + self._exchanges.transfer_s(min(total, 1 << 50))) * self.max_rounds

    def _fetch_same_host(self, refs: list, fields) -> list[FetchResult] | None:
        """A batch of refs that all name one ring of this host, fetched in the caller's
        thread (claimed, decoded and acked together; no hop to the UCX loop and back):
        its results, or None for any other batch (the general path takes it). A ref
        that fails retryably (a slot busy right now) goes on to the general path's
        later rounds."""
        if not (refs and self._local.enabled and self.device == "cpu"):
            return None
        try:
            first = self._checked(refs[0])
            if not self._local.may_be_here(first):
                return None  # another host's batch: checked once, by the general path
            checked = [first, *map(self._checked, refs[1:])]
        except InvalidRefError:
            return None  # the general path gives that ref its own error
        where = (first.ring, first.ring_id, first.host)
        if any((r.ring, r.ring_id, r.host) != where for r in checked):
            return None
        try:
            ring = self._local.ring_for(checked[0])
        except (TransportError, shm.RingError):  # e.g. this host's ring of that name is another ring now
            return None  # the general path gives each ref that error
        if ring is None:
            return None
        outcomes = self._local.fetch_many(ring, checked)
        if not any_failed(outcomes):  # the usual batch: all delivered
            results, retry = list(map(FetchResult, checked, outcomes)), []
        else:
            results = [FetchResult(r, None, detached(o)) if isinstance(o, BaseException) else FetchResult(r, o)
                       for r, o in zip(checked, outcomes)]
            retry = [i for i, r in enumerate(results) if r.error is not None and getattr(r.error, "retryable", False)]
        if retry and self.max_rounds > 1:
            try:
                again = self._run(self._fetch_many, [checked[i] for i in retry], fields, 1,
                                  budget=self._batch_budget([checked[i] for i in retry]),
                                  keys=[checked[i].key for i in retry],
                                  keep=lambda results: self._kept.keep_results(results, fields))
            except (TransportError, TimeoutError) as exc:  # the retried refs fail; the rest are delivered
                again = [FetchResult(checked[i], None, detached(exc)) for i in retry]
            except BaseException:  # interrupted (Ctrl-C): this round's payloads are consumed; kept for the next call
                self._kept.keep_results(results)  # (whole payloads: restricted to fields when handed out)
                raise
            for i, r in zip(retry, again):
                results[i] = r
        if fields is not None:
            for r in results:
                if r.payload is not None:
                    r.payload = r.payload.select(fields)
        return results

    async def afetch_many(self, refs: Sequence[shm.SlotRef], *, fields=None) -> list[FetchResult]:
        """:meth:`fetch_many` for callers with their own event loop."""
        if fields is not None:
            encode_fields(fields)
        refs = list(refs)
        await self._asettle(_keys(refs))
        kept = self._pop_kept(refs, fields)  # (settled above: no wait here)
        rest = [i for i in range(len(refs)) if i not in kept]
        got = await self._arun(self._fetch_many, [refs[i] for i in rest], fields, budget=self._batch_budget(refs),
                               keys=lambda: _keys(refs),
                               keep=lambda results: self._kept.keep_results(results, fields, cancelled=True)
                               ) if rest else []
        got = dict(zip(rest, got))
        results = [kept[i] if i in kept else got[i] for i in range(len(refs))]
        try:
            return self._present_results(results)
        except BaseException:  # a conversion failed: consumed, kept for the next fetch of them
            self._kept.keep_results(results, fields)
            raise

    def take(self, address, n: int = 1, wait: float = 0.0, *, fields=None) -> list[shm.Payload]:
        """The next ``n`` READY payloads of a server (publish order), waiting up
        to ``wait`` seconds for the first (long-poll). ``address``: (host, ports) or a ref.
        ``fields``: only those top-level fields travel (see :meth:`fetch_many`)."""
        host, ports = self._address(address)
        blob = None if fields is None else encode_fields(fields)
        where = (host, tuple(ports))
        if self._kept.any():  # an interrupted take from there still running counts as waiting for payloads
            self._kept.settle([("take", where)], limit=wait)
        got = self._kept.pop_taken(where, n, fields)  # consumed by an earlier take that was interrupted
        if not got:
            got = self._run(self._take, host, ports, n, wait, 0, blob,
                            budget=self.call_budget() + wait + self._exchanges.transfer_s(n << 24),
                            keys=[("take", where)],
                            keep=lambda payloads: self._kept.keep_taken(where, payloads, fields))
        try:
            return [self.present(p) for p in got]
        except BaseException:  # interrupted (or a conversion failed): consumed, kept for the next take
            self._kept.keep_taken(where, got, fields)
            raise

    async def atake(self, address, n: int = 1, wait: float = 0.0, *, fields=None) -> list[shm.Payload]:
        """:meth:`take` for callers with their own event loop."""
        host, ports = self._address(address)
        blob = None if fields is None else encode_fields(fields)
        where = (host, tuple(ports))
        # a cancelled take from there still running counts as waiting for payloads
        await self._asettle([("take", where)], limit=wait)
        got = self._kept.pop_taken(where, n, fields)  # consumed by an interrupted (or cancelled) take
        if not got:
            got = await self._arun(self._take, host, ports, n, wait, 0, blob,
                                   budget=self.call_budget() + wait + self._exchanges.transfer_s(n << 24),
                                   keys=[("take", where)],
                                   keep=lambda payloads: self._kept.keep_taken(where, payloads, fields,
                                                                               cancelled=True))
        try:
            return [self.present(p) for p in got]
        except BaseException:  # a conversion failed: consumed, kept for the next take
            self._kept.keep_taken(where, got, fields)
            raise

    def take_any(self, directory, n: int = 16, wait: float = 0.0) -> list[shm.Payload]:
        """Up to ``n`` payloads pulled fairly from every live server of ``directory``
        (a :class:`~ucxx_transport.directory.Directory`), waiting up to ``wait`` s for
        the first. Dead servers are skipped and re-admitted when they re-register;
        exactly once per client. For repeated pulls keep one
        :class:`~clients.fanin.FanIn` (its fairness carries over between calls)."""
        from .fanin import FanIn

        with self._fanins_lock:
            if self._closed:
                raise TransportError("client is closed")
            fanin = self._fanins.get(id(directory))
            if fanin is None or fanin.directory is not directory:
                fanin = self._fanins[id(directory)] = FanIn(self, directory)
        return fanin.take(n, wait)

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
                return await self._exchanges.ping_port(h, p)
            except Exception as exc:  # noqa: BLE001 - one port's failure is its own result
                return exc
        outs = await asyncio.gather(*(one(h, p) for h, p in targets))
        return dict(zip(targets, outs))

    def stats(self) -> dict:
        """Counters (fetches, bytes, retries, quarantines...), fetch latency percentiles and the pool's and buffers' figures."""
        d = self._ledger.snapshot()
        d.update(self._pool.stats)
        d["buffer_allocations"] = self._buffers.allocations
        d["buffer_reuses"] = self._buffers.reuses
        d["kept_after_interrupt"] = len(self._kept)
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

    # ------------------------------------------------------------ address ---
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

    async def _where_from_loop(self, ref: shm.SlotRef) -> tuple[str, list[int]]:
        """:meth:`_where` called from the UCX loop: a ref without an address is looked up in an
        executor (it may attach this host's ring: an mmap, never on the loop)."""
        if ref.host and ref.ports:
            return ref.host, list(ref.ports)
        return await asyncio.get_running_loop().run_in_executor(None, self._where, ref)

    def _resolve(self, ref: shm.SlotRef) -> tuple[str, list[int]] | None:
        """The current server address of ref's ring, or None."""
        ring = self._local.ring_here(ref)
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
        ``hold_s`` seconds. Same-host refs are claimed synchronously. The future is
        running from the start: ``cancel()`` returns False and the fetch goes on (cancelled
        halfway, it could drop a payload the server already counts as consumed)."""
        ref = self._checked(ref)
        if self._local.ring_for(ref) is not None:
            fut: concurrent.futures.Future = concurrent.futures.Future()
            try:
                got = self._local.claim(ref)
            except BaseException as exc:  # noqa: BLE001 - delivered through the future
                fut.set_exception(exc)
                return fut
            if got is not None:
                payload, lease = got
                if not hold_s:
                    lease.ack()  # consumed now; the slot stays PINNED while views of it live
                fut.set_result(LocalDelivery(self._ledger, ref.key, payload, lease) if hold_s else payload)
                return fut
        return self._started(self._fetch_ref(ref, hold_s))

    def submit_many(self, refs: Sequence[shm.SlotRef]) -> concurrent.futures.Future:
        """Start :meth:`fetch_many` in the background: a future of its results."""
        return self._started(self._fetch_many(list(refs)))

    def _started(self, coro) -> concurrent.futures.Future:
        """``coro`` started on the UCX loop: a future of its outcome that is already *running*,
        so, as for an executor's running job, ``cancel()`` returns False and the work goes on
        (cancelling it halfway would drop what the server already counts as consumed)."""
        work = asyncio.run_coroutine_threadsafe(coro, self._ucx_loop())
        outcome: concurrent.futures.Future = concurrent.futures.Future()
        outcome.set_running_or_notify_cancel()

        def copy(f) -> None:
            if f.cancelled():  # by UCX's teardown (the client closed)
                outcome.set_exception(self._cancelled_by_close())
            elif f.exception() is not None:
                outcome.set_exception(f.exception())
            else:
                outcome.set_result(f.result())
        work.add_done_callback(copy)
        return outcome

    def delivered(self, key) -> bool:
        """Has this client already returned the payload ``key`` ((ring id, slot, generation))?"""
        return self._ledger.seen(key)

    def submit_take(self, address, n: int = 1, wait: float = 0.0, *, hold_s: float) -> concurrent.futures.Future:
        """Start a TAKE now; a future of a held delivery (see :meth:`submit`) of up to
        ``n`` payloads, consumed only as far as it is settled."""
        host, ports = self._address(address)
        return self._started(self._take(host, ports, n, wait, hold_s))




    # ------------------------------------------------------ network core ---

    async def _retrying(self, attempt, on_retryable=None):
        """Layer 2: ``await attempt()`` up to ``max_attempts`` times while it fails with a
        retryable error, backing off 50 ms x attempt (at most 0.5 s) between tries;
        ``await on_retryable(exc)`` runs after each such failure. Final errors (STALE,
        DENIED, BAD_REQUEST, ...) and the last retryable one are raised."""
        last: TransportError | None = None
        for n in range(self.max_attempts):
            if n:
                self._ledger.count("retries")
                await asyncio.sleep(min(0.05 * n, 0.5))
            try:
                return await attempt()
            except TransportError as exc:
                if isinstance(exc, StaleSlotError):
                    self._ledger.count("stale")
                if not exc.retryable:
                    raise
                last = exc
                if on_retryable is not None:
                    await on_retryable(exc)
        assert last is not None
        raise last

    async def _fetch_ref(self, ref: shm.SlotRef, hold: float = 0):
        """Layer 2 for one ref (GET). With ``hold``, a :class:`HeldDelivery` whose ACK
        waits for :meth:`HeldDelivery.settle`."""
        loop = asyncio.get_running_loop()
        where = [await self._where_from_loop(ref)]  # (host, ports): a quarantined address is looked up again
        t0 = time.perf_counter()

        async def moved(exc: TransportError) -> None:
            if exc.quarantine:  # the address may be stale (server restarted on other ports)
                found = await loop.run_in_executor(None, self._resolve, ref)  # may attach a ring: not here
                if found is not None and found != where[0]:
                    log.info("GET %s: server of ring %r moved to %s:%s", ref.key, ref.ring, *found)
                    where[0] = found

        got = await self._retrying(lambda: self._net.call(
            *where[0], lambda h, p: self._exchanges.get_once(ref, h, p, hold), f"GET {ref.key}"), moved)
        if hold:
            payload = got.payloads[0]
            if self._ledger.seen(ref.key):
                await got.settle(1)
                raise AlreadyDeliveredError(f"GET {ref.key}: this client already returned this payload once "
                                            f"(served again after a server crash); ACKed and dropped")
        else:
            payload = got
            if not self._ledger.remember(ref.key):
                payload.release()  # ACKed (consumed) but never returned twice
                raise AlreadyDeliveredError(f"GET {ref.key}: this client already returned this payload once "
                                            f"(served again after a server crash); ACKed and dropped")
        self._ledger.count("fetches")
        self._ledger.count("bytes", payload.nbytes)
        dt = time.perf_counter() - t0
        self._ledger.add_latency(dt)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("fetched %s (%d bytes) in %.0f us", ref.key, payload.nbytes, dt * 1e6)
        return got

    async def _fetch_many(self, refs: list, fields=None, first_round: int = 0) -> list[FetchResult]:
        """Layer 3: rounds; only retryable failures go to the next round. Refs of one
        server and ring travel as batches (GETV: one request, one entry table, small
        payloads coalesced, one ACK), several batches in flight at once."""
        results = list(map(FetchResult, refs))
        try:
            checked: dict[int, shm.SlotRef] = dict(enumerate(map(self._checked, refs)))  # the usual batch
        except Exception:  # noqa: BLE001 - some ref is bad: each one on its own below
            checked = {}
            for i, r in enumerate(refs):
                try:
                    checked[i] = self._checked(r)
                except Exception as exc:  # noqa: BLE001 - any failure is this ref's result; siblings go on
                    results[i].error = detached(exc)
        sem = asyncio.Semaphore(self.max_inflight)
        loop = asyncio.get_running_loop()

        def put(i, outcome):
            if isinstance(outcome, BaseException):
                results[i].payload, results[i].error = None, detached(outcome)
            else:
                results[i].payload, results[i].error = outcome, None

        async def one(i):  # same host: a shared-memory claim; GPU receive: GET by GET
            async with sem:
                ref = checked[i]
                try:
                    local = await loop.run_in_executor(None, self._local.fetch, ref) \
                        if self._local.may_be_here(ref) else None  # None: not a ring of this host
                    got = local if local is not None else await self._fetch_ref(ref)
                    put(i, got if fields is None else got.select(fields))
                except Exception as exc:  # noqa: BLE001 - any failure is this ref's result; siblings go on
                    put(i, exc)

        async def local_batch(idxs, ring):
            async with sem:
                try:
                    outs = await loop.run_in_executor(None, self._local.fetch_many, ring,
                                                      [checked[i] for i in idxs])
                except Exception as exc:  # noqa: BLE001 - the whole batch failed the same way
                    outs = [exc] * len(idxs)
                for i, o in zip(idxs, outs):
                    put(i, o if fields is None or isinstance(o, BaseException) else o.select(fields))

        async def batch(idxs, host, ports):
            async with sem:
                try:
                    outs = await self._net.call(host, ports, lambda h, p: self._exchanges.getv_once(
                        [checked[i] for i in idxs], h, p, fields), f"GETV {len(idxs)}")
                except Exception as exc:  # noqa: BLE001 - the whole batch failed the same way
                    outs = [exc] * len(idxs)
                if any_failed(outs):
                    for i, o in zip(idxs, outs):
                        put(i, o)
                else:  # the usual answer: a payload each (results of this round carry no payload yet)
                    for i, o in zip(idxs, outs):
                        results[i].payload, results[i].error = o, None

        pending = list(checked)
        for rnd in range(first_round, self.max_rounds):
            if not pending:
                break
            if rnd:
                self._ledger.count("rounds_retried")
                log.info("batch round %d: retrying %d ref(s)", rnd + 1, len(pending))
                await asyncio.sleep(min(0.05 * rnd, 0.5))
            tasks = []
            groups: dict = collections.defaultdict(list)
            here: dict = {}  # id(ring) -> (ring, indices): same-host refs, claimed a ring at a time
            # (ring, ring id, host, ports) -> (same host?, the indices of its batch): looked up once
            # a round (attaching a ring maps its segment: never on this loop)
            places: dict = {}
            repeats = self._ledger.seen_of([checked[i].key for i in pending])

            async def place_each(todo):
                for i in todo:
                    ref = checked[i]
                    if self.device != "cpu":
                        tasks.append(one(i))
                        continue
                    place = _PLACE(ref)
                    target = places.get(place)
                    if target is None:
                        try:
                            ring = await loop.run_in_executor(None, self._local.ring_for, ref) \
                                if self._local.may_be_here(ref) else None
                            if ring is None:
                                host, ports = await self._where_from_loop(ref)
                                target = (False, groups[(host, tuple(ports), ref.ring, ref.ring_id)])
                            else:
                                target = (True, here.setdefault(id(ring), (ring, []))[1])
                        except Exception as exc:  # noqa: BLE001 - e.g. no address: this ref's result
                            put(i, exc)
                            continue
                        places[place] = target
                    local, idxs = target
                    if not local and ref.key in repeats:  # served again after a crash: GET it alone (ACKed, dropped)
                        tasks.append(one(i))
                        continue
                    idxs.append(i)

            # the usual batch names one place: the first ref's is looked up, the others join its batch
            if self.device == "cpu" and len(pending) > 1 and len(set(map(_PLACE, map(checked.__getitem__, pending)))) == 1:
                await place_each(pending[:1])
                target = places.get(_PLACE(checked[pending[0]]))
                if target is not None and (target[0] or not repeats):
                    target[1].extend(pending[1:])
                else:  # its lookup failed, or some ref is a repeat: each of the others on its own
                    await place_each(pending[1:])
            else:
                await place_each(pending)
            for ring, idxs in here.values():
                tasks.append(local_batch(idxs, ring))
            for (host, ports, _, _), idxs in groups.items():
                for chunk in _chunks(idxs, [checked[i].nbytes for i in idxs], len(ports) * self._pool.pool_size):
                    tasks.append(batch(chunk, host, list(ports)))
            await asyncio.gather(*tasks)
            pending = [i for i in pending if results[i].error is not None
                       and getattr(results[i].error, "retryable", False)]
        return results

    async def _take(self, host: str, ports, n: int, wait: float, hold: float = 0, fields_blob=None):
        """Layer 2 for a TAKE of up to ``n`` payloads (retries as :meth:`_retrying`)."""
        if not 1 <= n <= MAX_TAKE:
            raise ValueError(f"n must be in [1, {MAX_TAKE}], got {n}")
        if wait < 0:
            raise ValueError("wait must be >= 0 seconds")
        got = await self._retrying(lambda: self._net.call(
            host, ports, lambda h, p: self._exchanges.takev_once(h, p, n, wait, hold, fields_blob), f"TAKE {n}"))
        self._ledger.count("takes")
        if hold:  # a take's delivered bytes are counted where its payloads are recorded
            self._ledger.count("bytes", sum(p.nbytes for p in got.payloads))
        return got

    async def _server_stats(self, host: str, ports) -> dict:
        return await self._net.call(host, ports, self._exchanges.stats_once, "STATS")

    async def _ping(self, host: str, ports) -> float:
        return await self._net.call(host, ports, self._exchanges.ping_port, "PING")




#: where a ref's payload is fetched from: refs of one place travel in one batch
_PLACE = operator.attrgetter("ring", "ring_id", "host", "ports")
_NBYTES = operator.attrgetter("nbytes")


def _keys(refs) -> list:
    """The payload keys of the valid refs among ``refs`` (SlotRefs or their dicts)."""
    out = []
    for r in refs:
        try:
            out.append(r.key if isinstance(r, shm.SlotRef) else shm.SlotRef.from_dict(r).key)
        except (shm.InvalidRefError, TypeError, KeyError, AttributeError):
            continue
    return out


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






