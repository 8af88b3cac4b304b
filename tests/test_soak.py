"""Longer fault/soak suites (marker `soak`; .ci/run runs them with a time bound)."""

import random

import numpy as np
import pytest

from clients import TransportClient
from tests import helpers

pytestmark = [pytest.mark.soak, pytest.mark.timeout(600)]


def test_soak_server_killed_repeatedly_nothing_lost(make_ring, ring_name, serve):
    """Publish N payloads; fetch them while the server is SIGKILLed and restarted
    several times: every payload is delivered intact, none twice, no slot leaks."""
    ring = make_ring(slots=64, slot_bytes=1 << 18)
    rnd = random.Random(7)
    payloads = []
    for i in range(60):
        p = {"x": np.random.default_rng(i).integers(0, 255, size=rnd.randint(1000, 200_000), dtype=np.uint8)}
        payloads.append(p)
        ring.put(p, meta={"crc": helpers.checksum(p), "i": i})
    seen = set()
    # one client across server restarts: a batch whose ACK died with the server is
    # re-delivered by the next server and dropped by the client's (ring, slot, generation) dedup
    with TransportClient(local_fast_path=False, timeout=2, max_attempts=1) as c:
        for round_ in range(6):
            srv = serve(ring_name, "--ack-timeout-s", "2")
            try:
                for _ in range(rnd.randint(3, 15)):
                    got = c.take(srv.address, n=2, wait=0.2)
                    for p in got:
                        assert helpers.checksum(p) == p.meta["crc"]
                        assert p.meta["i"] not in seen
                        seen.add(p.meta["i"])
                    if round_ < 5 and rnd.random() < 0.3:
                        break
            finally:
                srv.kill()
        srv = serve(ring_name)
        while True:
            got = c.take(srv.address, n=8, wait=0.2)
            if not got:
                break
            for p in got:
                assert helpers.checksum(p) == p.meta["crc"] and p.meta["i"] not in seen
                seen.add(p.meta["i"])
    assert seen == set(range(60))
    assert helpers.wait_until(lambda: helpers.all_free(ring)), ring.state_counts()  # ACKs are fire-and-forget


def test_soak_writer_kills_many_trials(make_ring, ring_name, spawn):
    ring = make_ring(slots=8, slot_bytes=1 << 20)
    helpers.sigkill_writer_trials(ring, ring_name, spawn, trials=40, seed=99, max_delay=0.03)
