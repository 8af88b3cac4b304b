"""`ucxx-transport status`: the text of a ring's or a server's status, and the
``--watch`` live view.

Getting the numbers (attaching a ring, asking a server for STATS) is the CLI's
job; this module only turns them into text, so it imports neither ``shm`` nor
``clients``.

The live view shows slots by state, payloads/s in and out computed from the
difference of the counters between two refreshes, ACK latency p50/p99 and the
connected endpoints (these two only from a server's STATS: a ring alone has no
latencies). On a terminal each refresh clears the screen; otherwise (a pipe, a
file, a test) every refresh is a plain block of its own.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Callable, TextIO

from .units import format_size, parse_duration

#: ANSI: cursor home, clear screen
CLEAR = "\x1b[H\x1b[2J"
#: seconds between refreshes of ``--watch`` without a value
WATCH_DEFAULT_S = 2.0
#: ``status --help``
DESCRIPTION = """\
Show a local ring (--ring NAME: slot states, generations, owners, drops, dead letters,
slots stuck behind a frozen process) or a running server (--address HOST:PORT: requests
by op and status, bytes, in-flight, ACK timeouts, handler latency p50/p99, event-loop lag).

--watch [SECONDS] refreshes a live view instead: slots by state, payloads/s in and out
(from the counters' change between refreshes), and from a server also bytes out/s, ACK
latency p50/p99 and its connected endpoints. Ctrl-C ends it (exit 0); --count N ends it
after N refreshes. On a terminal each refresh redraws the screen, otherwise each one is
a plain block (with --json: one JSON object per line)."""


def watch_interval(text: str) -> float:
    """``--watch``'s value in seconds (> 0); ArgumentTypeError otherwise."""
    try:
        v = parse_duration(text, what="--watch")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"--watch must be > 0 seconds, got {text!r}")
    return v


# ------------------------------------------------------------- one shot ---
def format_ring(info: dict) -> str:
    """``status --ring``: geometry, states, counters, dead letters, stuck slots, busy slots."""
    lines = [f"ring {info['ring']}: {info['slots']} slots x {info['slot_bytes']} bytes, on_full={info['on_full']}",
             "  states: " + ", ".join(f"{k}={v}" for k, v in info["states"].items()),
             f"  ring id {info['ring_id']}: published={info['published']} consumed={info['consumed']} "
             f"drops={info['drops']} recovered={info['recovered']} dead_letters={info['dead_letters']}"]
    for d in info["dead"]:
        lines.append(f"  DEAD slot {d['slot']} generation {d['generation']} ({d['nbytes']} bytes): undecodable "
                     f"{d['failures']}x; RingBuffer.read_dead / discard_dead")
    if info["stuck_slots"]:
        lines.append(f"  stuck slots {info['stuck_slots']}: their lock is held by a frozen process (SIGSTOP, a "
                     f"debugger); other slots keep serving. Resume or kill that process.")
    lines.append(f"  server: {info['server'] or 'none running'}")
    for s in info.get("slots_detail", ()):
        if s["state"] != "FREE":
            lines.append(f"  slot {s['slot']:5d} {s['state']:8s} gen={s['generation']} nbytes={s['nbytes']} "
                         f"owner_pid={s['owner_pid']}")
    return "\n".join(lines)


def format_server(info: dict) -> str:
    """``status --address``: a server's STATS (requests, bytes, latencies, loop lag)."""
    m, r = info["metrics"], info["ring"]
    return "\n".join([
        f"server {info['server']}",
        f"  ring states: {r['states']}  drops={r['drops']}  dead_letters={r['dead_letters']}  "
        f"stuck_slots={r['stuck_slots']}  deferred_finalisers={r['deferred_finalisers']}",
        f"  requests: {m['requests']}",
        f"  bytes_out={m['bytes_out']} payloads_out={m['payloads_out']} inflight={m['inflight']} "
        f"endpoints={m['endpoints']} ack_timeouts={m['ack_timeouts']}",
        f"  handler latency: {m['handler_latency_s']}",
        f"  loop lag: {m['loop_lag_s']}",
    ])


# ------------------------------------------------------------ live view ---
def _counters(info: dict) -> dict:
    """The monotonic counters rates are computed from."""
    if "metrics" in info:  # a server's STATS: payloads out = payloads it sent
        r, m = info["ring"], info["metrics"]
        return {"in": r["published"], "out": m["payloads_out"], "bytes_out": m["bytes_out"]}
    return {"in": info["published"], "out": info["consumed"]}  # a ring: out = payloads consumed


