"""A process that forks (multiprocessing's default start method on Linux, a
DataLoader's workers) while it has a ring or a client open: the child can neither
clobber the parent's slots nor keep a dead parent's slots looking owned, and a
client used in the child fails at once with an error that says what to do.

Each scenario forks inside a subprocess (never the pytest process, which runs
UCX threads)."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from shm.state import READING, READY, WRITING
from tests import helpers

pytestmark = pytest.mark.timeout(120)


def run_script(code: str, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=helpers.REPO)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, timeout=90, **kw)


def test_a_forked_child_uses_the_ring_but_never_touches_what_its_parent_holds(make_ring, ring_name):
    """After fork the child's handle is its own: it puts, claims and acks; but a lease, batch,
    writer or view inherited from the parent cannot finalise or write the parent's slots (before:
    the child shared the parent's lock ownership, so it could nack or free them under the parent)."""
    ring = make_ring(slots=8, slot_bytes=1 << 14)
    refs = helpers.put_many(ring, 3)
    r = run_script(f"""
        import gc, json, os
        import numpy as np
        import shm
        ring = shm.RingBuffer.attach({ring_name!r})
        refs = [shm.SlotRef.from_dict(d) for d in json.loads({json.dumps([x.to_dict() for x in refs])!r})]
        lease = ring.claim(refs[0])                       # held by the parent: READING
        batch, _ = ring.claim_batch([refs[1].slot], [refs[1].generation])
        views = batch.payloads()                          # decoded: the parent's views are alive
        writer = ring.reserve()                           # a slot the parent is writing
        writer.set("x", np.zeros(8))
        viewed = ring.claim(refs[2])                      # held, with a view alive
        view = viewed.payload["x"]
        other = shm.RingBuffer.attach({ring_name!r})      # a second handle of the same ring
        pid = os.fork()
        if pid == 0:
            said = []
            for op in (lambda: lease.nack(), lambda: lease.ack(), lambda: batch.finalise(False),
                       lambda: writer.set("x", np.ones(8)), lambda: writer.publish(), lambda: viewed.nack(),
                       lambda: ring._table.ack(lease.slot, lease._lease)):  # the state machine checks the owner too
                try:
                    op()
                    said.append("touched the parent's slot")
                except shm.ForkedHandleError:
                    said.append("refused")
                except Exception as exc:
                    said.append(repr(exc))
            said.append(ring.recover())                    # the parent lives: nothing of it is reclaimed
            said.append([int(views[0]["x"][0]), int(view[0])])  # inherited views still read the slots
            t, u = ring._table, other._table               # the child's two handles still exclude each other
            said.append([t._try_lock(7), u._try_lock(7)])
            t._unlock(7)
            del lease, batch, views, writer, viewed, view  # the child drops its copies: nothing happens
            gc.collect()
            mine = ring.put({{"y": np.arange(3)}})          # the handle works for what is the child's own
            with ring.claim(mine) as got:
                said.append(got.payload["y"].tolist())
            print(json.dumps(said), flush=True)
            os._exit(0)
        os.waitpid(pid, 0)
        print(json.dumps([int(s) for s in ring._table.state[[refs[0].slot, refs[1].slot, writer.slot,
                                                              refs[2].slot]]]), flush=True)
        lease.ack()
        assert batch.finalise(True)
        viewed.ack()
        writer.publish()
    """)
    assert r.returncode == 0, r.stderr[-3000:]
    said, parent_saw = (json.loads(line) for line in r.stdout.splitlines()[-2:])
    assert said == ["refused"] * 7 + [0, [1, 2], [True, False], [0, 1, 2]]
    assert parent_saw == [READING, READING, WRITING, READING]  # the parent's slots were untouched by the child
    counts = ring.state_counts()
    assert counts["READY"] == 1 and counts["READING"] == counts["WRITING"] == 0  # the parent's put
    assert ring.claim(timeout=0).payload["x"].tolist() == [0.0] * 8  # as the parent wrote it, not the child's ones


def test_a_forked_child_does_not_keep_a_killed_parents_slots_owned(make_ring, ring_name):
    """Before: the child inherited the parent's open file description, which carries the
    parent's ownership locks, so a SIGKILLed parent's READING slot was never recovered
    while the child lived."""
    ring = make_ring(slots=8, slot_bytes=1 << 14)
    ref = ring.put({"x": np.arange(10)})
    env = dict(os.environ, PYTHONPATH=helpers.REPO)
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import os, sys, time
        import shm
        ring = shm.RingBuffer.attach({ring_name!r})
        lease = ring.claim(shm.SlotRef.from_dict({ref.to_dict()!r}))
        pid = os.fork()
        if pid == 0:                # (fork() returns here only after the child's at-fork hooks ran)
            print(os.getpid(), flush=True)
            sys.stdin.readline()    # lives on until the test closes stdin
            os._exit(0)
        time.sleep(600)
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    child = int(parent.stdout.readline())
    try:
        assert ring._table.state[ref.slot] == READING
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        os.kill(child, 0)  # the child is still alive
        ring.recover()
        assert ring._table.state[ref.slot] == READY
    finally:
        parent.kill()
        parent.stdin.close()
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_client_used_in_a_forked_child_fails_at_once_and_says_why(make_ring, ring_name, serve):
    ring = make_ring(slots=16, slot_bytes=1 << 14)
    serve(ring_name)  # the refs carry its address
    refs = helpers.put_many(ring, 4)
    r = run_script(f"""
        import json, os, time
        import shm
        from clients import ForkedClientError, TransportClient
        refs = [shm.SlotRef.from_dict(d) for d in json.loads({json.dumps([x.to_dict() for x in refs])!r})]
        net = TransportClient(local_fast_path=False, timeout=5)
        here = TransportClient()
        net.fetch(refs[0]).release()                  # its UCX loop runs
        here.fetch(refs[1]).release()                 # its same-host handle is open
        pid = os.fork()
        if pid == 0:
            said = []
            for c, ref in ((net, refs[2]), (here, refs[3]), (here, refs[2])):
                t0 = time.monotonic()
                try:
                    c.fetch_many([ref]) if c is here and ref is refs[2] else c.fetch(ref)
                    said.append("fetched")
                except ForkedClientError as exc:
                    said.append(["refused", round(time.monotonic() - t0, 2), "Create a TransportClient in the child" in str(exc)])
            print(json.dumps(said), flush=True)
            os._exit(0)
        os.waitpid(pid, 0)
        print(json.dumps([net.fetch(refs[2]).meta["i"], here.fetch(refs[3]).meta["i"]]), flush=True)
        net.close(); here.close()
    """)
    assert r.returncode == 0, r.stderr[-3000:]
    said, parent_got = (json.loads(line) for line in r.stdout.splitlines()[-2:])
    assert [s[0] for s in said] == ["refused"] * 3, said
    assert all(s[1] < 1.0 and s[2] for s in said), said  # at once (before: a 14 s timeout), with the fix named
    assert parent_got == [2, 3]  # the parent's clients work on, and nothing was consumed by the child
