"""Batch benchmark: one trainer pulls a batch of B payloads of S bytes, timed from
request to last byte, side by side with pyzmq PUSH/PULL and raw ucxx.

    ucxx-transport bench --batch 256x4KiB,256x64KiB,64x1MiB,8x64MiB
    python -m benchmarks.batch --cases 256x4KiB --reps 5 --json out.json

Systems (each a separate process pair, spawned; same loopback, same UCX settings):

* ours fetch_many : the ring holds the B payloads (published before the clock starts);
  a trainer process calls ``TransportClient.fetch_many(refs)`` (local fast path off);
* ours take       : the trainer calls ``take(n=...)`` until it has all B;
* pyzmq           : PUSH/PULL over tcp loopback, ``copy=False`` both ways: the receiver asks
  (one message), the sender pushes the same B x S bytes;
* raw ucxx        : one request, the server sends B tag messages pipelined over one endpoint
  (the receiver posts all B receives at once).

Every figure is the best of ``--reps`` repetitions after one warm-up; ratios are
ours / baseline, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
import uuid

import numpy as np

os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")

DEFAULT_CASES = "256x4KiB,256x64KiB,64x1MiB,8x64MiB"
QUICK_CASES = "256x4KiB"
FRAME_OVERHEAD = 64 + 192 + 64


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
    """Commands: ("fetch_many", [ref dicts]) / ("take", B) -> (seconds, bytes)."""
    import shm
    from clients import TransportClient

    with TransportClient(local_fast_path=False, timeout=30.0) as c:
        c.ping(address)  # connect before the clock runs: the first call's connect is not the batch
        while True:
            cmd = conn.recv()
            if cmd[0] == "stop":
                break
            if cmd[0] == "fetch_many":
                refs = [shm.SlotRef.from_dict(d) for d in cmd[1]]
                t0 = time.perf_counter()
                res = c.fetch_many(refs)
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


def run_ours(cases, reps: int) -> dict:
    import shm

    ctx = mp.get_context("spawn")
    out = {}
    for b, s in cases:
        name = f"bench-batch-{uuid.uuid4().hex[:8]}"
        ring = shm.RingBuffer.create(name, slots=b, slot_bytes=s + FRAME_OVERHEAD + 4096)
        try:
            sp, sc = ctx.Pipe()
            server = ctx.Process(target=_server, args=(name, sc))
            server.start()
            ports = sp.recv()
            tp, tc = ctx.Pipe()
            trainer = ctx.Process(target=_trainer, args=(("127.0.0.1", ports), tc))
            trainer.start()
            payload = {"x": np.full(max(1, s - FRAME_OVERHEAD), 7, np.uint8)}
            for mode in ("fetch_many", "take"):
                times = []
                for rep in range(reps + 1):
                    refs = [ring.put(payload).to_dict() for _ in range(b)]
                    tp.send((mode, refs if mode == "fetch_many" else b))
                    dt, nbytes, errors = tp.recv()
                    if errors:
                        raise RuntimeError(f"{mode} {b}x{s}: {errors}")
                    if rep:
                        times.append(dt)
                out[(b, s, mode)] = min(times)
            tp.send(("stop",))
            trainer.join(30)
            sp.send("stop")
            server.join(30)
        finally:
            ring.close()
            shm.RingBuffer.unlink_name(name)
    return out


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
        msg = pull.recv()
        b, s = map(int, msg.split())
        if b == 0:
            break
        buf = bufs.setdefault(s, np.full(s, 7, np.uint8))
        for i in range(b):
            push.send(buf, copy=False, flags=zmq.SNDMORE if False else 0)
    ctx.destroy(linger=0)


def run_zmq(cases, reps: int) -> dict:
    import zmq

    mpctx = mp.get_context("spawn")
    a, bconn = mpctx.Pipe()
    p = mpctx.Process(target=_zmq_sender, args=(bconn,))
    p.start()
    port, cport = a.recv()
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.connect(f"tcp://127.0.0.1:{port}")
    push = ctx.socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{cport}")
    out = {}
    for b, s in cases:
        times = []
        for rep in range(reps + 1):
            t0 = time.perf_counter()
            push.send(f"{b} {s}".encode())
            frames = [pull.recv(copy=False) for _ in range(b)]
            dt = time.perf_counter() - t0
            assert sum(len(f.buffer) for f in frames) == b * s
            del frames
            if rep:
                times.append(dt)
        out[(b, s)] = min(times)
    push.send(b"0 0")
    p.join(10)
    ctx.destroy(linger=0)
    return out


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
            except Exception:
                return

        lst = ucxx.create_listener(handler, 0)
        conn.send(lst.port)
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)
        lst.close()

    asyncio.run(main())


def _raw_client(port: int, cases, reps: int, conn) -> None:
    import asyncio

    from ucxx_transport import engine

    engine.init()

    async def main():
        engine.attach_loop()
        ep = await engine.connect("127.0.0.1", port, 30)
        out = {}
        for b, s in cases:
            bufs = [np.empty(s, np.uint8) for _ in range(b)]
            times = []
            for rep in range(reps + 1):
                t0 = time.perf_counter()
                await engine.send(ep, np.array([b, s], np.int64).view(np.uint8))
                await asyncio.gather(*(engine.recv(ep, x) for x in bufs))
                dt = time.perf_counter() - t0
                if rep:
                    times.append(dt)
            out[f"{b}x{s}"] = min(times)
        await engine.send(ep, np.zeros(2, np.int64).view(np.uint8))
        return out

    conn.send(asyncio.run(main()))


def run_raw(cases, reps: int) -> dict:
    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()
    srv = ctx.Process(target=_raw_server, args=(b,))
    srv.start()
    port = a.recv()
    c1, c2 = ctx.Pipe()
    cli = ctx.Process(target=_raw_client, args=(port, cases, reps, c2))
    cli.start()
    res = c1.recv()
    cli.join(30)
    a.send("stop")
    srv.join(30)
    return {(bb, s): res[f"{bb}x{s}"] for bb, s in cases}


# ------------------------------------------------------------------ main ----
def run(cases, reps: int = 3, baselines=("zmq", "raw-ucxx")) -> dict:
    from ucxx_transport.units import format_size

    ours = run_ours(cases, reps)
    zmq_t = run_zmq(cases, reps) if "zmq" in baselines else {}
    raw_t = run_raw(cases, reps) if "raw-ucxx" in baselines else {}
    rows = []
    for b, s in cases:
        gb = b * s / 1e9
        row = {"batch": b, "size": s, "case": f"{b} x {format_size(s)}"}
        for mode in ("fetch_many", "take"):
            row[f"{mode}_s"] = ours[(b, s, mode)]
            row[f"{mode}_GBps"] = gb / ours[(b, s, mode)]
        if (b, s) in zmq_t:
            row["zmq_s"], row["zmq_GBps"] = zmq_t[(b, s)], gb / zmq_t[(b, s)]
        if (b, s) in raw_t:
            row["raw_ucxx_s"], row["raw_ucxx_GBps"] = raw_t[(b, s)], gb / raw_t[(b, s)]
        for mode in ("fetch_many", "take"):
            for base in ("zmq", "raw_ucxx"):
                if f"{base}_s" in row:
                    row[f"{mode}_vs_{base}"] = row[f"{base}_s"] / row[f"{mode}_s"]
        rows.append(row)
    return {"rows": rows, "reps": reps, "ucx_env": {k: v for k, v in os.environ.items() if k.startswith("UCX_")}}


def format_table(report: dict) -> str:
    lines = ["batch            fetch_many GB/s (vs zmq, vs raw)   take GB/s (vs zmq, vs raw)   zmq GB/s  raw GB/s"]
    for r in report["rows"]:
        def cell(mode):
            return (f"{r[f'{mode}_GBps']:7.3f} ({r.get(f'{mode}_vs_zmq', float('nan')):5.2f}x, "
                    f"{r.get(f'{mode}_vs_raw_ucxx', float('nan')):5.2f}x)")
        lines.append(f"{r['case']:<16} {cell('fetch_many'):<34} {cell('take'):<28} "
                     f"{r.get('zmq_GBps', float('nan')):8.3f}  {r.get('raw_ucxx_GBps', float('nan')):8.3f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=DEFAULT_CASES, help=f"COUNTxSIZE,... (default {DEFAULT_CASES})")
    ap.add_argument("--quick", action="store_true", help=f"only {QUICK_CASES}")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions per case, best reported (default 3)")
    ap.add_argument("--baselines", default="zmq,raw-ucxx")
    ap.add_argument("--json", help="write the figures to this file")
    a = ap.parse_args(argv)
    report = run(parse_cases(QUICK_CASES if a.quick else a.cases), a.reps, a.baselines.split(","))
    print(format_table(report))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
