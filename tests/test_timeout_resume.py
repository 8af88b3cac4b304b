"""Regression: a call that timed out against a SIGSTOPped server must not crash the
client once the server resumes (it used to die of SIGSEGV within a second).

Cause: the connect handshake (ucxx's ``create_endpoint`` / ``exchange_peer_info``)
received the server's peer info into a local buffer; on timeout the receive stayed
posted on an endpoint nobody closed, and the resumed server's answer was written
into freed memory. The client runs in its own process so a crash is an exit code.
"""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest


pytestmark = pytest.mark.timeout(240)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CLIENT = r"""
import faulthandler, os, random, signal, sys, time
faulthandler.enable()
import shm
from clients import TransportClient, TransportError

host, ports, srv_pid, ring, slot0 = sys.argv[1], [int(p) for p in sys.argv[2].split(",")], int(sys.argv[3]), \
    sys.argv[4], int(sys.argv[5])
opts = dict(local_fast_path=False, timeout=0.3, max_attempts=1, quarantine_s=0.05)
rnd = random.Random(0)


def timed_out(c, op):
    os.kill(srv_pid, signal.SIGSTOP)
    try:
        try:
            op(c)
        except TransportError:
            return True
        return False
    finally:
        os.kill(srv_pid, signal.SIGCONT)


def take(c):
    for p in c.take((host, ports), n=4, wait=0.2):
        p.release()


def fetch(c, i):
    ref = shm.SlotRef(ring, slot0 + i, 1, 0, host, tuple(ports))
    c.fetch(ref).release()


reps = 0
# A: one long-lived client; TAKE / GET time out (connect and pooled endpoints), server resumes, client lives on
with TransportClient(**opts) as c:
    for i in range(14):
        if i % 4 == 3:  # pool an endpoint first so the timeout also hits an established one
            take(c)
        assert timed_out(c, take if i % 2 == 0 else (lambda c: fetch(c, i))), "call did not time out"
        reps += 1
        time.sleep(0.4)  # the resumed server answers the abandoned handshake / request now
    time.sleep(0.5)
    take(c)  # still usable
# B: close() right after the timeout, while the resumed server answers
for i in range(7):
    c = TransportClient(**opts)
    take(c)
    assert timed_out(c, take), "call did not time out"
    reps += 1
    time.sleep(rnd.uniform(0.0, 0.3))
    c.close()
print("REPS", reps, flush=True)
"""


def test_timeout_against_sigstopped_server_then_resume_never_crashes(make_ring, ring_name, serve):
    ring = make_ring(slots=64)
    refs = [ring.put({"x": np.full(1000, i % 251, np.uint8)}) for i in range(60)]
    srv = serve(ring_name, "--n-ports", "4")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]),
               PYTHONFAULTHANDLER="1")
    env.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    try:
        cp = subprocess.run([sys.executable, "-c", CLIENT, srv.host, ",".join(map(str, srv.ports)), str(srv.proc.pid),
                             ring_name, str(refs[40].slot)],
                            capture_output=True, text=True, env=env, timeout=200)
    finally:
        os.kill(srv.proc.pid, signal.SIGCONT)
    assert cp.returncode == 0, f"client exited with {cp.returncode} (-11 = SIGSEGV)\n{cp.stdout[-2000:]}\n" \
                               f"{cp.stderr[-6000:]}"
    assert "REPS 21" in cp.stdout
    assert srv.proc.poll() is None  # the server survived too
