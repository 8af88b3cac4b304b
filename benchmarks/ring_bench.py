"""Ring throughput vs memcpy, side by side in one run.

    python benchmarks/ring_bench.py [--sizes 4KiB,64KiB,1MiB,16MiB,64MiB] [--seconds 1.0] [--json F]

For each payload size, in one process, it times:
  * memcpy : ``np.copyto`` of the same bytes between two warm buffers
  * put    : ``ring.put({"x": array})`` -- claim a FREE slot, copy in place,
             publish (the claim+ack that frees the slot again is not timed)
  * read   : local ``ring.claim()`` + decode + copy the field out + ``ack``
             (the put that refills the slot is not timed)
  * claim  : ``claim()`` + decode to zero-copy views + ``ack``, no copy
and prints GB/s and the ratio to memcpy (target: >= 0.9 from 1 MiB up).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shm import RingBuffer  # noqa: E402
from ucxx_transport.units import format_size, parse_size  # noqa: E402


def _median_time(op, setup, seconds: float, min_iters: int = 5) -> float:
    samples = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(samples) < min_iters:
        setup()
        t0 = time.perf_counter()
        op()
        samples.append(time.perf_counter() - t0)
    return float(np.median(samples[1:]))


def measure(size: int, seconds: float) -> dict:
    name = f"bench-{uuid.uuid4().hex[:8]}"
    ring = RingBuffer.create(name, slots=2, slot_bytes=size + (1 << 16))
    try:
        src = np.full(size, 7, dtype=np.uint8)
        dst = np.ones(size, dtype=np.uint8)
        payload = {"x": src}
        nothing = lambda: None  # noqa: E731
        free_it = lambda: ring.claim(timeout=0).ack() if ring.ready_count() else None  # noqa: E731
        refill = lambda: ring.put(payload) if not ring.ready_count() else None  # noqa: E731

        def read():
            with ring.claim(timeout=0) as lease:
                np.copyto(dst, lease.payload["x"])

        def claim_view():
            with ring.claim(timeout=0) as lease:
                lease.payload["x"]

        t_mem = _median_time(lambda: np.copyto(dst, src), nothing, seconds)
        t_put = _median_time(lambda: ring.put(payload), free_it, seconds)
        free_it()
        t_read = _median_time(read, refill, seconds)
        t_claim = _median_time(claim_view, refill, seconds / 2)
        free_it()
        return {
            "size": size,
            "memcpy_gbps": size / t_mem / 1e9,
            "put_gbps": size / t_put / 1e9,
            "read_gbps": size / t_read / 1e9,
            "put_ratio": t_mem / t_put,
            "read_ratio": t_mem / t_read,
            "memcpy_us": t_mem * 1e6,
            "put_us": t_put * 1e6,
            "read_us": t_read * 1e6,
            "claim_view_ack_us": t_claim * 1e6,
        }
    finally:
        ring.close()
        ring.unlink()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="4KiB,64KiB,1MiB,16MiB,64MiB", help="comma-separated sizes")
    ap.add_argument("--seconds", type=float, default=1.0, help="time per measurement (default 1.0)")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    a = ap.parse_args(argv)
    rows = [measure(parse_size(s), a.seconds) for s in a.sizes.split(",")]
    print(f"{'size':>8} {'memcpy GB/s':>12} {'put GB/s':>9} {'put/memcpy':>11} {'read GB/s':>10} "
          f"{'read/memcpy':>12} {'claim+view+ack us':>18}")
    for r in rows:
        print(f"{format_size(r['size']):>8} {r['memcpy_gbps']:12.2f} {r['put_gbps']:9.2f} {r['put_ratio']:11.2f} "
              f"{r['read_gbps']:10.2f} {r['read_ratio']:12.2f} {r['claim_view_ack_us']:18.1f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
