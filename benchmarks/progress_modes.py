"""Measure ucxx progress modes on this machine (raw ucxx async API, loopback).

    python benchmarks/progress_modes.py [--modes thread,blocking,polling] [--seconds 2]

For each mode it starts a server process and a client process (spawn) and
times: 4 KiB request/response round trips, and 64 MiB payload pulls (64-byte
request, 64 MiB response). It also reports each process's CPU use while idle
for one second (busy-spinning modes burn a core). The transport's default
progress mode is chosen from this table (see docs/PROGRESS_MODES.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import time

os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")


def _server(mode: str, port_q, stop_evt, big: int):
    import numpy as np
    import psutil
    import ucxx

    from ucxx_transport import engine
    from ucxx_transport import ucxx_compat as compat

    engine.init(mode)
    payload = np.ones(big, np.uint8)
    small = np.ones(4096, np.uint8)

    async def handler(ep):
        req = np.empty(64, np.uint8)
        try:
            while True:
                await ep.recv(req)
                kind = req[0]
                if kind == 1:
                    await ep.send(small)
                elif kind == 2:
                    await ep.send(payload)
                else:
                    break
        except compat.ucx_errors():  # the client closed its endpoint: this exchange is over
            pass

    async def main():
        engine.attach_loop()
        lst = ucxx.create_listener(handler, 0)
        port_q.put(lst.port)
        while not stop_evt.is_set():
            await asyncio.sleep(0.05)
        p = psutil.Process()
        lst.close()
        return p

    asyncio.run(main())


def _client(mode: str, port: int, seconds: float, big: int, out_q):
    import numpy as np
    import psutil
    import ucxx

    from ucxx_transport import engine

    engine.init(mode)
    res = {}

    async def main():
        engine.attach_loop()
        ep = await ucxx.create_endpoint("127.0.0.1", port)
        req = np.zeros(64, np.uint8)
        resp = np.empty(4096, np.uint8)
        bigbuf = np.empty(big, np.uint8)
        req[0] = 1
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            await ep.send(req)
            await ep.recv(resp)
            n += 1
        dt = time.perf_counter() - t0
        res["rtt_4k_us"] = dt / n * 1e6
        req[0] = 2
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds or n < 3:
            await ep.send(req)
            await ep.recv(bigbuf)
            n += 1
        res["gbps_64m"] = n * big / (time.perf_counter() - t0) / 1e9
        p = psutil.Process()
        c0 = p.cpu_times()
        await asyncio.sleep(1.0)
        c1 = p.cpu_times()
        res["client_idle_cpu_pct"] = 100 * ((c1.user + c1.system) - (c0.user + c0.system))
        req[0] = 3
        await ep.send(req)
        await ep.close()

    asyncio.run(main())
    out_q.put(res)


def measure(mode: str, seconds: float, big: int = 64 << 20) -> dict:
    import psutil

    ctx = mp.get_context("spawn")
    port_q, out_q, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    srv = ctx.Process(target=_server, args=(mode, port_q, stop, big))
    srv.start()
    port = port_q.get(timeout=60)
    cli = ctx.Process(target=_client, args=(mode, port, seconds, big, out_q))
    cli.start()
    res = out_q.get(timeout=seconds * 4 + 120)
    sp = psutil.Process(srv.pid)
    c0 = sp.cpu_times()
    time.sleep(1.0)
    c1 = sp.cpu_times()
    res["server_idle_cpu_pct"] = 100 * ((c1.user + c1.system) - (c0.user + c0.system))
    stop.set()
    cli.join(30)
    srv.join(30)
    if srv.is_alive():
        srv.kill()
    res["mode"] = mode
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="adaptive,thread,blocking,polling")
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    rows = [measure(m, a.seconds) for m in a.modes.split(",")]
    print(f"{'mode':>10} {'4KiB RTT us':>12} {'64MiB GB/s':>11} {'srv idle CPU%':>14} {'cli idle CPU%':>14}")
    for r in rows:
        print(f"{r['mode']:>10} {r['rtt_4k_us']:12.1f} {r['gbps_64m']:11.2f} {r['server_idle_cpu_pct']:14.1f} "
              f"{r['client_idle_cpu_pct']:14.1f}")
    if a.json:
        json.dump(rows, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
