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


def test_take_interrupted_while_it_waits_hands_its_payload_to_the_next_take(make_ring, ring_name, serve):
    """Ctrl-C during a long-poll take: the take still finishes on the client's UCX loop; the
    payload it consumes must reach the next take (before: consumed, ACKed and dropped)."""
    ring = make_ring()
    srv = serve(ring_name)
    t = Trainer(f"""
        import json, sys
        from clients import TransportClient
        c = TransportClient(local_fast_path=False, timeout=10)
        c.connect({tuple(srv.address)!r})
        print("ready", flush=True)
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
    t.expect("ready")
    t.interrupt()
    t.expect("interrupted")
    ring.put({"x": np.arange(100, dtype=np.int32)}, meta={"i": 7})
    # the interrupted take, still waiting on the client's loop, consumes it
    assert helpers.wait_until(lambda: ring.state_counts()["READY"] + ring.state_counts()["READING"] == 0, 30)
    t.say("go")
    assert json.loads(t.expect("got")) == [{"i": 7}]
    assert json.loads(t.expect("stats")) == 0
    t.finish()
    assert ring.state_counts()["READY"] == 0  # consumed once, by the trainer


def test_same_host_batch_interrupted_in_its_retry_round_keeps_what_it_consumed(make_ring, ring_name, spawn):
    """A same-host fetch_many delivers what it claimed, then retries a busy slot: Ctrl-C there
    must not drop the payloads already consumed; the next fetch_many of the refs returns them."""
    ring = make_ring(slots=16)
    refs = helpers.put_many(ring, 10)
    held = spawn.Event()
    holder = spawn.Process(target=helpers.hold_lease, args=(ring_name, refs[3].to_dict(), held), daemon=True)
    holder.start()
    try:
        assert held.wait(30)
        t = Trainer("""
            import json, sys
            import shm
            from clients import TransportClient
            from tests import helpers
            refs = [shm.SlotRef.from_dict(d) for d in json.loads(sys.stdin.readline())]
            c = TransportClient(max_attempts=20, max_rounds=8, timeout=5)
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
        # the first round has consumed every ref but the held one: the retry round is on
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


def test_same_host_batch_interrupted_between_claim_and_ack_gives_its_slots_back(make_ring, monkeypatch):
    """An interrupt after a same-host batch was claimed and before it was acked: the slots go back
    to READY (before: left READING by a live process, which nobody reclaims)."""
    ring = make_ring(slots=16)
    refs = helpers.put_many(ring, 6)

    def interrupted(self):
        raise KeyboardInterrupt

    with TransportClient() as c:
        with monkeypatch.context() as m:
            m.setattr(shm.LeaseBatch, "payloads", interrupted)
            with pytest.raises(KeyboardInterrupt):
                c.fetch_many(refs)
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
