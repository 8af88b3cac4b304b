"""A raw ucxx endpoint driven synchronously from the test thread (protocol module only)."""

from __future__ import annotations

import numpy as np

from ucxx_transport import engine
from ucxx_transport.protocol import RESPONSE, Request, decode_response, encode_request


class RawConn:
    def __init__(self, host: str, port: int, timeout: float = 10.0):

        self.timeout = timeout
        engine.acquire()
        self._released = False
        self.ep = engine.run(engine.connect(host, port, timeout), timeout + 5)

    def send(self, data) -> None:
        if isinstance(data, Request):
            data = encode_request(data)
        engine.run(engine.send(self.ep, np.frombuffer(bytes(data), np.uint8)), self.timeout)

    def recv_response(self, timeout: float | None = None):
        buf = np.empty(RESPONSE.size, np.uint8)
        engine.run(engine.recv(self.ep, buf), timeout or self.timeout)
        return decode_response(buf)

    def recv_bytes(self, n: int, timeout: float | None = None) -> np.ndarray:
        buf = np.empty(n, np.uint8)
        engine.run(engine.recv(self.ep, buf), timeout or self.timeout)
        return buf

    def request(self, req: Request):
        self.send(req)
        return self.recv_response()

    def close(self):
        if self._released:
            return
        self._released = True
        async def _abort(ep):
            engine.abort(ep)

        try:
            engine.run(_abort(self.ep), 5)
        except Exception:
            pass
        engine.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
