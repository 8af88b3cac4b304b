"""`ucxx-transport bench`: our transport vs raw ucxx, pyzmq and memcpy, side by side.

Process layout (spawned, never forked), kept alive across sizes:

* ours    : 1 server process (TransportServer), ``--producers`` processes that
            keep the ring full, ``--clients`` processes fetching (GET by ref,
            TAKE, or the same-host local path);
* raw-ucxx: 1 server process answering a 64-byte request with the payload
            bytes (same progress mode): the ceiling of our network path;
* zmq     : REQ/REP over tcp loopback, zero-copy send (skipped if pyzmq is absent);
* memcpy  : ``np.copyto`` of the same bytes: the ceiling of the local path.

Every system runs the same sizes with the same number of client processes;
each row reports payloads/s (end to end: for GET, the wait for the producers' refs
included), GB/s, latency p50/p99/p99.9 (of the transfer: a GET's wait for a ref is left
out) and CPU%/RSS per role (the median of --reps repetitions, with min-max), and every "ours" row its
ratio to each baseline on a line that names both systems, the size, the metric
and the process layout.

Why one module past 400 lines: one benchmark run with its process roles,
baselines, tables and plot; splitting it would scatter one measurement's
definition over several files.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import platform
import queue
import sys
import time
import itertools
import uuid

import numpy as np

from shm.frame import encoded_size

from ucxx_transport import ucxx_compat as compat
from ucxx_transport.config import help_text, resolve
from ucxx_transport.units import format_size, parse_duration, parse_size

log = logging.getLogger("benchmarks.end_to_end")

QUICK_SIZES = "4KiB,1MiB"
DEFAULT_SIZES = "4KiB,64KiB,1MiB,16MiB,64MiB"
LAT_SAMPLES = 50_000
#: timed repetitions of each (system, size) phase, and of each case in batch mode (--reps)
DEFAULT_REPS = 1
BATCH_REPS = 3
#: frame bytes around one uint8 field (header + field entry): a payload of S - this is an S-byte frame
FRAME_OVERHEAD = encoded_size({"x": np.zeros(0, np.uint8)})
#: phase numbers: the refs a producer queues carry the phase that published them
_EPOCHS = itertools.count(1)


# ============================================================ workers =======
def _proc_stats() -> dict:
    import psutil

    p = psutil.Process()
    t = p.cpu_times()
    return {"cpu_s": t.user + t.system, "rss": p.memory_info().rss}


def _payload_for(size: int) -> dict:
    return {"x": np.full(max(1, size - FRAME_OVERHEAD), 7, dtype=np.uint8)}


def _server_worker(ring_name: str, n_ports: int, progress_mode: str, conn) -> None:
    logging.basicConfig(level=logging.WARNING)
    from ucxx_transport.server import TransportServer

    srv = TransportServer(ring_name, host="127.0.0.1", n_ports=n_ports, progress_mode=progress_mode)
    conn.send(srv.start())
    while True:
        cmd = conn.recv()
        if cmd[0] == "lag":
            lag = list(srv.metrics.loop_lag._buf)[-cmd[1]:]
            conn.send(float(np.percentile(lag, 99)) if lag else None)
        elif cmd[0] == "stats":
            conn.send(_proc_stats())
        else:
            break
    srv.stop()
    conn.send("bye")


def _producer_worker(ring_name: str, conn, refq) -> None:
    import shm

    ring = shm.RingBuffer.attach(ring_name)
    while True:
        cmd = conn.recv()
        if cmd[0] != "fill":
            break
        payload = _payload_for(cmd[1])
        with_refs, epoch = cmd[2], cmd[3]
        n = 0
        t_put = 0.0
        arr = payload["x"]
        batch: list = []  # refs travel in small batches: the control plane is not what we measure

        def flush():
            while batch and not conn.poll():
                try:
                    refq.put((epoch, list(batch)), timeout=0.05)
                    batch.clear()
                except queue.Full:  # the clients are behind: try again unless the phase ended
                    continue

        while not conn.poll():
            try:
                w = ring.reserve(timeout=0.002 if batch else 0.05)  # waiting is not put cost
            except shm.RingFullError:
                flush()
                continue
            t0 = time.perf_counter()
            w.set("x", arr)
            ref = w.publish()
            t_put += time.perf_counter() - t0
            n += 1
            if with_refs:
                batch.append(ref)
                if len(batch) >= 4:
                    flush()
        conn.recv()  # the "stop" that ended the phase
        conn.send({"puts": n, "put_s": t_put, **_proc_stats()})
    ring.close()


def _client_worker(kind: str, conn, args: dict, refq) -> None:
    """Runs phases: ("run", size, duration, warmup, epoch) -> stats."""
    logging.basicConfig(level=logging.WARNING)
    device = args.get("device", "cpu")
    state: dict = {}
    if kind.startswith("ours"):
        from clients import TransportClient

        client = TransportClient(local_fast_path=(kind == "ours-local"), device=device,
                                 progress_mode=args["progress_mode"], timeout=30)
        state["client"] = client
    elif kind == "raw-ucxx":
        from ucxx_transport import engine

        engine.acquire(args["progress_mode"])

        state["ep"] = engine.run(engine.connect("127.0.0.1", args["port"], 30), 35)
    elif kind == "zmq":
        import zmq

        ctx = zmq.Context()
        s = ctx.socket(zmq.REQ)
        s.connect(f"tcp://127.0.0.1:{args['port']}")
        state["sock"] = s
    conn.send("ready")
    while True:
        cmd = conn.recv()
        if cmd[0] != "run":
            break
        _, size, duration, warmup, epoch = cmd
        op = _make_op(kind, size, state, args, refq, epoch)
        end_warm = time.perf_counter() + warmup
        while time.perf_counter() < end_warm:
            op()
        s0 = _proc_stats()
        lat = np.empty(LAT_SAMPLES, dtype=np.float64)
        n = 0
        nbytes = 0
        t_start = time.perf_counter()
        t_end = t_start + duration
        now = t_start
        while now < t_end:
            b = op()
            t1 = time.perf_counter()
            if n < LAT_SAMPLES:  # the transfer's latency: without the wait for a ref from the producers
                lat[n] = t1 - now - state.get("ref_wait_s", 0.0)
            state["ref_wait_s"] = 0.0
            n += 1
            nbytes += b
            now = t1
        elapsed = now - t_start
        s1 = _proc_stats()
        lat = lat[: min(n, LAT_SAMPLES)]
        conn.send({"ops": n, "bytes": nbytes, "elapsed": elapsed,
                   "lat": np.percentile(lat, [50, 99, 99.9]).tolist() if n else [None] * 3,
                   "cpu_s": s1["cpu_s"] - s0["cpu_s"], "rss": s1["rss"]})
    if "client" in state:
        state["client"].close()
    if "ep" in state:
        from ucxx_transport import engine

        async def _close(ep):
            ep.abort()

        engine.run(_close(state["ep"]), 10)
        engine.release()
    conn.send("bye")


def _make_op(kind: str, size: int, state: dict, args: dict, refq, epoch: int):
    """A zero-arg callable doing one transfer of ``size`` bytes; returns bytes moved.

    Refs arrive tagged with the phase (``epoch``) whose producers published them: a
    batch a producer queued just before the previous phase ended can still be in
    flight when the orchestrator drains the queue and the ring, and its slots are
    gone by now, so it is skipped rather than fetched."""
    pending: list = []

    def next_ref():
        if not pending:
            t0 = time.perf_counter()
            while not pending:
                queued_in, refs = refq.get(timeout=30)
                if queued_in == epoch:
                    pending.extend(refs)
            state["ref_wait_s"] = state.get("ref_wait_s", 0.0) + time.perf_counter() - t0  # not in the latency
        return pending.pop(0)

    if kind == "ours-get":
        client = state["client"]

        def op():
            ref = next_ref()
            p = client.fetch(ref)
            n = p.nbytes
            p.release()
            return n
        return op
    if kind == "ours-local":
        client = state["client"]
        dst = np.empty(size, np.uint8)

        def op():
            ref = next_ref()
            p = client.fetch(ref)
            x = p["x"]
            np.copyto(dst[: x.nbytes], x)  # read the bytes, as a trainer would
            n = p.nbytes
            p.release()
            return n
        return op
    if kind == "ours-take":
        client = state["client"]
        addr = ("127.0.0.1", args["ports"])

        def op():
            got = client.take(addr, n=1, wait=1.0)
            n = 0
            for p in got:
                n += p.nbytes
                p.release()
            return n
        return op
    if kind == "raw-ucxx":
        from ucxx_transport import engine

        ep = state["ep"]
        req = np.zeros(64, np.uint8)
        req[:8] = np.frombuffer(np.int64(size).tobytes(), np.uint8)
        if args.get("device") == "cuda":
            import cupy

            buf = cupy.empty(size, cupy.uint8)
        else:
            buf = np.empty(size, np.uint8)

        async def once():
            await engine.send(ep, req)
            await engine.recv(ep, buf)

        def op():
            engine.run(once(), 30)
            return size
        return op
    if kind == "zmq":
        sock = state["sock"]
        req = np.int64(size).tobytes()

        def op():
            sock.send(req)
            msg = sock.recv(copy=False)
            return len(msg.buffer)
        return op
    if kind == "memcpy":
        src = np.full(size, 7, np.uint8)
        dst = np.empty(size, np.uint8)

        def op():
            np.copyto(dst, src)
            return size
        return op
    raise ValueError(kind)


def _raw_server_worker(progress_mode: str, max_size: int, conn) -> None:
    import asyncio

    from ucxx_transport import engine

    loop = engine.acquire(progress_mode)
    import ucxx

    payload = np.full(max_size, 7, np.uint8)

    eps = []

    async def handler(ep):
        req = np.empty(64, np.uint8)
        eps.append(ep)
        try:
            while True:
                await engine.recv(ep, req)
                n = int(req[:8].view(np.int64)[0])
                await engine.send(ep, payload[:n])
        except compat.ucx_errors():  # the client closed its endpoint: this exchange is over
            pass

    async def start():
        return ucxx.create_listener(handler, 0)

    lst = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    conn.send(lst.port)
    while True:
        cmd = conn.recv()
        if cmd[0] == "stats":
            conn.send(_proc_stats())
        else:
            break

    async def stop():
        lst.close()
        for ep in eps:
            ep.abort()
        eps.clear()

    engine.run(stop(), 10)
    engine.release()
    conn.send("bye")


def _zmq_server_worker(max_size: int, conn) -> None:
    import zmq

    ctx = zmq.Context()
    s = ctx.socket(zmq.REP)
    port = s.bind_to_random_port("tcp://127.0.0.1")
    payload = np.full(max_size, 7, np.uint8)
    conn.send(port)
    poller = zmq.Poller()
    poller.register(s, zmq.POLLIN)
    while True:
        if conn.poll():
            cmd = conn.recv()
            if cmd[0] == "stats":
                conn.send(_proc_stats())
                continue
            break
        if poller.poll(50):
            n = int(np.frombuffer(s.recv(), np.int64)[0])
            s.send(payload[:n], copy=False)
    s.close(0)
    ctx.term()
    conn.send("bye")


# ========================================================= coordinator ======
def _spawn(ctx, target, *args):
    parent, child = ctx.Pipe()
    p = ctx.Process(target=target, args=(*args, child), daemon=True)
    p.start()
    return p, parent


def _spawn_client(ctx, kind, args, refq):
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_client_worker, args=(kind, child, args, refq), daemon=True)
    p.start()
    return p, parent


def _recv(conn, timeout: float, what: str):
    if not conn.poll(timeout):
        raise TimeoutError(f"benchmark {what} did not answer within {timeout:.0f} s")
    return conn.recv()


def machine_info() -> dict:
    import psutil

    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1), "processor": platform.processor(),
            "numpy": np.__version__}
    from ucxx_transport import engine

    info["ucx_settings"] = engine.ucx_settings()
    try:
        import ucxx

        info["ucxx"] = getattr(ucxx, "__version__", "?")
        info["ucx"] = ucxx.__ucx_version__
    except (ImportError, AttributeError):  # no ucxx here, or one without these attributes
        pass
    try:
        import zmq

        info["pyzmq"] = zmq.__version__
    except ImportError:
        pass
    return info


def run_bench(a) -> dict:
    sizes = [parse_size(s) for s in a.sizes.split(",")]
    duration, warmup = a.duration, a.warmup
    modes = [m.strip() for m in a.mode.split(",") if m.strip()]
    for m in modes:
        if m not in ("get", "take", "local"):
            raise ValueError(f"--mode: {m!r} is not get, take or local")
    baselines = [b.strip() for b in a.baselines.split(",") if b.strip()]
    for b in baselines:
        if b not in ("raw-ucxx", "zmq", "memcpy"):
            raise ValueError(f"--baselines: {b!r} is not raw-ucxx, zmq or memcpy")
    notes = []
    if "zmq" in baselines:
        try:
            import zmq  # noqa: F401
        except ImportError:
            baselines.remove("zmq")
            notes.append("pyzmq not installed: zmq baseline skipped (pip install pyzmq)")
    if a.device == "cuda":
        for b in ("zmq", "memcpy"):
            if b in baselines:
                baselines.remove(b)
                notes.append(f"{b} baseline skipped for --device cuda")
        if "local" in modes:
            modes.remove("local")
            notes.append("local mode is host memory only: skipped for --device cuda")
    ctx = mp.get_context("spawn")
    max_size = max(sizes)
    ring_name = f"bench-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    import shm

    ring = shm.RingBuffer.create(ring_name, slots=a.slots, slot_bytes=max_size + (1 << 16))
    procs = []
    rows = []
    try:
        progress = _progress(len(sizes) * (len(modes) + len(baselines)), a.quick)
        # ---------------- ours
        if modes:
            sp, sconn = _spawn(ctx, _server_worker, ring_name, a.ports, a.progress_mode)
            procs.append(sp)
            ports = _recv(sconn, 60, "server")
            refq = ctx.Queue(maxsize=max(64, a.slots * 2))
            prods = []
            for _ in range(a.producers):
                parent, child = ctx.Pipe()
                p = ctx.Process(target=_producer_worker, args=(ring_name, child, refq), daemon=True)
                p.start()
                procs.append(p)
                prods.append((p, parent))
            for mode in modes:
                kind = f"ours-{mode}"
                cargs = {"progress_mode": a.progress_mode, "ports": ports, "device": a.device}
                clients = [_spawn_client(ctx, kind, cargs, refq) for _ in range(a.clients)]
                procs += [p for p, _ in clients]
                for _, c in clients:
                    _recv(c, 60, kind)
                for size in sizes:
                    rows.append(_combine([_ours_phase(kind, mode, size, clients, prods, refq, ring, sconn, sp,
                                                      duration, warmup) for _ in range(a.reps)]))
                    progress.update(1)
                for _, c in clients:
                    c.send(("exit",))
                    _recv(c, 30, kind)
            for _, pc in prods:
                pc.send(("exit",))
            sconn.send(("exit",))
            _recv(sconn, 30, "server")
        # baselines: same sizes, same number of client processes
        if "raw-ucxx" in baselines:  # the server sends from host memory, as ours does from the ring
            _run_baseline(ctx, procs, progress, rows, "raw-ucxx", sizes, duration, warmup, a.clients,
                          (_raw_server_worker, a.progress_mode, max_size),
                          {"progress_mode": a.progress_mode, "device": a.device}, a.reps)
        if "zmq" in baselines:
            _run_baseline(ctx, procs, progress, rows, "zmq", sizes, duration, warmup, a.clients,
                          (_zmq_server_worker, max_size), {}, a.reps)
        if "memcpy" in baselines:
            _run_baseline(ctx, procs, progress, rows, "memcpy", sizes, duration, warmup, a.clients, None, {}, a.reps)
        progress.close()
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
        ring.close()
        ring.unlink()
    config = {"sizes": sizes, "duration_s": duration, "warmup_s": warmup, "reps": a.reps, "producers": a.producers,
              "clients": a.clients, "ports": a.ports, "modes": modes, "device": a.device,
              "progress_mode": a.progress_mode, "baselines": baselines}
    return {"machine": machine_info(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": "ucxx-transport bench " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:]),
            "config": config, "notes": notes, "results": rows, "ratios": _ratios(rows, config)}


def _ours_phase(kind, mode, size, clients, prods, refq, ring, sconn, sp, duration, warmup) -> dict:
    """One repetition of one of our modes at one size: producers fill the ring (and
    queue refs for get/local, tagged with this phase's epoch) while the clients measure."""
    epoch = next(_EPOCHS)
    for _, pc in prods:
        pc.send(("fill", size, mode in ("get", "local"), epoch))
    row = _phase(kind, size, clients, duration, warmup,
                 {"server": [sp.pid], "producers": [p.pid for p, _ in prods]}, epoch)
    for _, pc in prods:
        pc.send(("stop",))
    pstats = [_recv(pc, 60, "producer") for _, pc in prods]
    _drain(refq, ring)
    sconn.send(("lag", max(1, int((duration + warmup) * 10))))
    lag = _recv(sconn, 30, "server")
    row["server_loop_lag_p99_ms"] = None if lag is None else lag * 1e3
    puts = sum(st["puts"] for st in pstats)
    put_s = sum(st["put_s"] for st in pstats)
    row["put_gbps"] = (puts * size / put_s / 1e9) if put_s else None
    return row


def _combine(reps: list[dict]) -> dict:
    """One row from the repetitions of a phase: the figures of the median repetition (by
    GB/s), with the min and max of throughput and latency over all of them."""
    row = dict(sorted(reps, key=lambda r: r["gbps"])[len(reps) // 2])
    row["reps"] = len(reps)
    for k in ("payloads_per_s", "gbps", "lat_p50_us", "lat_p99_us"):
        vals = [r[k] for r in reps if r[k] is not None]
        row[f"{k}_min"], row[f"{k}_max"] = (min(vals), max(vals)) if vals else (None, None)
    return row


def _run_baseline(ctx, procs, progress, rows, kind, sizes, duration, warmup, n_clients, server, client_args,
                  reps=1):
    """Spawn the baseline's server (``(target, *args)`` or None) and clients; measure every size."""
    sp = sconn = None
    cargs = dict(client_args)
    if server is not None:
        sp, sconn = _spawn(ctx, *server)
        procs.append(sp)
        cargs["port"] = _recv(sconn, 60, f"{kind} server")
    clients = [_spawn_client(ctx, kind, cargs, None) for _ in range(n_clients)]
    procs += [p for p, _ in clients]
    for _, c in clients:
        _recv(c, 60, f"{kind} client")
    for size in sizes:
        rows.append(_combine([_phase(kind, size, clients, duration, warmup, {"server": [sp.pid]} if sp else None)
                              for _ in range(reps)]))
        progress.update(1)
    for _, c in clients:
        c.send(("exit",))
        _recv(c, 30, f"{kind} client")
    if sconn is not None:
        sconn.send(("exit",))
        _recv(sconn, 30, f"{kind} server")


def _drain(refq, ring) -> None:
    """Between phases: drop queued refs and consume whatever is still READY."""
    import queue as _q

    import shm

    while True:
        try:
            refq.get_nowait()
        except (_q.Empty, OSError):
            break
    while True:
        try:
            ring.claim(timeout=0).ack()
        except shm.RingEmptyError:
            break


def _cpu_rss(pids) -> tuple[float, int]:
    import psutil

    cpu, rss = 0.0, 0
    for pid in pids:
        try:
            p = psutil.Process(pid)
            t = p.cpu_times()
            cpu += t.user + t.system
            rss = max(rss, p.memory_info().rss)
        except psutil.Error:
            pass
    return cpu, rss


def _phase(kind: str, size: int, clients, duration: float, warmup: float, others: dict | None = None,
           epoch: int = 0) -> dict:
    """One measurement. ``others``: role -> pids (server, producers) whose CPU%
    and RSS are sampled by this process over the phase."""
    others = others or {}
    before = {role: _cpu_rss(pids) for role, pids in others.items()}
    t0 = time.perf_counter()
    for _, c in clients:
        c.send(("run", size, duration, warmup, epoch))
    res = [_recv(c, duration + warmup + 120, kind) for _, c in clients]
    wall = time.perf_counter() - t0
    after = {role: _cpu_rss(pids) for role, pids in others.items()}
    ops = sum(r["ops"] for r in res)
    nbytes = sum(r["bytes"] for r in res)
    elapsed = max(r["elapsed"] for r in res) or 1e-9
    lats = [r["lat"] for r in res if r["lat"][0] is not None]
    lat = np.max(np.array(lats), axis=0).tolist() if lats else [None] * 3
    cpu = sum(r["cpu_s"] for r in res) / elapsed * 100
    return {"system": kind, "size": size, "payloads_per_s": ops / elapsed, "gbps": nbytes / elapsed / 1e9,
            "lat_p50_us": None if lat[0] is None else lat[0] * 1e6,
            "lat_p99_us": None if lat[1] is None else lat[1] * 1e6,
            "lat_p999_us": None if lat[2] is None else lat[2] * 1e6,
            "cpu_pct": {"clients": cpu, **{role: (after[role][0] - before[role][0]) / wall * 100 for role in others}},
            "rss_mb": {"clients": max(r["rss"] for r in res) / 2**20,
                       **{role: after[role][1] / 2**20 for role in others}}}


#: what each of our systems measures (ratio lines name it)
SYSTEM_WHAT = {"ours-get": "GET by ref over UCX", "ours-take": "TAKE over UCX", "ours-local": "same-host local path",
               "raw-ucxx": "raw ucxx tag send/recv", "zmq": "pyzmq REQ/REP tcp", "memcpy": "np.copyto"}


def layout(config: dict, system: str) -> str:
    """The process layout behind a system's figures."""
    clients, producers = _n(config["clients"], "client process"), _n(config["producers"], "producer")
    if system == "ours-local":
        return f"{clients}, {producers}, same host (shared memory, no server hop)"
    if system.startswith("ours"):
        return f"{clients}, 1 server ({config['ports']} ports), {producers}"
    if system == "put":
        return f"{producers} vs {_n(config['clients'], 'np.copyto process')}, GB/s per process"
    if system == "memcpy":
        return _n(config["clients"], "np.copyto process")
    return f"{clients}, 1 server"


def _n(n: int, what: str) -> str:
    return f"{n} {what}" + ("" if n == 1 else "es" if what.endswith("s") else "s")


def _ratios(rows: list[dict], config: dict) -> list[dict]:
    """Ours over each baseline at the same size. Every entry's ``label`` says what it
    compares (the two systems, the size, the metric) and ``layout`` the processes; no two
    entries share a label."""
    by = {(r["system"], r["size"]): r for r in rows}
    out = []

    def add(ours: str, base: str, size: int, metric: str, ratio: float, lay: str):
        label = f"{ours} / {base} at {format_size(size)}, {metric}"
        out.append({"size": size, "ours": ours, "baseline": base, "metric": metric, "ratio": ratio,
                    "label": label, "layout": lay})

    for r in rows:
        if not r["system"].startswith("ours"):
            continue
        base = ["memcpy"] if r["system"] == "ours-local" else ["raw-ucxx", "zmq"]
        for b in base:
            other = by.get((b, r["size"]))
            if other and other["payloads_per_s"] > 0:
                add(r["system"], b, r["size"], "payloads/s", r["payloads_per_s"] / other["payloads_per_s"],
                    f"{layout(config, r['system'])}; {b}: {layout(config, b)}")
        # the producers' put speed while this mode ran, per process, against one np.copyto process
        if r.get("put_gbps") and (m := by.get(("memcpy", r["size"]))) and m["gbps"] > 0:
            add(f"put (during {r['system']})", "memcpy", r["size"], "GB/s",
                r["put_gbps"] / (m["gbps"] / config["clients"]), layout(config, "put"))
    return out


class _NoProgress:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress(total: int, quick: bool):
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoProgress()
    return tqdm(total=total, desc="bench phases", unit="phase", file=sys.stderr, leave=False,
                disable=not sys.stderr.isatty() and quick)


def format_table(report: dict) -> str:
    st = report["machine"].get("ucx_settings", {})
    lines = ["UCX: " + " ".join(f"{k}={v}" for k, v in sorted(st.items()) if k.startswith("UCX_TCP"))]
    reps = report["config"].get("reps", 1)
    if reps > 1:
        lines.append(f"each row: the median of {reps} repetitions (by GB/s); GB/s min-max over all of them")
    lines += [f"{'system':>11} {'size':>7} {'payloads/s':>11} {'GB/s':>7} " + (f"{'GB/s min-max':>13} " if reps > 1
                                                                               else "") +
              f"{'p50 us':>8} {'p99 us':>8} {'p99.9 us':>9} {'cli CPU%':>8} {'srv CPU%':>8} {'loop lag p99 ms':>15}"]
    for r in report["results"]:
        lag = r.get("server_loop_lag_p99_ms")
        spread = f"{r['gbps_min']:.3f}-{r['gbps_max']:.3f}" if reps > 1 else ""
        lines.append(f"{r['system']:>11} {format_size(r['size']):>7} {r['payloads_per_s']:11.0f} {r['gbps']:7.3f} " +
                     (f"{spread:>13} " if reps > 1 else "") +
                     f"{_f(r['lat_p50_us']):>8} {_f(r['lat_p99_us']):>8} {_f(r['lat_p999_us']):>9} "
                     f"{r['cpu_pct']['clients']:8.0f} {_f(r['cpu_pct'].get('server')):>8} {_f(lag, 2):>15}")
    lines.append("")
    lines.append("ratios at the same size (ours / baseline; each line names its metric and process layout):")
    width = max((len(q["label"]) for q in report["ratios"]), default=0)
    for q in report["ratios"]:
        lines.append(f"  {q['label']:<{width}}: {q['ratio']:6.2f}x  [{q['layout']}]")
    for n in report.get("notes", []):
        lines.append(f"note: {n}")
    return "\n".join(lines)


def _f(v, nd=0):
    return "-" if v is None else f"{v:.{nd}f}"


def plot(report: dict, path: str):
    """Write a PNG: GB/s vs payload size (min-max bars over repetitions) and latency p50/p99;
    returns the matplotlib Figure."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("--plot needs matplotlib: pip install 'ucxx-transport[bench]'") from None
    results = report["results"]
    sizes = sorted({r["size"] for r in results})
    fig, (ax, axl) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, system in enumerate(sorted({r["system"] for r in results})):
        rs = sorted((r for r in results if r["system"] == system), key=lambda r: r["size"])
        x, y = [r["size"] for r in rs], [r["gbps"] for r in rs]
        # min-max over the repetitions (none drawn with one repetition)
        err = [[v - r.get("gbps_min", v) for v, r in zip(y, rs)], [r.get("gbps_max", v) - v for v, r in zip(y, rs)]]
        color = f"C{i}"
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, color=color, label=f"{system} ({SYSTEM_WHAT[system]})")
        lat = [(r["size"], r["lat_p50_us"], r["lat_p99_us"]) for r in rs if r["lat_p50_us"] is not None]
        if lat:
            axl.plot([v[0] for v in lat], [v[1] for v in lat], marker="o", color=color, label=f"{system} p50")
            axl.plot([v[0] for v in lat], [v[2] for v in lat], marker="x", linestyle="--", color=color,
                     label=f"{system} p99")
    for a_ in (ax, axl):
        a_.set_xscale("log", base=2)
        a_.set_yscale("log")
        a_.set_xticks(sizes, [format_size(n) for n in sizes])
        a_.minorticks_off()
        a_.set_xlabel("payload size")
        a_.grid(True, which="both", alpha=0.3)
    ax.set_ylabel("GB/s" + (f" (median of {report['config'].get('reps')} reps, bars: min-max)"
                            if report["config"].get("reps", 1) > 1 else ""))
    axl.set_ylabel("latency per payload (us)")
    axl.set_title("latency p50 (solid) and p99 (dashed)", fontsize=9)
    m, c = report["machine"], report["config"]
    ax.set_title(f"ucxx-transport bench ({m.get('cpus')} CPUs, UCX {m.get('ucx', '?')}, {c['progress_mode']}; "
                 f"{layout(c, 'ours-get')})", fontsize=9)
    ax.legend(fontsize=7)
    axl.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig


# ================================================================ CLI ========
def add_parser(sub) -> None:
    b = sub.add_parser(
        "bench", help="throughput benchmark: ours vs raw ucxx, pyzmq and memcpy in one run",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example: ucxx-transport bench --sizes 4KiB,1MiB,64MiB --duration 10s --clients 2 "
               "--json bench.json --plot bench.png")
    b.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES}, 1.5 s each; finishes in < 60 s")
    b.add_argument("--sizes", default=None, help=f"comma-separated payload sizes (default {DEFAULT_SIZES})")
    b.add_argument("--duration", default=None, help="measurement time per size and system (default 10s)")
    b.add_argument("--warmup", default=None, help="warm-up per size and system (default 1s)")
    b.add_argument("--producers", type=int, default=1, help="producer processes keeping the ring full (default 1)")
    b.add_argument("--clients", type=int, default=1, help="client processes per system (default 1)")
    b.add_argument("--ports", type=int, default=2, help="server listener ports (default 2)")
    b.add_argument("--slots", type=int, default=8, help="ring slots (default 8)")
    b.add_argument("--mode", default=None, help="our path(s): get, take, local, comma-separated (default get; "
                                                "--quick: get,local)")
    b.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="receive into host or GPU memory")
    b.add_argument("--progress-mode", default=None, help="for ours and raw ucxx: " + help_text("progress_mode"))
    b.add_argument("--baselines", default="raw-ucxx,zmq,memcpy", help="comma-separated (default all)")
    b.add_argument("--batch", nargs="?", const="256x4KiB,256x64KiB,64x1MiB,8x64MiB", default=None, metavar="CASES",
                   help="batch mode: one trainer pulls COUNTxSIZE payloads (fetch_many, take) vs pyzmq PUSH/PULL "
                        "and raw ucxx pipelined, timed request to last byte (default cases "
                        "256x4KiB,256x64KiB,64x1MiB,8x64MiB; with --quick 256x4KiB)")
    b.add_argument("--reps", type=int, default=None,
                   help=f"timed repetitions: per size and system, the median kept with min-max bars (default "
                        f"{DEFAULT_REPS}); batch mode: per case, the best kept (default {BATCH_REPS})")
    b.add_argument("--json", help="write every figure and the machine description to this file")
    b.add_argument("--plot", help="write a PNG of GB/s vs payload size (needs matplotlib)")
    b.set_defaults(func=cmd_bench)


def cmd_bench(a) -> int:
    a.progress_mode = resolve("progress_mode", a.progress_mode)
    if a.reps is not None and a.reps < 1:
        raise ValueError("--reps must be >= 1")
    if a.batch is not None:
        return _cmd_batch(a)
    a.reps = a.reps or DEFAULT_REPS
    a.sizes = a.sizes or (QUICK_SIZES if a.quick else DEFAULT_SIZES)
    a.duration = parse_duration(a.duration or ("1.5s" if a.quick else "10s"), what="--duration")
    a.warmup = parse_duration(a.warmup or ("0.3s" if a.quick else "1s"), what="--warmup")
    a.mode = a.mode or ("get,local" if a.quick else "get")
    for name in ("producers", "clients", "ports", "slots"):
        if getattr(a, name) < 1:
            raise ValueError(f"--{name} must be >= 1")
    if a.plot:
        try:
            import matplotlib  # noqa: F401  (fail before a long run, not after it)
        except ImportError:
            raise ImportError("--plot needs matplotlib: pip install 'ucxx-transport[bench]'") from None
    t0 = time.time()
    report = run_bench(a)
    print(format_table(report))
    if a.quick:  # one batch case too: a trainer pulling 256 x 4 KiB (see --batch)
        from benchmarks import batch

        report["batch"] = batch.run(batch.parse_cases(batch.QUICK_CASES), reps=2,
                                    baselines=[x for x in a.baselines.split(",") if x != "memcpy"])
        print()
        print(batch.header(report["batch"]))
        print(batch.format_table(report["batch"]))
    report["wall_s"] = time.time() - t0
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    if a.plot:
        plot(report, a.plot)
    return 0


def _cmd_batch(a) -> int:
    from benchmarks import batch

    cases = batch.parse_cases(batch.QUICK_CASES if a.quick and a.batch == batch.DEFAULT_CASES else a.batch)
    report = batch.run(cases, reps=a.reps or BATCH_REPS, baselines=[x for x in a.baselines.split(",") if x != "memcpy"])
    print(batch.header(report))
    print(batch.format_table(report))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0
