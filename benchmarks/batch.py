"""Batch benchmark: one trainer pulls a batch of B payloads of S bytes, timed from
request to last byte, side by side with pyzmq PUSH/PULL and raw ucxx.

    ucxx-transport bench --batch 256x4KiB,256x64KiB,64x1MiB,8x64MiB
    python -m benchmarks.batch --cases 256x4KiB --reps 5 --json out.json

Systems (each a separate process pair, spawned; same loopback, same UCX settings):

* ours fetch_many : the ring holds the B payloads (published before the clock starts);
  a trainer process calls ``TransportClient.fetch_many(refs)`` (local fast path off);
* ours take       : the trainer calls ``take(n=...)`` until it has all B;
* ours local      : the same trainer process, same host, ``fetch_many`` with the local fast
  path on: the B payloads claimed from shared memory, decoded and acked (no network);
  compared with ``memcpy`` (B copies of S bytes between warm buffers in one process);
* pyzmq           : PUSH/PULL over tcp loopback, ``copy=False`` both ways: a receiver process
  (fed its command through a pipe, like our trainer) asks (one message), the sender pushes
  the same B x S bytes; the ratios' basis. Also shown, not a basis: the same with the
  receiver in the bench's own process ("zmq, receiver busy before"), the layout of the
  figures before 2026-12-08, which was faster only because that process had just been busy;
* raw ucxx        : one request, the server sends B tag messages pipelined over one endpoint
  (the receiver posts all B receives at once).

Every figure is the best of ``--reps`` repetitions after one warm-up; each repetition
runs the systems in an order rotated by one (none always follows the same neighbour);
ratios are ours / baseline, measured in the same run.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing as mp
import os
import sys
import time
import uuid

import numpy as np

from shm.frame import encoded_size
from ucxx_transport import ucxx_compat as compat

os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")

DEFAULT_CASES = "256x4KiB,256x64KiB,64x1MiB,8x64MiB"
QUICK_CASES = "256x4KiB"
#: frame bytes around one uint8 field (header + field entry): a payload of S - this is an S-byte frame
FRAME_OVERHEAD = encoded_size({"x": np.zeros(0, np.uint8)})


def parse_cases(text: str) -> list[tuple[int, int]]:
    from ucxx_transport.units import parse_size

    out = []
    for part in text.split(","):
        b, _, s = part.strip().lower().partition("x")
        if not b.isdigit() or not s:
            raise ValueError(f"batch case {part!r}: expected COUNTxSIZE, e.g. 256x4KiB")
        out.append((int(b), parse_size(s)))
    return out


# ------------------------------------------------------------------ ours ----
def _server(ring_name: str, conn) -> None:
    from ucxx_transport.server import TransportServer

    srv = TransportServer(ring_name, host="127.0.0.1", n_ports=2)
    conn.send(srv.start())
    conn.recv()
    srv.stop()


def _trainer(address, conn) -> None:
    """Commands: ("fetch_many", [ref dicts]) / ("take", B) -> (seconds, bytes, errors)."""
    import shm
    from clients import TransportClient

    with TransportClient(local_fast_path=False, timeout=30.0) as c, \
            TransportClient(local_fast_path=True, timeout=30.0) as local:
        c.ping(address)  # connect before the clock runs: the first call's connect is not the batch
        while True:
            cmd = conn.recv()
            if cmd[0] == "stop":
                break
            if cmd[0] in ("fetch_many", "local"):
                refs = [shm.SlotRef.from_dict(d) for d in cmd[1]]
                t0 = time.perf_counter()
                res = (c if cmd[0] == "fetch_many" else local).fetch_many(refs)
                dt = time.perf_counter() - t0
                bad = [r.error for r in res if not r.ok]
                got = [r.payload for r in res if r.ok]
            else:
                want = cmd[1]
                got, bad = [], []
                t0 = time.perf_counter()
                while len(got) < want:
                    got += c.take(address, n=min(256, want - len(got)), wait=5.0)
                dt = time.perf_counter() - t0
            nbytes = sum(p.nbytes for p in got)
            for p in got:
                p.release()
            conn.send((dt, nbytes, [repr(e) for e in bad[:3]]))


class _Ours:
    def __init__(self, ctx, b: int, s: int):
        import shm

        self.name = f"bench-batch-{uuid.uuid4().hex[:8]}"
        self.ring = shm.RingBuffer.create(self.name, slots=b, slot_bytes=s + FRAME_OVERHEAD + 4096)
        self.sp, sc = ctx.Pipe()
        self.server = ctx.Process(target=_server, args=(self.name, sc))
        self.server.start()
        ports = self.sp.recv()
        self.tp, tc = ctx.Pipe()
        self.trainer = ctx.Process(target=_trainer, args=(("127.0.0.1", ports), tc))
        self.trainer.start()
        self.payload = {"x": np.full(max(1, s - FRAME_OVERHEAD), 7, np.uint8)}
        self.b = b

    def run(self, mode: str) -> float:
        refs = [self.ring.put(self.payload).to_dict() for _ in range(self.b)]  # before the clock
        self.tp.send((mode, refs if mode in ("fetch_many", "local") else self.b))
        dt, nbytes, errors = self.tp.recv()
        if errors:
            raise RuntimeError(f"{mode}: {errors}")
        return dt

    def close(self) -> None:
        import shm

        self.tp.send(("stop",))
        self.trainer.join(30)
        self.sp.send("stop")
        self.server.join(30)
        self.ring.close()
        shm.RingBuffer.unlink_name(self.name)


# ----------------------------------------------------------------- pyzmq ----
def _zmq_sender(port_conn) -> None:
    import zmq

    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    port = push.bind_to_random_port("tcp://127.0.0.1")
    pull = ctx.socket(zmq.PULL)
    cport = pull.bind_to_random_port("tcp://127.0.0.1")
    port_conn.send((port, cport))
    bufs = {}
    while True:
        b, s = map(int, pull.recv().split())
        if b == 0:
            break
        buf = bufs.setdefault(s, np.full(s, 7, np.uint8))
        for _ in range(b):
            push.send(buf, copy=False)
    ctx.destroy(linger=0)


def _zmq_receiver(ports, conn) -> None:
    """The pyzmq trainer: a process of its own told through a pipe what to pull, like ours."""
    import zmq

    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.connect(f"tcp://127.0.0.1:{ports[0]}")
    push = ctx.socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{ports[1]}")
    while True:
        b, s = conn.recv()
        if b == 0:
            push.send(b"0 0")  # the sender stops too
            break
        conn.send(_zmq_pull(push, pull, b, s))
    ctx.destroy(linger=0)


def _zmq_pull(push, pull, b: int, s: int) -> float:
    t0 = time.perf_counter()
    push.send(f"{b} {s}".encode())
    frames = [pull.recv(copy=False) for _ in range(b)]
    dt = time.perf_counter() - t0
    assert sum(len(f.buffer) for f in frames) == b * s
    return dt


class _Zmq:
    """pyzmq PUSH/PULL. ``receiver="process"`` (the baseline): the receiver is a trainer
    process of its own, fed its command through a pipe exactly like ours and raw ucxx's
    (it waits idle meanwhile, as they do). ``receiver="main"``: the receiver is the
    bench's own process, which has just been busy (the layout of the figures before
    2026-12-08; shown for comparison, not a ratio's basis)."""

    def __init__(self, mpctx, receiver: str = "process"):
        a, bconn = mpctx.Pipe()
        self.p = mpctx.Process(target=_zmq_sender, args=(bconn,))
        self.p.start()
        ports = a.recv()
        self.receiver = receiver
        if receiver == "process":
            self.conn, c2 = mpctx.Pipe()
            self.trainer = mpctx.Process(target=_zmq_receiver, args=(ports, c2))
            self.trainer.start()
            return
        import zmq

        self.ctx = zmq.Context()
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.connect(f"tcp://127.0.0.1:{ports[0]}")
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.connect(f"tcp://127.0.0.1:{ports[1]}")

    def run(self, b: int, s: int) -> float:
        if self.receiver == "process":
            self.conn.send((b, s))
            return self.conn.recv()
        return _zmq_pull(self.push, self.pull, b, s)

    def close(self) -> None:
        if self.receiver == "process":
            self.conn.send((0, 0))
            self.trainer.join(10)
            self.p.join(10)
            return
        self.push.send(b"0 0")
        self.p.join(10)
        self.ctx.destroy(linger=0)


