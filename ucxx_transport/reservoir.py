"""Latency reservoirs: recent samples for percentiles and a histogram over fixed buckets.

Shared by the server's metrics and the client's ledger (neither owns the other).
"""

from __future__ import annotations

import bisect
import collections

import numpy as np


#: histogram bucket upper bounds (seconds) of latencies and loop lag: fixed, so that the
#: histograms of many servers add up (Prometheus ``histogram_quantile`` over ``sum by (le)``)
LATENCY_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                     2.5, 5.0, 10.0)


class Reservoir:
    """The last ``size`` samples, for percentiles (bounded memory), and a histogram of
    every sample over fixed buckets (aggregatable across servers)."""

    def __init__(self, size: int = 4096, buckets: tuple = LATENCY_BUCKETS_S):
        self._buf = collections.deque(maxlen=size)
        self.count = 0
        self.max = 0.0
        self.sum = 0.0
        self.buckets = buckets
        self._counts = [0] * (len(buckets) + 1)  # the last one: above every bound

    def add(self, v: float) -> None:
        self._buf.append(v)
        self.count += 1
        self.sum += v
        self._counts[bisect.bisect_left(self.buckets, v)] += 1
        if v > self.max:
            self.max = v

    def add_many(self, v: float, n: int) -> None:
        """``n`` samples of the same value (a batch's per-item share)."""
        if n <= 0:
            return
        self._buf.extend([v] * min(n, self._buf.maxlen or n))
        self.count += n
        self.sum += v * n
        self._counts[bisect.bisect_left(self.buckets, v)] += n
        if v > self.max:
            self.max = v

    def histogram(self) -> dict:
        """Cumulative counts per upper bound (Prometheus ``le``), plus sum and count."""
        cum, out = 0, []
        for le, n in zip(self.buckets, self._counts):
            cum += n
            out.append([le, cum])
        return {"buckets": out, "sum": self.sum, "count": self.count}

    def percentiles(self) -> dict:
        if not self._buf:
            return {"p50": None, "p99": None, "max": None, "count": 0}
        a = np.fromiter(self._buf, dtype=np.float64)
        p50, p99 = np.percentile(a, [50, 99])
        return {"p50": float(p50), "p99": float(p99), "max": float(self.max), "count": self.count}
