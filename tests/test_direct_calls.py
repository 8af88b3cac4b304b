"""Direct calls: a sync call runs its exchange in the calling thread, on that thread's
own event loop progressing the process's one UCX worker (``engine.run_here``), with the
same rules as a call handed to the UCX loop thread. Real server, real endpoints."""

import asyncio
import gc
import signal
import threading
import time
import types
import warnings

import numpy as np
import pytest

from clients import TransportClient
from tests import helpers
from ucxx_transport import engine

pytestmark = pytest.mark.timeout(120)


def test_a_thread_running_its_own_event_loop_hands_its_calls_over():
    """(run_here's result, error, timeout and cancel rules: test_mechanisms, run both ways)"""
    engine.acquire()
    try:
        async def inside_a_loop():
            return engine.can_run_here()

        assert engine.can_run_here()
        assert asyncio.run(inside_a_loop()) is False
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


def _long_poll_in_a_thread(c, address, wait: float):
    """A thread whose direct call long-polls (a take of ``wait`` s), started and in its call;
    ``outcome`` gets what it returned or the repr of what it raised (not the exception: its
    traceback holds UCX objects), then how long it took."""
    c.connect(address)
    outcome: list = []

    def long_poll():
        t0 = time.monotonic()
        try:
            outcome.append(c.take(address, n=1, wait=wait))
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            outcome.append(repr(exc))
        outcome.append(time.monotonic() - t0)

    t = threading.Thread(target=long_poll)
    t.start()
    assert helpers.wait_until(lambda: c._direct_active == 1, 10)
    return t, outcome


def test_close_lets_calls_running_in_other_threads_end_first(make_ring, ring_name, serve):
    """close() while another thread's direct call long-polls: the call ends normally (its own
    deadline), then the client closes; nothing fails halfway, nothing is left READING."""
    ring = make_ring()
    srv = serve(ring_name)
    c = TransportClient(local_fast_path=False, timeout=10)
    t, outcome = _long_poll_in_a_thread(c, tuple(srv.address), wait=1.5)
    c.close(timeout=10)
    t.join(10)
    assert outcome[0] == [], outcome
    ref = ring.put({"x": np.arange(3)})
    with TransportClient(local_fast_path=False, timeout=10) as again:  # the server and ring are fine
        assert again.fetch(ref)["x"].tolist() == [0, 1, 2]


# ------------------------------------------------ Ctrl-C at the edges of a call --
async def _value():
    await asyncio.sleep(0)  # two loop rounds: a stray stop queued before it would cut it short
    return 42


def test_ctrl_c_as_a_call_ends_does_not_interrupt_the_next_call():
    """A Ctrl-C handled in the call's last loop round leaves a stop queued on the thread's loop
    (the loop is reused by the next call): it must not stop that next call."""
    engine.acquire()
    try:
        assert engine.can_run_here()

        async def ends_with_ctrl_c():
            # runs in the same round as the task's completion: the handler's stop lands after it
            asyncio.get_running_loop().call_soon(signal.raise_signal, signal.SIGINT)
            return 1

        kept: list = []
        with pytest.raises(KeyboardInterrupt):
            engine.run_here(ends_with_ctrl_c(), 5, on_interrupt=kept.append)
        assert kept and kept[0].result(0) == 1, "the interrupted call's outcome is handed over"
        try:
            for _ in range(3):
                assert engine.run_here(_value(), 5) == 42
        except KeyboardInterrupt:
            pytest.fail("a Ctrl-C of the previous call interrupted this one")
    finally:
        engine.release()


def test_two_quick_ctrl_c_still_let_the_interrupted_work_finish():
    """The second Ctrl-C's stop is queued after the loop already stopped for the first: the
    helper thread finishing the work must not stop on it (the work, and its payloads, lost)."""
    engine.acquire()
    try:
        async def work_through_two_interrupts():
            signal.raise_signal(signal.SIGINT)
            asyncio.get_running_loop().call_soon(signal.raise_signal, signal.SIGINT)
            await asyncio.sleep(0.2)
            return 7

        kept: list = []
        with pytest.raises(KeyboardInterrupt):
            engine.run_here(work_through_two_interrupts(), 5, on_interrupt=kept.append)
        assert kept[0].result(5) == 7, "the work was cut short in the helper thread"
        assert engine.run_here(_value(), 5) == 42
    finally:
        engine.release()


def test_ctrl_c_before_the_handler_is_swapped_starts_nothing(monkeypatch):
    """A Ctrl-C landing while the call sets itself up (Python's handler still in place): the work
    never starts, so no half-started call runs unseen during the next one."""
    engine.acquire()
    try:
        ran: list = []

        async def first():
            ran.append("first")

        real = engine._signal
        calls = {"n": 0}

        def ctrl_c_on_first_swap(signum, handler):
            calls["n"] += 1
            if calls["n"] == 1:
                raise KeyboardInterrupt
            return real.signal(signum, handler)

        monkeypatch.setattr(engine, "_signal", types.SimpleNamespace(getsignal=real.getsignal,
                                                                      signal=ctrl_c_on_first_swap))
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # "coroutine was never awaited"
            with pytest.raises(KeyboardInterrupt):
                engine.run_here(first(), 5)
            gc.collect()
        monkeypatch.setattr(engine, "_signal", real)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert engine.run_here(_value(), 5) == 42
        assert ran == [], "the interrupted call's work ran during the next call"
    finally:
        engine.release()


