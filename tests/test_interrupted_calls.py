"""A caller interrupted (Ctrl-C) in the middle of a call loses no payload: what the
call had consumed is kept for the next call that asks, and what it had only
claimed goes back to READY. Real processes: the trainer is a subprocess that gets
a real SIGINT."""

import gc
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import shm
from clients import TransportClient
from shm.state import READING, READY
from tests import helpers

pytestmark = pytest.mark.timeout(120)


class Trainer:
    """A Python subprocess running ``code``; it and the test speak in lines."""

    def __init__(self, code: str):
        env = dict(os.environ, PYTHONPATH=helpers.REPO)
        self.proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    def expect(self, word: str) -> str:
        line = self.proc.stdout.readline()
        if not line.startswith(word):
            self.proc.kill()
            raise AssertionError(f"trainer said {line!r}, expected {word!r}; stderr: {self.proc.stderr.read()[-3000:]}")
        return line[len(word):].strip()

    def say(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def interrupt(self) -> None:
        self.proc.send_signal(signal.SIGINT)

    def finish(self) -> None:
        self.proc.stdin.close()
        assert self.proc.wait(30) == 0, self.proc.stderr.read()[-3000:]


@pytest.mark.parametrize("direct", [True, False], ids=["direct-call", "handed-over"])
def test_take_interrupted_while_it_waits_hands_its_payload_to_the_next_take(make_ring, ring_name, serve, direct):
    """Ctrl-C during a long-poll take: the take still finishes (on the client's UCX loop, or
    for a direct call in a helper thread); the payload it consumes must reach the next take
    (before: consumed, ACKed and dropped)."""
    ring = make_ring()
    srv = serve(ring_name)
    t = Trainer(f"""
        import asyncio, json, os, signal, sys, threading, time
        from clients import TransportClient
        from ucxx_transport import engine
        c = TransportClient(local_fast_path=False, timeout=10, direct_calls={direct})
        c.connect({tuple(srv.address)!r})
        assert engine.can_run_here()  # (the main thread, Python's own Ctrl-C handler)

        def ctrl_c_once_the_take_runs():  # a real SIGINT, once the take's task runs (on the UCX loop,
            while True:                     # or with direct calls on this thread's own loop)
                try:
                    loops = [engine._engine.loop, *engine._engine.caller_loops]
                    if any("_take" in repr(t.get_coro()) for lp in loops for t in asyncio.all_tasks(lp)):
                        break
                except RuntimeError:  # the loop's task set changed while it was read: look again
                    pass
                time.sleep(0.005)
            os.kill(os.getpid(), signal.SIGINT)

        threading.Thread(target=ctrl_c_once_the_take_runs, daemon=True).start()
        try:
            c.take({tuple(srv.address)!r}, n=1, wait=60)
            print("not interrupted", flush=True)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
        sys.stdin.readline()
        got = c.take({tuple(srv.address)!r}, n=4, wait=2)
        print("got", json.dumps([p.meta for p in got]), flush=True)
        print("stats", json.dumps(c.stats()["kept_after_interrupt"]), flush=True)
        c.close()
    """)
    t.expect("interrupted")
    ring.put({"x": np.arange(100, dtype=np.int32)}, meta={"i": 7})
    # the interrupted take, still waiting on the client's loop, consumes it
    assert helpers.wait_until(lambda: ring.state_counts()["READY"] + ring.state_counts()["READING"] == 0, 30)
    t.say("go")
    assert json.loads(t.expect("got")) == [{"i": 7}]
    assert json.loads(t.expect("stats")) == 0
    t.finish()
    assert ring.state_counts()["READY"] == 0  # consumed once, by the trainer


@pytest.mark.parametrize("path", ["same-host", "network"])
def test_batch_interrupted_in_a_later_round_keeps_what_it_consumed(make_ring, ring_name, serve, spawn, path):
    """A fetch_many delivers what it could, then retries a busy slot (same host: claims 50 ms
    apart; network: later rounds): Ctrl-C there must not drop the payloads already consumed;
    the next fetch_many of the same refs (which first waits for that work) returns them."""
    ring = make_ring(slots=16)
    if path == "network":
        serve(ring_name)  # the refs carry its address
    refs = helpers.put_many(ring, 10)
    held = spawn.Event()
    holder = spawn.Process(target=helpers.hold_lease, args=(ring_name, refs[3].to_dict(), held), daemon=True)
    holder.start()
    options = "max_attempts=20, max_rounds=8" if path == "same-host" else "local_fast_path=False, max_rounds=6"
    try:
        assert held.wait(30)
        t = Trainer(f"""
            import json, sys
            import shm
            from clients import TransportClient
            from tests import helpers
            refs = [shm.SlotRef.from_dict(d) for d in json.loads(sys.stdin.readline())]
            c = TransportClient({options}, timeout=5)
            print("ready", flush=True)
            try:
                c.fetch_many(refs)
                print("not interrupted", flush=True)
            except KeyboardInterrupt:
                print("interrupted", flush=True)
            got = c.fetch_many(refs)
            print("got", json.dumps([[r.payload.meta["i"], helpers.checksum(r.payload) == r.payload.meta["crc"]]
                                     if r.ok else type(r.error).__name__ for r in got]), flush=True)
            c.close()
        """)
        t.say(json.dumps([r.to_dict() for r in refs]))
        t.expect("ready")
        # the first round has consumed every ref but the held one: the retries are on
        assert helpers.wait_until(lambda: ring.state_counts()["READY"] == 0, 30)
        t.interrupt()
        t.expect("interrupted")
        got = json.loads(t.expect("got"))
        assert [g for i, g in enumerate(got) if i != 3] == [[i, True] for i in range(10) if i != 3]
        assert got[3] == "ServerBusyError"  # still held by the other reader
        t.finish()
    finally:
        holder.kill()
        holder.join(10)


@pytest.mark.parametrize("where", ["payloads", "finalise"])
def test_same_host_batch_interrupted_between_claim_and_ack_gives_its_slots_back(make_ring, monkeypatch, where):
    """An interrupt after a same-host batch was claimed (and decoded) and before it was acked:
    the slots go back to READY at once, even while the interrupt's traceback is kept (as a REPL
    keeps it); before: left READING by a live process, which nobody reclaims."""
    ring = make_ring(slots=16)
    refs = helpers.put_many(ring, 6)

    def interrupted(self, *args):  # ("finalise": after the batch was decoded, its views exist)
        raise KeyboardInterrupt

    with TransportClient() as c:
        with monkeypatch.context() as m:
            m.setattr(shm.LeaseBatch, where, interrupted)
            with pytest.raises(KeyboardInterrupt) as kept_traceback:
                c.fetch_many(refs)
        assert kept_traceback.tb is not None
        assert ring.state_counts()["READY"] == 6
        got = c.fetch_many(refs)
        assert all(r.ok for r in got) and [r.payload.meta["i"] for r in got] == list(range(6))


def test_a_lease_batch_dropped_unfinished_gives_back_only_what_it_still_holds(make_ring):
    ring = make_ring(slots=16)
    refs = helpers.put_many(ring, 4)
    batch, _ = ring.claim_batch([r.slot for r in refs], [r.generation for r in refs])
    kept = batch.subset([0, 1])  # items 2 and 3 are left to the dropped batch
    del batch
    gc.collect()
    states = ring._table.state
    assert [int(states[r.slot]) for r in refs] == [READING, READING, READY, READY]
    assert kept.finalise(True)
    assert ring.state_counts()["READY"] == 2 and ring.state_counts()["READING"] == 0


def test_kept_payloads_are_handed_out_as_asked_and_released_at_close(make_ring, caplog):
    from clients.kept import Kept

    ring = make_ring(slots=16)
    refs = [ring.put({"a": np.arange(3), "b": np.arange(4)}) for _ in range(3)]
    payloads = [ring.claim(r).payload for r in refs]
    kept = Kept()
    where = ("127.0.0.1", (1, 2))
    kept.keep_taken(where, payloads[:1], ["a"])  # an interrupted take(fields=["a"])
    kept.keep(refs[1].key, payloads[1])          # an interrupted fetch of the whole payload
    assert kept.pop_taken(("127.0.0.1", (3,)), 4) == []  # another server's take gets nothing of it
    with caplog.at_level("WARNING", logger="clients.kept"):
        (got,) = kept.pop_taken(where, 4)  # asked for everything: only "a" was fetched, and it says so
    assert sorted(got) == ["a", "b"] and "asked only for fields ['a']" in caplog.text
    assert sorted(kept.pop(refs[1].key, ["b"])) == ["b"]  # restricted to what this call asks for
    assert kept.pop(refs[1].key) is None and len(kept) == 0
    kept.keep(refs[2].key, payloads[2])
    assert kept.close(limit=1.0) == 1 and len(kept) == 0
    kept.keep(refs[0].key, payloads[0])  # work that ends after close: released at once, not kept
    assert len(kept) == 0
    with pytest.raises(shm.PayloadReleasedError):
        payloads[0]["a"]


# ------------------------------------------------------------ async callers --
def _linger_after_the_first_ack(monkeypatch):
    """Make this process's first ACK send linger 0.3 s once sent (the call is then between its
    ACK and its return, the moment a cancel must not drop what it consumed); an Event set
    when that ACK went out."""
    import asyncio
    import threading

    from ucxx_transport import engine
    from ucxx_transport.protocol import Op, ProtocolError, decode_request

    acked = threading.Event()
    real_send = engine.send

    def is_ack(buf) -> bool:
        try:
            return decode_request(buf).op == Op.ACK
        except ProtocolError:  # a request with a table after its header (GETV)
            return False

    async def send_then_linger_after_an_ack(ep, buf):
        await real_send(ep, buf)
        if not acked.is_set() and is_ack(buf):
            acked.set()
            await asyncio.sleep(0.3)

    monkeypatch.setattr(engine, "send", send_then_linger_after_an_ack)
    return acked


@pytest.mark.parametrize("call", ["afetch", "afetch_many", "atake"])
def test_an_async_call_cancelled_after_its_ack_keeps_the_payload_for_the_next_call(make_ring, ring_name, serve,
                                                                                   monkeypatch, call):
    """An async caller whose call is cancelled (asyncio.wait_for ran out, a task group ended)
    just after the call ACKed its payload: the payload was consumed on the server; it must
    reach the next call that asks, not be dropped with the cancelled one."""
    import asyncio

    ring = make_ring()
    srv = serve(ring_name)
    ref = ring.put({"x": np.arange(5)})
    acked = _linger_after_the_first_ack(monkeypatch)
    address = tuple(srv.address)

    async def ask(c):
        if call == "afetch":
            return await c.afetch(ref)
        if call == "afetch_many":
            (r,) = await c.afetch_many([ref])
            if r.error is not None:
                raise r.error
            return r.payload
        (p,) = await c.atake(address, n=1, wait=5)
        return p

    async def main(c):
        first = asyncio.ensure_future(ask(c))
        assert await asyncio.get_running_loop().run_in_executor(None, acked.wait, 20)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        return await ask(c)

    with TransportClient(local_fast_path=False, timeout=10, direct_calls=False) as c:
        got = asyncio.run(main(c))
        assert got["x"].tolist() == [0, 1, 2, 3, 4]
        got.release()
    assert ring.stats()["consumed"] == 1


@pytest.mark.parametrize("then", ["atake", "take"])
def test_a_long_poll_atake_cancelled_while_it_waits_loses_nothing_published_after(make_ring, ring_name, serve, then):
    """An async long-poll take cancelled while it waits (``asyncio.wait_for`` ran out): the
    take runs on, so the payload published afterwards may be consumed by it; that payload
    must reach the next take (async, or a sync direct call from another thread), not vanish
    with the cancelled one; nothing is left claimed."""
    import asyncio

    ring = make_ring()
    srv = serve(ring_name)
    address = tuple(srv.address)

    async def main(c):
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(c.atake(address, n=1, wait=3), 0.3)  # the server holds it as a waiter
        ring.put({"x": np.arange(3)})
        if then == "atake":
            return await c.atake(address, n=1, wait=5)
        return await asyncio.get_running_loop().run_in_executor(None, lambda: c.take(address, n=1, wait=5))

    with TransportClient(local_fast_path=False, timeout=10) as c:
        got = asyncio.run(main(c))
        assert len(got) == 1 and got[0]["x"].tolist() == [0, 1, 2]
        got[0].release()
        assert c.stats()["kept_after_interrupt"] == 0
    assert ring.stats()["consumed"] == 1


@pytest.mark.parametrize("how", ["take", "stream"])
def test_fan_in_interrupted_while_it_settles_keeps_what_it_consumed(make_ring, ring_name, serve, how):
    """Ctrl-C while a fan-in take (or a FanIn stream's next()) settles its delivery: the
    settle runs on and consumes the payload; the next take / next() must hand it out
    (before: consumed and dropped with the interrupted call)."""
    ring = make_ring()
    srv = serve(ring_name)
    ring.put({"x": np.arange(4)}, meta={"i": 1})
    entry = {"ring_id": ring.ring_id, "ring": ring_name, "host": srv.address[0], "ports": list(srv.address[1])}
    t = Trainer(f"""
        import json
        from clients import FanIn, TransportClient
        from tests.ctrl_c_hooks import ctrl_c_while_settling
        from ucxx_transport.directory import StaticDirectory

        undo = ctrl_c_while_settling()
        c = TransportClient(local_fast_path=False, timeout=10)
        f = FanIn(c, StaticDirectory([{entry!r}]))
        s = f.stream(n=1, wait=5) if {how!r} == "stream" else None
        try:
            got = next(s) if s is not None else f.take(n=1, wait=5)
            print("not interrupted", flush=True)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
        undo()
        got = [next(s)] if s is not None else f.take(n=1, wait=1)
        print("got", json.dumps([p.meta for p in got]), flush=True)
        if s is not None:
            s.close()
        f.close()
        c.close()
    """)
    t.expect("interrupted")
    assert json.loads(t.expect("got")) == [{"i": 1}]
    t.finish()
    assert ring.stats()["consumed"] == 1 and ring.state_counts()["FREE"] == ring.slots


@pytest.mark.parametrize("where,when", [("UCX loop", "while it waits"), ("UCX loop", "as it returns"),
                                        ("calling thread", "as it returns")])
def test_a_call_interrupted_at_any_step_hands_its_outcome_to_on_interrupt(where, when):
    """A sync call (``engine.run``: handed to the UCX loop thread, as in other progress
    modes, settling held deliveries, fan-in; ``engine.run_here``: a direct call) whose
    caller gets a Ctrl-C while it waits, or in its last steps once the work's result is
    in: the result reaches ``on_interrupt`` and the interrupt goes on (before: a Ctrl-C
    in the last steps dropped the result, or for a direct call was swallowed)."""
    t = Trainer(f"""
        import _thread, asyncio, json, os, signal
        from ucxx_transport import engine

        class LateCtrlC(asyncio.Task):  # one Ctrl-C lands as the caller takes the finished work's result
            fired = False

            def result(self):
                if not LateCtrlC.fired:
                    LateCtrlC.fired = True
                    _thread.interrupt_main()
                return super().result()

        async def work():
            if {when!r} == "while it waits":
                os.kill(os.getpid(), signal.SIGINT)
            return "consumed"

        engine.acquire()
        run = engine.run_here if {where!r} == "calling thread" else engine.run
        if {where!r} == "calling thread":
            assert engine.can_run_here()
            run(asyncio.sleep(0), 5)  # (makes this thread's loop)
        loop = engine._here.loop if {where!r} == "calling thread" else engine._engine.loop
        if {when!r} == "as it returns":
            loop.set_task_factory(lambda lp, c: (LateCtrlC if c.__name__ == "work" else asyncio.Task)(c, loop=lp))
        kept = []
        try:
            run(work(), 10, on_interrupt=kept.append)
            print("returned", flush=True)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
        loop.set_task_factory(None)
        print("kept", json.dumps([o.result(10) for o in kept]), flush=True)
        engine.release()
    """)
    t.expect("interrupted")
    assert json.loads(t.expect("kept")) == ["consumed"]
    t.finish()


@pytest.mark.parametrize("source", ["refs", "take"])
def test_fetch_stream_interrupted_while_it_acks_hands_the_payload_out_next(make_ring, ring_name, serve, source):
    """Ctrl-C while a FetchStream's next() settles (ACKs) the payload it is handing out:
    the settle runs on and consumes it; the next next() must return it (before: consumed
    and dropped)."""
    ring = make_ring()
    srv = serve(ring_name)
    ref = ring.put({"x": np.arange(4)}, meta={"i": 1})
    t = Trainer(f"""
        import json
        import shm
        from clients import TransportClient
        from tests.ctrl_c_hooks import ctrl_c_while_settling

        undo = ctrl_c_while_settling()
        c = TransportClient(local_fast_path=False, timeout=10)
        if {source!r} == "refs":
            s = c.stream([shm.SlotRef.from_dict({json.dumps(ref.to_dict())})])
        else:
            s = c.stream(address={tuple(srv.address)!r}, wait=1)
        try:
            next(s)
            print("not interrupted", flush=True)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
        undo()
        print("got", json.dumps(next(s).meta), flush=True)
        s.close()
        c.close()
    """)
    t.expect("interrupted")
    assert json.loads(t.expect("got")) == {"i": 1}
    t.finish()
    assert ring.stats()["consumed"] == 1 and ring.state_counts()["FREE"] == ring.slots


@pytest.mark.parametrize("call", ["submit", "submit_many"])
def test_cancelling_a_submitted_fetch_after_its_ack_does_not_drop_the_payload(make_ring, ring_name, serve,
                                                                              monkeypatch, call):
    """``fut.cancel()`` on a running ``submit``/``submit_many`` future (a caller giving up on
    stragglers) right after the fetch ACKed its payload: the future is running, so, as for
    an executor's running job, cancel() returns False and the result still arrives (before:
    the work was cancelled halfway and the payload the server counted as consumed was lost)."""
    ring = make_ring()
    serve(ring_name)
    ref = ring.put({"x": np.arange(5)})
    acked = _linger_after_the_first_ack(monkeypatch)
    with TransportClient(local_fast_path=False, timeout=10) as c:
        fut = c.submit(ref) if call == "submit" else c.submit_many([ref])
        assert acked.wait(20)
        assert fut.cancel() is False  # running: not cancellable
        got = fut.result(20)
        payload = got if call == "submit" else got[0].payload
        assert payload["x"].tolist() == [0, 1, 2, 3, 4]
        payload.release()
    assert ring.stats()["consumed"] == 1