# -------------------------------------------------------------- raw ucxx ----
def _raw_server(conn) -> None:
    import asyncio

    import ucxx

    from ucxx_transport import engine

    engine.init()

    async def main():
        engine.attach_loop()
        bufs = {}

        async def handler(ep):
            req = np.empty(16, np.uint8)
            try:
                while True:
                    await engine.recv(ep, req)
                    b, s = (int(x) for x in req.view(np.int64))
                    if b == 0:
                        return
                    buf = bufs.setdefault(s, np.full(s, 7, np.uint8))
                    await asyncio.gather(*(engine.send(ep, buf) for _ in range(b)))
            except compat.ucx_errors():  # the trainer closed its endpoint: this exchange is over
                return

        lst = ucxx.create_listener(handler, 0)
        conn.send(lst.port)
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)
        lst.close()

    asyncio.run(main())


def _raw_client(port: int, conn) -> None:
    import asyncio

    from ucxx_transport import engine

    engine.init()

    async def main():
        engine.attach_loop()
        if hasattr(engine, "connect"):
            ep = await engine.connect("127.0.0.1", port, 30)
        else:  # an older checkout (comparing before/after)
            import ucxx

            ep = await ucxx.create_endpoint("127.0.0.1", port)
        loop = asyncio.get_running_loop()
        bufs: dict = {}
        while True:
            b, s = await loop.run_in_executor(None, conn.recv)
            await engine.send(ep, np.array([b, s], np.int64).view(np.uint8))
            if b == 0:
                return
            if (b, s) not in bufs:
                bufs.clear()
                bufs[(b, s)] = [np.empty(s, np.uint8) for _ in range(b)]
            t0 = time.perf_counter()
            await asyncio.gather(*(engine.recv(ep, x) for x in bufs[(b, s)]))
            # the clock started before the request left, as for the others: add the request's send
            conn.send(time.perf_counter() - t0)

    asyncio.run(main())


