"""Direct calls: a sync call runs its exchange in the calling thread, on that thread's
own event loop progressing the process's one UCX worker (``engine.run_here``), with the
same rules as a call handed to the UCX loop thread. Real server, real endpoints."""

import asyncio
import concurrent.futures
import gc
import threading
import time

import numpy as np
import pytest

from clients import TransportClient
from tests import helpers
from ucxx_transport import engine

pytestmark = pytest.mark.timeout(120)


def test_run_here_runs_in_the_calling_thread_returns_raises_and_cancels_on_timeout():
    engine.acquire()
    try:
        assert engine.can_run_here()
        ran_in: list = []

        async def value():
            ran_in.append(threading.current_thread())
            await asyncio.sleep(0)
            return 42

        async def fails():
            raise KeyError("inside")

        cancelled = threading.Event()

        async def hangs():
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        async def cancelled_inside():
            asyncio.current_task().cancel()
            await asyncio.sleep(0)

        assert engine.run_here(value(), 5) == 42 and ran_in == [threading.current_thread()]
        with pytest.raises(KeyError, match="inside"):
            engine.run_here(fails(), 5)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            engine.run_here(hangs(), 0.2)
        assert time.monotonic() - t0 < 2 and cancelled.is_set()  # cancelled before run_here returned
        with pytest.raises(concurrent.futures.CancelledError):
            engine.run_here(cancelled_inside(), 5)
        assert engine.run_here(value(), 5) == 42  # the thread's loop is fine afterwards

        async def inside_a_loop():
            return engine.can_run_here()

        assert asyncio.run(inside_a_loop()) is False  # a thread running its own loop hands calls over
    finally:
        engine.release()


def test_a_thread_that_ends_takes_its_loop_and_driver_with_it():
    engine.acquire()
    try:
        async def value():
            return 1

        assert engine.run_here(value(), 5) == 1  # this thread's loop: one more driver of the worker
        before = len(engine._engine.drivers)
        t = threading.Thread(target=lambda: engine.run_here(value(), 5))
        t.start()
        t.join(10)
        del t
        gc.collect()
        assert len(engine._engine.drivers) == before, "an ended thread's driver still progresses the worker"
    finally:
        engine.release()
    assert engine._engine.drivers == [] and engine._engine.caller_loops == []


def test_threads_fetching_at_once_get_every_payload_once_and_intact(make_ring, ring_name, serve):
    """Four threads and the UCX loop (submit) fetch from one server at the same time: one
    endpoint pool, several loops progressing one worker; each payload arrives once, intact,
    and every slot is FREE afterwards."""
    ring = make_ring(slots=64, slot_bytes=1 << 16)
    srv = serve(ring_name)
    n_threads, per_thread = 4, 30
    with TransportClient(local_fast_path=False, timeout=10) as c:
        assert c.direct_calls
        c.connect(tuple(srv.address))
        got: dict = {}
        errors: list = []
        lock = threading.Lock()

        def worker(k):
            try:
                for j in range(per_thread):
                    i = k * per_thread + j
                    ref = ring.put({"x": np.full(1000 + i, i % 251, np.uint8)}, meta={"i": i})
                    if j % 3 == 2:  # batches too, through the same pool
                        (r,) = c.fetch_many([ref])
                        p = r.payload
                    else:
                        p = c.fetch(ref)
                    with lock:
                        got.setdefault(p.meta["i"], []).append(p["x"].copy())
                    p.release()
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(n_threads)]
        for t in threads:
            t.start()
        # meanwhile the UCX loop runs calls of its own on the same worker
        extra = [ring.put({"x": np.full(10, 200, np.uint8)}, meta={"i": 10_000 + k}) for k in range(10)]
        for ref in extra:
            p = c.submit(ref).result(30)
            got.setdefault(p.meta["i"], []).append(p["x"].copy())
            p.release()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert sorted(got) == list(range(n_threads * per_thread)) + [10_000 + k for k in range(10)]
        for i, arrays in got.items():
            assert len(arrays) == 1, f"payload {i} delivered {len(arrays)} times"
            if i < 10_000:
                assert len(arrays[0]) == 1000 + i and (arrays[0] == i % 251).all()
    assert helpers.wait_until(lambda: ring.state_counts()["FREE"] == 64, 15), ring.state_counts()


def test_direct_and_handed_over_calls_deliver_the_same(make_ring, ring_name, serve):
    """The same fetch, batch and take with direct calls on and off: the same payloads."""
    ring = make_ring(slots=32)
    srv = serve(ring_name)
    seen = {}
    for direct in (True, False):
        with TransportClient(local_fast_path=False, timeout=10, direct_calls=direct) as c:
            refs = helpers.put_many(ring, 6)
            one = c.fetch(refs[0])
            batch = c.fetch_many(refs[1:4])
            taken = c.take(tuple(srv.address), n=2, wait=2)
            seen[direct] = ([one.meta["i"]] + [r.payload.meta["i"] for r in batch] + [p.meta["i"] for p in taken],
                            helpers.checksum(one) == one.meta["crc"])
            assert c.stats()["fetches"] >= 4
    assert seen[True] == seen[False] == ([0, 1, 2, 3, 4, 5], True)


def test_close_lets_calls_running_in_other_threads_end_first(make_ring, ring_name, serve):
    """close() while another thread's direct call long-polls: the call ends normally (its own
    deadline), then the client closes; nothing fails halfway, nothing is left READING."""
    ring = make_ring()
    srv = serve(ring_name)
    c = TransportClient(local_fast_path=False, timeout=10)
    c.connect(tuple(srv.address))
    outcome: list = []

    def long_poll():
        try:
            outcome.append(c.take(tuple(srv.address), n=1, wait=1.5))
        except BaseException as exc:  # noqa: BLE001 - reported below
            outcome.append(exc)

    t = threading.Thread(target=long_poll)
    t.start()
    assert helpers.wait_until(lambda: c._direct_active == 1, 10)
    c.close(timeout=10)
    t.join(10)
    assert outcome == [[]], outcome
    ref = ring.put({"x": np.arange(3)})
    with TransportClient(local_fast_path=False, timeout=10) as again:  # the server and ring are fine
        assert again.fetch(ref)["x"].tolist() == [0, 1, 2]
