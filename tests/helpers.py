"""Worker functions for spawned test processes (importable by path)."""

from __future__ import annotations

import os
import time
import zlib

import numpy as np

import shm

DTYPES = ["int8", "uint8", "int16", "int32", "int64", "uint64", "float16", "float32", "float64",
          "complex64", "bool"]


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def checksum(payload) -> int:
    crc = 0
    for name in sorted(payload):
        a = np.ascontiguousarray(payload[name])
        crc = zlib.crc32(name.encode(), crc)
        crc = zlib.crc32(str(a.dtype).encode() + str(a.shape).encode(), crc)
        crc = zlib.crc32(a.view(np.uint8).reshape(-1) if a.size else b"", crc)
    return crc


def put_many(ring, n, size=1000):
    """Publish ``n`` small payloads (field ``i`` = index, checksum in meta); their refs."""
    refs = []
    for i in range(n):
        p = {"x": np.full(size, i % 251, dtype=np.uint8), "i": np.int64(i)}
        refs.append(ring.put(p, meta={"crc": checksum(p), "i": i}))
    return refs


def random_payload(rng: np.random.Generator, max_bytes: int) -> dict:
    out = {}
    for i in range(int(rng.integers(1, 4))):
        dt = np.dtype(DTYPES[int(rng.integers(len(DTYPES)))])
        ndim = int(rng.integers(0, 3))
        budget = max(1, max_bytes // 4 // dt.itemsize)
        if ndim == 0:
            shape = ()
        elif ndim == 1:
            shape = (int(rng.integers(0, budget)),)
        else:
            shape = (int(rng.integers(0, 64)), int(rng.integers(1, max(2, budget // 64))))
        out[f"f{i}"] = (rng.integers(0, 255, size=int(np.prod(shape)) * dt.itemsize, dtype=np.uint8)
                        .view(dt).reshape(shape))
    return out


def producer(ring_name: str, n: int, seed: int, max_bytes: int, out_q) -> None:
    ring = shm.RingBuffer.attach(ring_name)
    rng = np.random.default_rng(seed)
    for i in range(n):
        p = random_payload(rng, max_bytes)
        ref = ring.put(p, meta={"crc": checksum(p), "producer": seed, "i": i}, timeout=60)
        out_q.put(ref.to_dict())
    out_q.put(None)
    ring.close()


def consumer(ring_name: str, result_q, stop_evt) -> None:
    ring = shm.RingBuffer.attach(ring_name)
    seen = []
    bad = 0
    while True:
        try:
            lease = ring.claim(timeout=0.2)
        except shm.RingEmptyError:
            if stop_evt.is_set() and ring.ready_count() == 0:
                break
            continue
        with lease:
            p = lease.payload
            if checksum(p) != p.meta["crc"]:
                bad += 1
            seen.append((p.meta["producer"], p.meta["i"], lease.slot, lease.generation))
    result_q.put((seen, bad))
    ring.close()


def slow_writer(ring_name: str, nbytes: int, ready_evt) -> None:
    """Publishes payloads forever with a checksum; killed by the test at a random point."""
    ring = shm.RingBuffer.attach(ring_name)
    rng = np.random.default_rng(os.getpid())
    i = 0
    ready_evt.set()
    while True:
        data = rng.integers(0, 255, size=int(rng.integers(1, nbytes)), dtype=np.uint8)
        with ring.reserve(timeout=60) as w:
            # write in several appends so a kill can land mid-write
            for chunk in np.array_split(data, 8):
                w.append("data", chunk)
            w.publish({"crc": checksum({"data": data}), "i": i})
        i += 1


def hold_lease(ring_name: str, ref_dict, held_evt) -> None:
    ring = shm.RingBuffer.attach(ring_name)
    lease = ring.claim(shm.SlotRef.from_dict(ref_dict) if ref_dict else None, timeout=10)
    _ = lease.payload
    held_evt.set()
    time.sleep(3600)


def take_consumer(host: str, ports: list, stop_evt, result_q) -> None:
    """Pull payloads with TAKE until told to stop and the server has none left."""
    from clients import TransportClient

    seen, bad = [], 0
    with TransportClient(local_fast_path=False, timeout=10) as c:
        while True:
            got = c.take((host, ports), n=4, wait=0.2)
            for p in got:
                if checksum(p) != p.meta["crc"]:
                    bad += 1
                seen.append((p.meta["producer"], p.meta["i"]))
                p.release()
            if not got and stop_evt.is_set():
                break
    result_q.put((seen, bad))


def wait_until(pred, timeout: float = 10.0, interval: float = 0.01) -> bool:
    """Poll ``pred`` until true or ``timeout``. For state another process changes
    asynchronously (e.g. a server applying an ACK the client already sent), where
    no event is exposed to wait on."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


def all_free(ring) -> bool:
    return ring.state_counts()["FREE"] == ring.slots


def drain_and_check(ring) -> int:
    """Claim everything READY; every payload must match its checksum. Returns the count."""
    n = 0
    while True:
        try:
            lease = ring.claim(timeout=0)
        except shm.RingEmptyError:
            return n
        with lease:
            p = lease.payload
            assert checksum(p) == p.meta["crc"], "corrupt payload"
            n += 1


def sigkill_writer_trials(ring, ring_name, spawn, trials: int, seed: int, max_delay: float = 0.05) -> None:
    """Start a writer, SIGKILL it at a random point, recover: nothing published
    may be lost, nothing half-written may be visible, no slot may leak."""
    import os
    import random
    import signal

    rnd = random.Random(seed)
    for trial in range(trials):
        ready = spawn.Event()
        p = spawn.Process(target=slow_writer, args=(ring_name, 1 << 19, ready))
        p.start()
        assert ready.wait(30)
        time.sleep(rnd.uniform(0.0, max_delay))  # the kill lands at a random point of the write loop
        os.kill(p.pid, signal.SIGKILL)
        p.join(10)
        before = ring.stats()
        ring.recover()
        counts = ring.state_counts()
        assert counts["WRITING"] == 0 and counts["READING"] == 0, f"trial {trial}: leaked {counts}"
        # every publish is READY or consumed, except at most the killed writer's own: a kill inside
        # publish (generation bumped, state not yet READY) leaves WRITING, which recovery frees
        assert before["published"] - before["consumed"] - counts["READY"] in (0, 1), (counts, before)
        drain_and_check(ring)
        assert ring.state_counts()["FREE"] == ring.slots


def fill_and_serve(ring_name: str, n: int, tag: str) -> None:
    """Create ring ``ring_name``, publish ``n`` payloads tagged ``tag``, serve it on
    loopback; print the ready line (JSON) and serve until stdin closes."""
    import json
    import sys

    from ucxx_transport.server import TransportServer

    ring = shm.RingBuffer.create(ring_name, slots=max(4, n), slot_bytes=1 << 16)
    for i in range(n):
        p = {"x": np.full(100, i, dtype=np.int32)}
        ring.put(p, meta={"crc": checksum(p), "src": tag, "i": i})
    srv = TransportServer(ring, host="127.0.0.1", n_ports=1)
    srv.start()
    print(json.dumps({"ports": srv.ports, "ring_id": ring.ring_id}), flush=True)
    sys.stdin.read()
    srv.stop()
    ring.close()
    shm.RingBuffer.unlink_name(ring_name)


def freeze_holding_slot_lock(ring_name: str, slot: int, held_evt) -> None:
    """Take slot ``slot``'s transition lock as a transition would, then stop this
    process (SIGSTOP): a producer frozen in the middle of a transition."""
    import signal

    ring = shm.RingBuffer.attach(ring_name)
    assert ring._table._try_lock(slot)
    held_evt.set()
    os.kill(os.getpid(), signal.SIGSTOP)
    time.sleep(3600)
