"""FetchStream: iterate payloads fetched in the background, bounded prefetch.

Shutdown is symmetric and hang-free:

* the consumer stops first (``close()`` / leaving the ``with`` block / breaking
  out of the loop and closing) -> the fetcher winds down, payloads still
  queued are released, and ``close()`` returns once the fetcher thread ended;
* the source ends (an iterable is exhausted, or a ``queue.Queue`` source
  yields ``None``) -> the consumer drains the tail, then ``StopIteration``;
* the source or a fetch raises -> no new fetch starts; the payloads already
  being fetched are delivered (they are consumed on the server, so dropping
  them would lose them), then the first error re-raises in the consumer.

No thread outlives ``close()`` (bounded by the client's own call deadlines).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import queue
import threading
from typing import Iterable

log = logging.getLogger("clients.stream")

_END = object()


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


class FetchStream:
    """Payloads from ``refs`` (an iterable of SlotRef, or a ``queue.Queue`` of
    them ending with ``None``) or, with ``address``, from repeated TAKE
    long-polls (``take_n`` per request, ``wait`` seconds each) until closed.
    Up to ``depth`` refs are fetched concurrently and at most ``depth`` fetched
    payloads wait for the consumer; payloads come out in source order."""

    POLL_S = 0.1  # how often a blocked fetcher re-checks for close()

    def __init__(self, client, refs: Iterable | queue.Queue | None = None, *, address=None, depth: int = 4,
                 take_n: int = 1, wait: float = 1.0):
        if (refs is None) == (address is None):
            raise ValueError("FetchStream needs exactly one of refs or address")
        if depth < 1:
            raise ValueError("depth must be >= 1")
        self._client = client
        self._refs = refs
        self._address = address
        self._take_n = take_n
        self._wait = wait
        self._depth = depth
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._run, name="fetch-stream", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ fetcher --
    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=self.POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _source(self):
        src = self._refs
        if isinstance(src, queue.Queue):
            while not self._stop.is_set():
                try:
                    ref = src.get(timeout=self.POLL_S)
                except queue.Empty:
                    continue
                if ref is None:
                    return
                yield ref
        else:
            yield from src

    def _submit(self, ref):
        """Start fetching ``ref``: a concurrent.futures.Future of its payload."""
        c = self._client
        if c._local_ring(ref) is not None:  # same host: a synchronous shared-memory claim
            fut = concurrent.futures.Future()
            try:
                fut.set_result(c.fetch(ref))
            except BaseException as exc:
                fut.set_exception(exc)
            return fut
        return asyncio.run_coroutine_threadsafe(c._fetch_ref(ref), c._ucx_loop())

    def _run(self):
        pending: collections.deque = collections.deque()  # in-flight fetches, in source order
        error: BaseException | None = None
        try:
            if self._address is not None:
                while not self._stop.is_set():
                    for p in self._client.take(self._address, n=self._take_n, wait=self._wait):
                        if not self._put(p):
                            p.release()  # consumer left; payload was consumed: release its buffer
            else:
                budget = self._client._ref_budget() + 5.0
                try:
                    for ref in self._source():
                        if self._stop.is_set():
                            break
                        pending.append(self._submit(ref))
                        while len(pending) >= self._depth and not self._stop.is_set():
                            self._put(pending.popleft().result(budget))
                except BaseException as exc:  # the source, or the oldest fetch, failed
                    error = exc
                # the tail (or, after an error, every fetch already started: they are consumed on the
                # server, so they are delivered, not dropped), in order; then the first error
                while pending and not self._stop.is_set():
                    try:
                        self._put(pending.popleft().result(budget))
                    except BaseException as exc:
                        error = error or exc
        except BaseException as exc:
            error = error or exc
        finally:
            for fut in pending:  # only when the consumer left: release what it will never see
                fut.cancel()
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    fut.result().release()
        self._put(_Failure(error) if error is not None else _END)

    # ----------------------------------------------------------- consumer --
    def __iter__(self):
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        while True:
            try:
                item = self._q.get(timeout=self.POLL_S)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._q.empty():
                    self._done = True
                    raise StopIteration from None
        if item is _END:
            self._done = True
            self._thread.join()
            raise StopIteration
        if isinstance(item, _Failure):
            self._done = True
            self.close()
            raise item.exc
        return item

    def close(self, timeout: float | None = None) -> None:
        """Stop fetching, release queued payloads, join the fetcher thread."""
        self._stop.set()
        self._done = True
        while True:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                break
            if hasattr(item, "release"):
                item.release()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("fetch stream thread still finishing a call; it exits when the call's deadline passes")

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
