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


# ------------------------------------------------------------ servers -------
import json  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402


class ServerProc:
    """`ucxx-transport serve` in a subprocess; parses its JSON ready line."""

    def __init__(self, ring_name, *args, env=None):
        self.args = [sys.executable, "-m", "ucxx_transport", "serve", "--ring", ring_name, "--host", "127.0.0.1",
                     *args]
        e = dict(os.environ)
        e.update(env or {})
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=e, text=True)
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read()
            raise RuntimeError(f"server did not start: {err[-3000:]}")
        self.info = json.loads(line)
        self.ports = self.info["ports"]
        self.host = self.info["host"]
        self.address = (self.host, self.ports)

    def stop(self, sig=signal.SIGTERM, timeout=15):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def kill(self):
        self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def serve():
    procs = []

    def start(ring_name, *args, env=None):
        p = ServerProc(ring_name, *args, env=env)
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.stop()
