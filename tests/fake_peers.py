"""Fake peers: processes that speak UCX but misbehave, so the production code needs no fault hooks.

``python -m tests.fake_peers silent``: a UCX listener (set up exactly as the server sets up
its own: the same engine, progress mode and endpoint error handling) that accepts every
endpoint and never answers. It prints ``{"port": N}`` when listening and runs until killed.
A client pointed at it sees what a wedged server port looks like: a connection that
works and a request that is never answered.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys

from ucxx_transport import engine


async def _silent() -> None:
    ucxx = engine.import_ucxx()
    held = []  # endpoints are kept open: the peer is alive, only mute

    async def accept(ep):
        held.append(ep)

    listener = ucxx.create_listener(accept, 0)
    print(json.dumps({"port": listener.port}), flush=True)
    await asyncio.Event().wait()


class SilentPeer:
    """The silent listener in a subprocess; ``port`` is where it listens."""

    def __init__(self):
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.fake_peers", "silent"], cwd=repo,
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"silent peer did not start (exit {self.proc.wait(10)})")
        self.port = json.loads(line)["port"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


def main(argv: list[str]) -> None:
    if argv != ["silent"]:
        sys.exit("usage: python -m tests.fake_peers silent")
    loop = engine.acquire()
    asyncio.run_coroutine_threadsafe(_silent(), loop).result()


if __name__ == "__main__":
    main(sys.argv[1:])
