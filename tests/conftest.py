import multiprocessing as mp
import os
import uuid

import pytest

os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")

import shm  # noqa: E402


@pytest.fixture
def ring_name():
    name = f"test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    yield name
    shm.RingBuffer.unlink_name(name)


@pytest.fixture
def make_ring(ring_name):
    rings = []

    def make(**kw):
        kw.setdefault("slots", 8)
        kw.setdefault("slot_bytes", 1 << 16)
        r = shm.RingBuffer.create(ring_name, **kw)
        rings.append(r)
        return r

    yield make
    for r in rings:
        r.close()


@pytest.fixture(scope="session")
def spawn():
    return mp.get_context("spawn")
