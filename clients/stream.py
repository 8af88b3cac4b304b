"""FetchStream: iterate payloads fetched in the background, bounded prefetch.

Only what the consumer receives is consumed. The fetcher asks servers to
*hold* what it fetches ahead (:mod:`clients.held`): a payload is ACKed when
``__next__`` hands it to the consumer, and everything fetched but never handed
out -- queued, in flight, or the unread rest of a TAKE batch -- is given back
(READY again) on ``close()``, on an error, or when the stream is garbage collected.

Shutdown is symmetric and hang-free:

* the consumer stops first (``close()`` / leaving the ``with`` block / breaking
  out of the loop and closing) -> the fetcher winds down, deliveries not handed
  out are returned, and ``close()`` returns once the fetcher thread ended;
* the source ends (an iterable is exhausted, or a ``queue.Queue`` source
  yields ``None``) -> the consumer drains the tail, then ``StopIteration``;
* the source or a fetch raises -> no new fetch starts; deliveries already
  fetched are handed out first, then the first error re-raises in the consumer.

A Ctrl-C while ``__next__`` settles the payload it hands out does not drop it: the
settle runs on, and the next ``__next__`` waits for it and returns that payload.

If the consumer keeps a payload waiting longer than ``hold_s`` the server may
have given it back; the stream then fetches that ref again (refs mode), or
hands it out anyway (TAKE mode: at-least-once, see README "Guarantees").
No thread outlives ``close()`` (bounded by the client's own call deadlines).
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
from typing import Iterable

from .kept import KeptWhenSettled

log = logging.getLogger("clients.stream")

_END = object()
#: default seconds a server holds a payload fetched ahead before the consumer takes it
DEFAULT_HOLD_S = 300.0


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


class _Item:
    """One delivery (a held GET, or a held TAKE batch) and how much of it was handed out."""

    __slots__ = ("delivery", "ref", "handed")

    def __init__(self, delivery, ref=None):
        self.delivery = delivery
        self.ref = ref
        self.handed = 0


class FetchStream:
    """Payloads from ``refs`` (an iterable of SlotRef, or a ``queue.Queue`` of
    them ending with ``None``) or, with ``address``, from repeated TAKE
    long-polls (``take_n`` per request, ``wait`` seconds each) until closed.
    Up to ``depth`` refs are fetched concurrently and at most ``depth``
    deliveries wait for the consumer; payloads come out in source order.
    ``hold_s``: how long a server keeps a payload fetched ahead unconsumed."""

    POLL_S = 0.1  # how often a blocked fetcher re-checks for close()

    def __init__(self, client, refs: Iterable | queue.Queue | None = None, *, address=None, depth: int = 4,
                 take_n: int = 1, wait: float = 1.0, hold_s: float = DEFAULT_HOLD_S):
        if (refs is None) == (address is None):
            raise ValueError("FetchStream needs exactly one of refs or address")
        if depth < 1:
            raise ValueError("depth must be >= 1")
        if hold_s <= 0:
            raise ValueError("hold_s must be > 0 seconds")
        self._client = client
        self._refs = refs
        self._address = address
        self._take_n = take_n
        self._wait = wait
        self._depth = depth
        self._hold = hold_s
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        self._current: _Item | None = None  # a TAKE batch being handed out
        # a payload whose settle (its ACK) the consumer's Ctrl-C interrupted: the settle runs on and
        # consumes it, so it is the next one handed out
        self._interrupted = KeptWhenSettled("fetch stream")
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

    def _give_back(self, item: _Item) -> None:
        """Consume what was handed out of ``item``, return the rest to READY."""
        ok = item.delivery.settle_sync(item.handed, self._client.timeout + 5.0)
        if ok is None:
            log.warning("could not confirm returning %d unread payload(s) to the server; it returns them "
                        "itself when its hold or the endpoint ends", len(item.delivery.items) - item.handed)

    def _forward(self, item: _Item) -> None:
        if not self._put(item):
            self._give_back(item)  # consumer left

    def _run(self):
        pending: collections.deque = collections.deque()  # (future, ref) in flight, in source order
        error: BaseException | None = None
        c = self._client
        try:
            if self._address is not None:
                while not self._stop.is_set():
                    got = c.submit_take(self._address, n=self._take_n, wait=self._wait,
                                        hold_s=self._hold).result(c.call_budget() + self._wait + 5.0)
                    if got.items:
                        self._forward(_Item(got))
            else:
                budget = c.call_budget() + 5.0
                try:
                    for ref in self._source():
                        if self._stop.is_set():
                            break
                        pending.append((c.submit(ref, hold_s=self._hold), ref))
                        while len(pending) >= self._depth and not self._stop.is_set():
                            fut, ref = pending.popleft()
                            self._forward(_Item(fut.result(budget), ref))
                except BaseException as exc:  # noqa: BLE001 - the source, or the oldest fetch, failed: the
                    # consumer's iteration raises it (after the fetches already started are delivered)
                    error = exc
                # the tail (or, after an error, every fetch already started), in order; then the first error
                while pending and not self._stop.is_set():
                    fut, ref = pending.popleft()
                    try:
                        self._forward(_Item(fut.result(budget), ref))
                    except BaseException as exc:  # noqa: BLE001 - handed to the consumer, as above
                        error = error or exc
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, as above
            error = error or exc
        finally:
            for fut, _ in pending:  # only when the consumer left: give back what it will never see
                try:
                    self._give_back(_Item(fut.result(c.call_budget() + 5.0)))
                except BaseException as exc:  # noqa: BLE001 - a failed fetch holds nothing
                    log.debug("fetch abandoned at close: %r", exc)
        self._put(_Failure(error) if error is not None else _END)

    # ----------------------------------------------------------- consumer --
    def __iter__(self):
        return self

    def __next__(self):
        self._interrupted.wait(self._client.timeout + 5.0)
        if self._interrupted:
            return self._client.present(self._interrupted.pop(1)[0])
        while True:
            cur = self._current
            if cur is not None:
                p = self._hand_out(cur)
                if p is not None:
                    return p
                continue
            if self._done:
                raise StopIteration
            try:
                item = self._q.get(timeout=self.POLL_S)
            except queue.Empty:
                if not self._thread.is_alive() and self._q.empty():
                    self._done = True
                    raise StopIteration from None
                continue
            if item is _END:
                self._done = True
                self._thread.join()
                raise StopIteration
            if isinstance(item, _Failure):
                self._done = True
                self.close()
                raise item.exc
            self._current = item

    def _hand_out(self, item: _Item):
        """The next payload of ``item`` (consumed as it is handed out), or None when it has no more."""
        d = item.delivery
        items = d.items
        while item.handed < len(items):
            key, payload = items[item.handed]
            item.handed += 1
            if d.may_repeat and self._client.delivered(key):
                continue  # a repeat (redelivered after a server crash): consumed with the rest, not handed out
            if item.handed == len(items):
                self._current = None
                # (Ctrl-C while it settles: the settle runs on; what it consumed is handed out next)
                ok = d.settle_sync(item.handed, self._client.timeout + 5.0,
                                   on_interrupt=self._interrupted.on_interrupt([[payload]]))
                if ok is None and d.expired and item.ref is not None:
                    # the server may have given it back: fetching the ref again tells (STALE: it was ours)
                    payload = self._refetch(item.ref, payload)
            return self._client.present(payload)
        self._current = None
        return None

    def _refetch(self, ref, payload):
        """Our ACK is unconfirmed and the hold ran out: if the server gave the payload
        back, fetching the ref again consumes it (this client already has it: the
        repeat is ACKed and dropped); STALE means our ACK was applied. Either way the
        copy we hold is the one to hand out, exactly once."""
        from .errors import TransportError

        try:
            self._client.fetch(ref).release()
        except TransportError as exc:  # AlreadyDelivered / STALE: as expected; others: the server decides
            log.debug("re-fetch of %s after an unconfirmed ACK: %r", ref.key, exc)
        return payload

    def close(self, timeout: float | None = None) -> None:
        """Stop fetching, give back everything not handed out, join the fetcher thread."""
        self._stop.set()
        self._done = True
        cur, self._current = self._current, None
        if cur is not None:
            self._give_back(cur)
        self._give_back_queued()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("fetch stream thread still finishing a call; it exits when the call's deadline passes")
        self._give_back_queued()  # what the fetcher queued while we waited for it
        self._interrupted.release(self._client.timeout + 5.0 if timeout is None else timeout)

    def _give_back_queued(self) -> None:
        while True:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Item):
                self._give_back(item)

    @property
    def alive(self) -> bool:
        """Is the stream's fetcher thread still running?"""
        return self._thread.is_alive()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):  # pragma: no cover - depends on GC timing
        try:
            if not self._done or self._current is not None or not self._q.empty():
                self.close(timeout=0)
        except Exception:  # noqa: BLE001 - never raise from a finaliser
            pass
