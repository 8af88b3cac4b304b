"""Server metrics: counters, latency reservoirs, event-loop lag sampler.

Kept as plain Python numbers (cheap to update on the event loop);
:func:`prometheus_collector` exposes the same numbers through
prometheus-client when it is installed.
"""

from __future__ import annotations

import asyncio
import collections
import time

from .reservoir import Reservoir


class ServerMetrics:
    def __init__(self):
        self.requests = collections.Counter()  # (op, status) -> n
        self.by_port = collections.Counter()  # listener index -> requests
        self.bytes_out = 0
        self.payloads_out = 0
        self.inflight = 0
        self.endpoints = 0
        self.ack_timeouts = 0
        self.nacks = 0
        self.acks = 0
        self.evictions = 0
        self.dead_letters = 0  # payloads this server moved to DEAD (undecodable by DEAD_LETTER_AFTER readers)
        self.handler_latency = Reservoir()  # seconds, claim -> ack
        self.loop_lag = Reservoir(1200)  # seconds, sampled at 10 Hz
        self.started = time.time()

    def count(self, op: str, status: str) -> None:
        self.requests[(op, status)] += 1

    async def sample_loop_lag(self, interval: float = 0.1) -> None:
        """Sample event-loop lag at 10 Hz: how late a timer fires."""
        loop = asyncio.get_running_loop()
        while True:
            t0 = loop.time()
            await asyncio.sleep(interval)
            self.loop_lag.add(max(0.0, loop.time() - t0 - interval))

    def snapshot(self) -> dict:
        return {
            "uptime_s": time.time() - self.started,
            "requests": {f"{op}:{st}": n for (op, st), n in sorted(self.requests.items())},
            "requests_by_port": {str(k): v for k, v in sorted(self.by_port.items())},
            "bytes_out": self.bytes_out,
            "payloads_out": self.payloads_out,
            "inflight": self.inflight,
            "endpoints": self.endpoints,
            "acks": self.acks,
            "nacks": self.nacks,
            "ack_timeouts": self.ack_timeouts,
            "evictions": self.evictions,
            "dead_letters": self.dead_letters,
            "handler_latency_s": self.handler_latency.percentiles(),
            "loop_lag_s": self.loop_lag.percentiles(),
            "handler_latency_hist": self.handler_latency.histogram(),
            "loop_lag_hist": self.loop_lag.histogram(),
        }


def prometheus_collector(snapshot_fn):
    """A prometheus-client collector exporting ``snapshot_fn()`` (server + ring)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    class Collector:
        def collect(self):
            s = snapshot_fn()
            m = s["metrics"]
            req = CounterMetricFamily("ucxx_transport_requests", "requests by op and status", labels=["op", "status"])
            for key, n in m["requests"].items():
                op, st = key.split(":")
                req.add_metric([op, st], n)
            yield req
            for name, help_ in [("bytes_out", "payload bytes sent"), ("payloads_out", "payloads sent"),
                                ("acks", "payloads acked"), ("nacks", "payloads returned"),
                                ("ack_timeouts", "ACKs that never came"), ("evictions", "idle endpoints evicted"),
                                ("dead_letters", "payloads moved to DEAD after repeated decode failures")]:
                yield CounterMetricFamily(f"ucxx_transport_{name}", help_, value=m[name])
            yield GaugeMetricFamily("ucxx_transport_inflight", "requests in flight", value=m["inflight"])
            yield GaugeMetricFamily("ucxx_transport_endpoints", "connected endpoints", value=m["endpoints"])
            slots = GaugeMetricFamily("ucxx_transport_slots", "ring slots by state", labels=["state"])
            for st, n in s["ring"]["states"].items():
                slots.add_metric([st], n)
            yield slots
            yield CounterMetricFamily("ucxx_transport_drops", "payloads dropped (on_full=drop_oldest)",
                                      value=s["ring"]["drops"])
            for key, label, help_ in [("handler_latency_hist", "handler_latency_seconds",
                                       "request handling time, claim to ACK"),
                                      ("loop_lag_hist", "loop_lag_seconds", "event-loop lag, sampled at 10 Hz")]:
                h = m[key]
                buckets = [(repr(float(le)), n) for le, n in h["buckets"]] + [("+Inf", h["count"])]
                yield HistogramMetricFamily(f"ucxx_transport_{label}", help_, buckets=buckets, sum_value=h["sum"])

    return Collector()