def view(info: dict, prev: tuple[float, dict] | None, now: float) -> dict:
    """One refresh of the live view: ``info`` (a ring's stats or a server's STATS)
    plus rates from the counters of the previous refresh ``prev = (time, counters)``
    (None on the first refresh: no rates yet)."""
    cur = _counters(info)
    server = "metrics" in info
    ring = info["ring"] if server else info
    v = {"time": time.strftime("%H:%M:%S"), "source": "server" if server else "ring",
         "ring": ring["ring"], "states": ring["states"],
         "drops": ring["drops"], "dead_letters": ring["dead_letters"], "stuck_slots": ring["stuck_slots"],
         "counters": cur, "interval_s": None, "payloads_in_per_s": None, "payloads_out_per_s": None}
    if not server:
        v["geometry"] = f"{ring['slots']} slots x {format_size(ring['slot_bytes'])}, on_full={ring['on_full']}"
        v["server"] = ring.get("server")
    else:
        m = info["metrics"]
        v["server"] = {"host": info["server"]["host"], "ports": info["server"]["ports"]}
        v["ack_latency_s"] = {k: m["handler_latency_s"][k] for k in ("p50", "p99", "count")}
        v["endpoints"] = m["endpoints"]
        v["inflight"] = m["inflight"]
        v["bytes_out_per_s"] = None
    if prev is not None and now > prev[0]:
        dt = now - prev[0]
        v["interval_s"] = dt
        v["payloads_in_per_s"] = (cur["in"] - prev[1]["in"]) / dt
        v["payloads_out_per_s"] = (cur["out"] - prev[1]["out"]) / dt
        if server:
            v["bytes_out_per_s"] = (cur["bytes_out"] - prev[1]["bytes_out"]) / dt
    return v


def _ms(s) -> str:
    return "-" if s is None else f"{s * 1e3:.2f} ms"


def format_view(v: dict) -> str:
    """The text of one refresh."""
    head = f"ucxx-transport status --watch  {v['time']}  ring {v['ring']}"
    if v.get("geometry"):
        head += f" ({v['geometry']})"
    lines = [head, "  slots: " + "  ".join(f"{k}={n}" for k, n in v["states"].items())]
    if v["interval_s"] is None:
        lines.append("  payloads/s: in -  out -  (rates from the next refresh on)")
    else:
        out_what = "sent by the server" if v["source"] == "server" else "consumed"
        lines.append(f"  payloads/s: in {v['payloads_in_per_s']:.1f}  out {v['payloads_out_per_s']:.1f}  "
                     f"(published / {out_what} over the last {v['interval_s']:.1f} s)")
    if v["source"] == "server":
        lat = v["ack_latency_s"]
        rate = v["bytes_out_per_s"]
        lines.append(f"  bytes out/s: {'-' if rate is None else format_rate(rate)}  inflight={v['inflight']}")
        lines.append(f"  ACK latency (claim to ACK): p50 {_ms(lat['p50'])}  p99 {_ms(lat['p99'])}  "
                     f"({lat['count']} ACKed so far)")
        lines.append(f"  clients: {v['endpoints']} connected endpoint(s), this status included (a client pools a "
                     "few per port)")
    else:
        lines.append("  ACK latency: - (a ring alone keeps none: watch --address HOST:PORT for it)")
        lines.append(f"  server: {v['server'] or 'none running'}")
    lines.append(f"  drops={v['drops']}  dead_letters={v['dead_letters']}  stuck_slots={v['stuck_slots']}")
    return "\n".join(lines)


def format_rate(bytes_per_s: float) -> str:
    for unit, k in (("GB/s", 1e9), ("MB/s", 1e6), ("kB/s", 1e3)):
        if bytes_per_s >= k:
            return f"{bytes_per_s / k:.2f} {unit}"
    return f"{bytes_per_s:.0f} B/s"


def watch(sample: Callable[[], dict], interval: float, count: int | None = None, out: TextIO | None = None,
          as_json: bool = False) -> int:
    """Refresh the live view every ``interval`` seconds until Ctrl-C (returns 0) or
    ``count`` refreshes. ``sample()`` returns a ring's stats or a server's STATS; its
    expected failures propagate. ``as_json``: one JSON object per refresh and line."""
    out = out or sys.stdout
    tty = out.isatty() and not as_json
    prev, n = None, 0
    try:
        while True:
            info = sample()
            now = time.monotonic()
            v = view(info, prev, now)
            if as_json:
                out.write(json.dumps(v) + "\n")
            else:
                out.write((CLEAR if tty else ("\n" if n else "")) + format_view(v) + "\n")
            out.flush()
            n += 1
            prev = (now, v["counters"])
            if count is not None and n >= count:
                return 0
            time.sleep(max(0.0, interval - (time.monotonic() - now)))
    except KeyboardInterrupt:
        if tty:
            out.write("\n")
        return 0