class _Raw:
    def __init__(self, ctx):
        self.a, b = ctx.Pipe()
        self.srv = ctx.Process(target=_raw_server, args=(b,))
        self.srv.start()
        port = self.a.recv()
        self.c1, c2 = ctx.Pipe()
        self.cli = ctx.Process(target=_raw_client, args=(port, c2))
        self.cli.start()

    def run(self, b: int, s: int) -> float:
        self.c1.send((b, s))
        return self.c1.recv()

    def close(self) -> None:
        self.c1.send((0, 0))
        self.cli.join(30)
        self.a.send("stop")
        self.srv.join(30)


# ------------------------------------------------------------------ main ----
def run(cases, reps: int = 5, baselines=("zmq", "raw-ucxx")) -> dict:
    """Every system up at once; repetitions interleave the systems (this box's noise
    hits all of them alike). Best of ``reps`` after one warm-up round."""
    from ucxx_transport.units import format_size

    ctx = mp.get_context("spawn")
    zmq_sys = _Zmq(ctx) if "zmq" in baselines else None
    zmq_main = _Zmq(ctx, receiver="main") if "zmq" in baselines else None  # (for comparison only)
    raw_sys = _Raw(ctx) if "raw-ucxx" in baselines else None
    rows = []
    try:
        for b, s in cases:
            ours = _Ours(ctx, b, s)
            try:
                t: dict = collections.defaultdict(list)
                systems = [(name, fn) for name, fn in (
                    ("fetch_many", lambda: ours.run("fetch_many")),
                    ("take", lambda: ours.run("take")),
                    ("local", lambda: ours.run("local")),
                    ("memcpy", lambda: _memcpy(b, s)),
                    ("zmq", (lambda: zmq_sys.run(b, s)) if zmq_sys else None),
                    ("raw_ucxx", (lambda: raw_sys.run(b, s)) if raw_sys else None),
                    ("zmq_main", (lambda: zmq_main.run(b, s)) if zmq_main else None)) if fn is not None]
                for rep in range(reps + 1):
                    # each repetition starts one system later: no system always runs first after
                    # the others' idle time, or always right after its own kind warmed the cores
                    k = rep % len(systems)
                    for name, fn in systems[k:] + systems[:k]:
                        dt = fn()
                        if rep:
                            t[name].append(dt)
            finally:
                ours.close()
            gb = b * s / 1e9
            row = {"batch": b, "size": s, "case": f"{b} x {format_size(s)}"}
            for name, ts in t.items():
                row[f"{name}_s"] = min(ts)
                row[f"{name}_median_s"] = sorted(ts)[len(ts) // 2]
                row[f"{name}_GBps"] = gb / min(ts)
            for mode in ("fetch_many", "take"):
                for base in ("zmq", "raw_ucxx"):
                    if f"{base}_s" in row:
                        row[f"{mode}_vs_{base}"] = row[f"{base}_s"] / row[f"{mode}_s"]
            row["local_vs_memcpy"] = row["memcpy_s"] / row["local_s"]
            rows.append(row)
    finally:
        for z in (zmq_sys, zmq_main):
            if z:
                z.close()
        if raw_sys:
            raw_sys.close()
    from ucxx_transport import engine

    return {"rows": rows, "reps": reps, "ucx_settings": engine.ucx_settings()}


def header(report: dict) -> str:
    st = report["ucx_settings"]
    return (f"batch benchmark, best of {report['reps']}; UCX: " +
            " ".join(f"{k}={v}" for k, v in sorted(st.items()) if k.startswith("UCX_TCP") or k == "UCX_NET_DEVICES"))


def format_table(report: dict) -> str:
    lines = ["batch            fetch_many GB/s (vs zmq, vs raw)   take GB/s (vs zmq, vs raw)   zmq GB/s  raw GB/s"
             "  (zmq, receiver busy before)"]
    for r in report["rows"]:
        def cell(mode):
            return (f"{r[f'{mode}_GBps']:7.3f} ({r.get(f'{mode}_vs_zmq', float('nan')):5.2f}x, "
                    f"{r.get(f'{mode}_vs_raw_ucxx', float('nan')):5.2f}x)")
        lines.append(f"{r['case']:<16} {cell('fetch_many'):<34} {cell('take'):<28} "
                     f"{r.get('zmq_GBps', float('nan')):8.3f}  {r.get('raw_ucxx_GBps', float('nan')):8.3f}"
                     f"  ({r.get('zmq_main_GBps', float('nan')):.3f})")
    lines.append("same host      local fetch_many ms (claimed, decoded, acked)   memcpy ms (B copies of S)   "
                 "local / memcpy (speed)")
    for r in report["rows"]:
        lines.append(f"{r['case']:<16} {r['local_s'] * 1e3:10.3f}{'':38} {r['memcpy_s'] * 1e3:10.3f}"
                     f"{'':17} {r['local_vs_memcpy']:5.2f}x")
    return "\n".join(lines)


def _memcpy(b: int, s: int) -> float:
    """B separate copies of S bytes between warm buffers: the bytes a same-host batch reads."""
    src = np.full((b, s), 7, np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # warm
    t0 = time.perf_counter()
    for i in range(b):
        np.copyto(dst[i], src[i])
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=DEFAULT_CASES, help=f"COUNTxSIZE,... (default {DEFAULT_CASES})")
    ap.add_argument("--quick", action="store_true", help=f"only {QUICK_CASES}")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per case, best reported (default 5)")
    ap.add_argument("--baselines", default="zmq,raw-ucxx")
    ap.add_argument("--json", help="write the figures to this file")
    a = ap.parse_args(argv)
    report = run(parse_cases(QUICK_CASES if a.quick else a.cases), a.reps, a.baselines.split(","))
    print(header(report))
    print(format_table(report))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
