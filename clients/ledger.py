"""What one client has delivered and counted: the exactly-once-per-client window,
counters and fetch latencies.

A client touches this from the caller's threads, its UCX loop thread and executor
threads (same-host claims run there), so every operation takes one lock: counters
never lose an increment, and the dedup window is checked and updated atomically.
"""

from __future__ import annotations

import collections
import itertools
import threading

from ucxx_transport.reservoir import Reservoir


class Ledger:
    """Delivered payload keys (a bounded window, oldest forgotten first), counters, latencies."""

    def __init__(self, dedup_window: int):
        self._lock = threading.Lock()
        self._delivered: collections.OrderedDict = collections.OrderedDict()
        self._window = dedup_window
        self._counts: collections.Counter = collections.Counter()
        self._latency = Reservoir()

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def remember(self, key) -> bool:
        """Record a delivered payload; False if it was delivered before (a duplicate)."""
        with self._lock:
            if key in self._delivered:
                self._counts["duplicates_dropped"] += 1
                return False
            self._delivered[key] = None
            if len(self._delivered) > self._window:
                self._delivered.popitem(last=False)
            return True

    def remember_batch(self, keys: list, counter: str | None, sizes: list, seconds_each: float | None = None) -> list:
        """Record a batch of deliveries under one lock: per key True if it is new (counted
        in ``counter``, when given, and in ``bytes`` with its size, plus a latency sample of
        ``seconds_each`` when given), False if it was delivered before (a duplicate, counted as such)."""
        with self._lock:
            d = self._delivered
            before = len(d)
            if d.keys().isdisjoint(keys):  # the usual batch: every payload new (checked and recorded in C)
                d.update(zip(keys, itertools.repeat(None)))
                if len(d) - before == len(keys):
                    fresh = [True] * len(keys)
                else:  # a key named twice in the batch: its first delivery is the new one
                    firsts: set = set()
                    fresh = [k not in firsts and not firsts.add(k) for k in keys]
                nbytes = sum(itertools.compress(sizes, fresh))
            else:
                fresh = []
                nbytes = 0
                for key, size in zip(keys, sizes):
                    if key in d:
                        fresh.append(False)
                        continue
                    d[key] = None
                    fresh.append(True)
                    nbytes += size
            if len(d) > self._window:  # the oldest forgotten, in C
                collections.deque(map(d.__delitem__, list(itertools.islice(d, len(d) - self._window))), maxlen=0)
            n_new = sum(fresh)
            if counter is not None:
                self._counts[counter] += n_new
            self._counts["bytes"] += nbytes
            if len(keys) > n_new:
                self._counts["duplicates_dropped"] += len(keys) - n_new
            if seconds_each is not None:
                self._latency.add_many(seconds_each, n_new)
        return fresh

    def seen(self, key) -> bool:
        """Was the payload ``key`` ((ring id, slot, generation)) delivered already?"""
        return key in self._delivered  # one dict lookup: atomic under the GIL

    def seen_of(self, keys) -> set:
        """Which of ``keys`` were delivered already (usually none: one check in C)."""
        d = self._delivered
        if d.keys().isdisjoint(keys):
            return set()
        return set(filter(d.__contains__, keys))

    def forget(self, key) -> None:
        """A delivery that was handed back (given back to READY, never consumed)."""
        with self._lock:
            self._delivered.pop(key, None)

    def add_latency(self, seconds: float) -> None:
        with self._lock:
            self._latency.add(seconds)

    def snapshot(self) -> dict:
        """The counters, plus ``latency_s`` percentiles of fetches."""
        with self._lock:
            out = dict(self._counts)
            out["latency_s"] = self._latency.percentiles()
        return out
