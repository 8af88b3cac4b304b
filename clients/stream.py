"""FetchStream: iterate payloads fetched in the background, bounded prefetch.

Shutdown is symmetric and hang-free:

* the consumer stops first (``close()`` / leaving the ``with`` block / breaking
  out of the loop and closing) -> the fetcher winds down, payloads still
  queued are released, and ``close()`` returns once the fetcher thread ended;
* the source ends (an iterable is exhausted, or a ``queue.Queue`` source
  yields ``None``) -> the consumer drains the tail, then ``StopIteration``;
* the source or a fetch raises -> the stream closes and the error re-raises
  in the consumer at the point it would have got the next payload.

No thread outlives ``close()`` (bounded by the client's own call deadlines).
"""

from __future__ import annotations

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
    At most ``depth`` fetched payloads wait for the consumer."""

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

    def _run(self):
        try:
            if self._address is not None:
                while not self._stop.is_set():
                    for p in self._client.take(self._address, n=self._take_n, wait=self._wait):
                        if not self._put(p):
                            p.release()  # consumer left; payload was consumed: release its buffer
            else:
                for ref in self._source():
                    if self._stop.is_set():
                        break
                    p = self._client.fetch(ref)
                    if not self._put(p):
                        p.release()
                        break
        except BaseException as exc:  # source or fetch failed: hand it to the consumer
            self._put(_Failure(exc))
            return
        self._put(_END)

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