def test_a_call_outliving_its_clients_close_is_cancelled_not_left_to_its_deadline(make_ring, ring_name, serve):
    """close() gives up waiting for another thread's call (its timeout is shorter than the call):
    UCX's teardown cancels that call in its own thread; it fails at once, no UCX context is made
    again behind the closed client's back, and the ring's payloads are intact for the next client."""
    ring = make_ring()
    srv = serve(ring_name)
    c = TransportClient(local_fast_path=False, timeout=30)
    t, outcome = _long_poll_in_a_thread(c, tuple(srv.address), wait=20)
    time.sleep(0.2)  # the take is posted and long-polling (no event to wait on from here)
    c.close(timeout=0.5)
    t.join(15)
    assert not t.is_alive(), "the call runs on after UCX stopped"
    assert "client was closed while this call ran" in outcome[0] and outcome[1] < 10, outcome
    assert engine._engine.ctx is None and engine._engine.mode is None, "a UCX context was made again"
    # the call's endpoint was closed on its way out (UCX progressed meanwhile): the server's TAKE
    # for it has ended, so it does not lease the next payload to a reader that is gone
    ref = ring.put({"x": np.arange(3)})
    with TransportClient(local_fast_path=False, timeout=10) as again:
        assert again.fetch(ref)["x"].tolist() == [0, 1, 2]


def test_a_call_starting_as_the_client_closes_fails_clearly_and_makes_no_new_ucx(make_ring, ring_name, serve,
                                                                                  monkeypatch):
    """A call that passed its checks just before close() ran (close() then saw no call running
    and stopped UCX) must not go on: it fails with "client is closed", and no UCX context is
    created again behind the closed client's back."""
    make_ring()
    srv = serve(ring_name)
    c = TransportClient(local_fast_path=False, timeout=10)
    c.connect(tuple(srv.address))
    checked, go_on = threading.Event(), threading.Event()
    real = engine.can_run_here

    def checked_then_held():  # the interleaving: this call is past its checks when close() runs
        ok = real()
        if threading.current_thread().name == "late-call":
            checked.set()
            go_on.wait(10)
        return ok

    monkeypatch.setattr(engine, "can_run_here", checked_then_held)
    outcome: list = []

    def late_call():
        try:
            outcome.append(c.take(tuple(srv.address), n=1, wait=0.1))
        except BaseException as exc:  # noqa: BLE001 - reported below
            outcome.append(repr(exc))

    t = threading.Thread(target=late_call, name="late-call")
    t.start()
    assert checked.wait(10)
    c.close(timeout=5)
    go_on.set()
    t.join(15)
    assert not t.is_alive() and len(outcome) == 1 and "client is closed" in outcome[0], outcome
    assert engine._engine.ctx is None and engine._engine.mode is None, "a UCX context was made again"


def test_a_ctrl_c_right_as_the_handler_goes_back_still_keeps_the_interrupted_work(monkeypatch):
    """A second Ctrl-C the moment Python's own handler is back (it raises at once): the work the
    first one interrupted has already been handed over, so its outcome is not dropped."""
    engine.acquire()
    try:
        async def work():
            signal.raise_signal(signal.SIGINT)  # the first Ctrl-C: stops the loop mid-work
            await asyncio.sleep(0.2)
            return 7

        real = engine._signal
        swaps = {"n": 0}

        def second_ctrl_c_on_restore(signum, handler):
            swaps["n"] += 1
            previous = real.signal(signum, handler)
            if swaps["n"] == 2:  # Python's handler is back: the pending Ctrl-C raises here
                raise KeyboardInterrupt
            return previous

        monkeypatch.setattr(engine, "_signal", types.SimpleNamespace(getsignal=real.getsignal,
                                                                      signal=second_ctrl_c_on_restore))
        kept: list = []
        with pytest.raises(KeyboardInterrupt):
            engine.run_here(work(), 5, on_interrupt=kept.append)
        monkeypatch.setattr(engine, "_signal", real)
        assert kept, "the interrupted work was never handed over"
        assert kept[0].result(5) == 7
        assert engine.run_here(_value(), 5) == 42
    finally:
        engine.release()


def test_aborts_do_not_pile_wake_ups_on_the_loop_of_a_thread_between_calls():
    """An endpoint abort wakes the drivers of running calls; a thread between calls (its loop
    stopped, maybe for hours) must not collect one queued wake-up per abort."""
    engine.acquire()
    try:
        assert engine.run_here(_value(), 5) == 42  # this thread's loop, now stopped between calls
        drv = engine._here.loop_driver
        woken = {"n": 0}
        real_kick = drv.kick

        def counted_kick():
            woken["n"] += 1
            real_kick()

        drv.kick = counted_kick
        for _ in range(1000):
            engine.kick_all()
        assert engine.run_here(_value(), 5) == 42
        assert woken["n"] < 10, f"{woken['n']} wake-ups queued while the thread's loop was stopped"
    finally:
        engine.release()


def test_a_direct_call_without_ucx_running_is_refused_clearly_and_starts_nothing():
    assert engine._engine.mode is None, "UCX still runs from an earlier test"

    async def never():
        raise AssertionError("ran")

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # "coroutine was never awaited"
        with pytest.raises(engine.UCXStoppedError, match="not running"):
            engine.run_here(never(), 5)
        gc.collect()
    assert engine._engine.ctx is None, "a UCX context was made for the refused call"
