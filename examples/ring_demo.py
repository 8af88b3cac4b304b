"""Producer/consumer demo on the shared-memory ring (no network).

    python examples/ring_demo.py [--producers 2] [--payloads 200]

Spawns producer processes that publish multi-turn rollouts (appended turn by
turn, in place) and one consumer that claims each payload exactly once from
shared memory, checks it, and acks it.
"""

import argparse
import multiprocessing as mp
import time
import uuid

import numpy as np

import shm


def produce(ring_name: str, n: int, seed: int) -> None:
    ring = shm.RingBuffer.attach(ring_name)
    rng = np.random.default_rng(seed)
    for i in range(n):
        with ring.reserve(timeout=30) as w:
            turns = int(rng.integers(1, 5))
            for t in range(turns):
                k = int(rng.integers(16, 512))
                w.append("tokens", rng.integers(0, 50_000, size=k, dtype=np.int32))
                w.append("logprobs", rng.standard_normal(k).astype(np.float32))
            w.set("reward", np.float32(rng.random()))
            w.publish({"producer": seed, "i": i, "turns": turns})
    ring.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--producers", type=int, default=2)
    ap.add_argument("--payloads", type=int, default=200, help="payloads per producer")
    a = ap.parse_args()
    name = f"demo-{uuid.uuid4().hex[:6]}"
    ring = shm.RingBuffer.create(name, slots=16, slot_bytes=1 << 20)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=produce, args=(name, a.payloads, s)) for s in range(a.producers)]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    got, nbytes = set(), 0
    try:
        while len(got) < a.producers * a.payloads:
            with ring.claim(timeout=30) as lease:
                p = lease.payload
                assert p["tokens"].shape == p["logprobs"].shape
                got.add((p.meta["producer"], p.meta["i"]))
                nbytes += p.nbytes
        for p in procs:
            p.join()
        dt = time.perf_counter() - t0
        print(f"consumed {len(got)} payloads exactly once ({nbytes / 1e6:.1f} MB) in {dt:.2f} s; "
              f"ring states at the end: {ring.state_counts()}")
    finally:
        ring.close()
        ring.unlink()


if __name__ == "__main__":
    main()
