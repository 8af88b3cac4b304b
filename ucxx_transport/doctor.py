"""`ucxx-transport doctor`: what UCX sees here, what serving needs, and what to change.

Every finding has one of three levels:

* ``problems``: serving would fail here (ucxx does not import, UCX does not
  initialise, no TCP for the listeners, /dev/shm cannot hold the ring the slot
  knobs describe, a knob serve would refuse, the loopback transfer failed);
  ``doctor`` exits 1.
* ``warnings``: it works, slower or with a limit (TCP only, a low memlock limit
  with RDMA present, few open files); exit 0, but never reported as "OK".
* ``notes``: how things are set and why.

Only public ucxx calls are used here (``get_ucp_context_info``,
``create_listener``); everything private goes through :mod:`.engine`.
"""

from __future__ import annotations

import asyncio
import os
import re
import resource
import shutil
import time

import numpy as np

from .config import ConfigError, resolve
from .units import format_size

#: transport kinds, in report order: (kind, UCX transport-name prefixes); first match wins
TRANSPORT_KINDS = (
    ("TCP", ("tcp",)),
    ("shared memory", ("posix", "sysv", "cma", "xpmem", "knem")),
    ("RDMA/verbs", ("rc", "ud", "dc", "ib", "mlx5")),
    ("CUDA", ("cuda_copy", "cuda_ipc", "gdr_copy")),
)
#: UCX's own default of UCX_TCP_MAX_NUM_EPS (endpoints one TCP interface may have)
UCX_TCP_MAX_NUM_EPS_DEFAULT = 256
#: the loopback transfer: this many bytes per transfer, for about this long (and at most LOOPBACK_MAX)
LOOPBACK_BYTES = 4 << 20
LOOPBACK_S = 1.5
LOOPBACK_MAX = 500
#: below this memlock limit RDMA registration of ring slots fails or falls back (bytes)
MEMLOCK_RDMA_MIN = 1 << 30

#: ``doctor --help``
DESCRIPTION = """\
Check what serving needs here and say what to change: the ucxx and UCX versions, the UCX
transports found grouped by kind (TCP, shared memory, RDMA/verbs, CUDA) with their devices,
the memlock limit, /dev/shm against the ring the slot knobs in force describe, the
effective UCX_TCP_MAX_NUM_EPS, the progress mode in force (checked as serve checks it),
the UCX settings in force, and a short loopback transfer (4 MiB at a time, about 2 s) with
what to expect from the fabric found.

Lines start with PROBLEM (serving would fail: exit 1), WARNING (it works, slower or
with a limit: exit 0; e.g. TCP only) or note. Exit 0 when there is no PROBLEM."""

_RESOURCE_RE = re.compile(r"^#\s*resource\s+\d+\s*:.*--\s+([\w.-]+)/(\S+)\s*$", re.M)


def kind_of(transport: str) -> str:
    """The kind of a UCX transport name (``tcp`` -> ``TCP``, ``rc_mlx5`` -> ``RDMA/verbs``...)."""
    for kind, prefixes in TRANSPORT_KINDS:
        if transport.startswith(prefixes):
            return kind
    return "other"


def parse_resources(context_info: str) -> dict[str, list[str]]:
    """``{transport: [devices]}`` from the resource lines of ``ucxx.get_ucp_context_info()``
    (``#  resource 1 : md 1 dev 1 flags -- tcp/lo``)."""
    out: dict[str, list[str]] = {}
    for tl, dev in _RESOURCE_RE.findall(context_info):
        out.setdefault(tl, []).append(dev)
    return out


def run(shm_path: str = "/dev/shm", loopback_s: float = LOOPBACK_S) -> dict:
    """The report (a JSON-able dict); ``problems`` empty when serving can work here."""
    rep: dict = {"problems": [], "warnings": [], "notes": []}
    knobs = _check_knobs(rep)
    _check_ucx(rep, knobs["progress_mode"], loopback_s)
    _check_shm(rep, shm_path, knobs["slots"], knobs["slot_bytes"])
    _check_limits(rep)
    _check_tcp_eps(rep, knobs["pool_size"], knobs["n_ports"])
    _expectation(rep)
    return rep


def _check_knobs(rep: dict) -> dict:
    """The knobs doctor's checks depend on, resolved as serve resolves them."""
    from . import engine
    from .config import KNOBS

    knobs, invalid = {}, set()
    for name in ("progress_mode", "slots", "slot_bytes", "pool_size", "n_ports"):
        try:
            knobs[name] = resolve(name)
        except ConfigError as exc:
            rep["problems"].append(f"{exc}: serve would refuse it")
            knobs[name] = KNOBS[name].default
            invalid.add(name)
    env = KNOBS["progress_mode"].env
    rep["progress_mode"] = engine.resolve_mode(knobs["progress_mode"])
    rep["progress_mode_source"] = (f"default: {env} is invalid" if "progress_mode" in invalid else
                                   f"environment {env}" if os.environ.get(env) else "default")
    rep["ring_geometry"] = {"slots": knobs["slots"], "slot_bytes": knobs["slot_bytes"]}
    cpus = os.cpu_count() or 1
    rep["cpus"] = cpus
    if cpus <= 2 and rep["progress_mode"].startswith("thread"):
        rep["warnings"].append(f"on 2 cores '{rep['progress_mode']}' progress measured ~20x slower round trips "
                               "than 'adaptive'")
    return knobs


def _check_ucx(rep: dict, mode: str, loopback_s: float) -> None:
    from . import engine

    rep["ucx_settings"] = engine.ucx_settings()  # ours unless the environment overrides them
    for k, v in engine.UCX_DEFAULTS.items():
        if os.environ.get(k, v) != v:
            rep["notes"].append(f"{k}={os.environ[k]} from the environment overrides our default {v}")
    rep.update(ucxx_version=None, ucx_version=None, transports=None, transport_kinds=None, devices=None,
               loopback=None)
    try:
        ucxx = engine.import_ucxx()
    except ImportError as exc:
        rep["problems"].append(f"ucxx does not import ({exc.__cause__ or exc}): pip install "
                               "'ucxx-transport[cu12]' (or [cu13])")
        return
    try:
        engine.acquire(mode)
    except (ucxx.exceptions.UCXError, RuntimeError, OSError, TimeoutError) as exc:
        rep["problems"].append(f"UCX failed to initialise: {type(exc).__name__}: {exc}")
        return
    try:
        rep["ucxx_version"] = getattr(ucxx, "__version__", "?")
        rep["ucx_version"] = ucxx.__ucx_version__
        rep["progress_mode_in_force"] = engine.mode()
        devices = parse_resources(ucxx.get_ucp_context_info())
        rep["transports"] = sorted(devices)
        rep["devices"] = devices
        kinds: dict[str, list[str]] = {k: [] for k, _ in TRANSPORT_KINDS} | {"other": []}
        for tl in sorted(devices):
            kinds[kind_of(tl)].append(tl)
        rep["transport_kinds"] = kinds
        if not kinds["TCP"]:
            rep["problems"].append("UCX found no tcp transport: listeners need it (check UCX_TLS and "
                                   "UCX_NET_DEVICES)")
            return
        rep["notes"].append("endpoint error handling is on (needed to detect dead peers): UCX uses tcp even "
                            "on one host; same-host trainers use the local fast path (default) for full speed")
        try:
            rep["loopback"] = _loopback(ucxx, LOOPBACK_BYTES, loopback_s)
        except (ucxx.exceptions.UCXError, RuntimeError, OSError, TimeoutError) as exc:
            rep["problems"].append(f"a loopback transfer between two UCX endpoints of this process failed: "
                                   f"{type(exc).__name__}: {exc}")
    finally:
        engine.release()


def _loopback(ucxx, nbytes: int, budget_s: float) -> dict:
    """Pull ``nbytes`` from a listener of this process over and over for about
    ``budget_s``: request (8 bytes) -> payload, as a client fetches."""
    from . import engine

    async def go():
        src = np.full(nbytes, 7, np.uint8)

        async def handler(ep):
            req = np.empty(8, np.uint8)
            try:
                while True:
                    await engine.recv(ep, req)
                    if req[0]:  # the client is done
                        return
                    await engine.send(ep, src)
            except ucxx.exceptions.UCXError:
                pass  # the client's endpoint went away: the end of the test too

        lst = ucxx.create_listener(handler, 0)
        ep = None
        try:
            ep = await engine.connect("127.0.0.1", lst.port, 5.0)
            dst, req = np.empty(nbytes, np.uint8), np.zeros(8, np.uint8)
            await engine.send(ep, req)  # the first transfer sets the connection up: not timed
            await engine.recv(ep, dst)
            n, t0 = 0, time.perf_counter()
            while n < LOOPBACK_MAX and time.perf_counter() - t0 < budget_s:
                await engine.send(ep, req)
                await engine.recv(ep, dst)
                n += 1
            dt = time.perf_counter() - t0
            if dst[0] != 7 or dst[-1] != 7:
                raise RuntimeError("the received bytes differ from the sent ones")
            await engine.send(ep, np.ones(8, np.uint8))  # done: the handler returns
        finally:
            deadline = time.monotonic() + 2.0
            while lst.active_clients and time.monotonic() < deadline:  # let the handler retire first
                await asyncio.sleep(0.005)
            if ep is not None:
                engine.abort(ep)
            lst.close()
        return {"bytes": nbytes, "transfers": n, "seconds": dt, "gbps": n * nbytes / dt / 1e9}

    return engine.run(go(), budget_s + 15.0)


def _check_shm(rep: dict, path: str, slots: int, slot_bytes: int) -> None:
    from shm.layout import segment_size

    need = segment_size(slots, slot_bytes)[0]
    rep["dev_shm"] = {"path": path, "total": None, "free": None, "ring_bytes": need}
    if not os.path.isdir(path) or not os.access(path, os.W_OK | os.X_OK):
        rep["problems"].append(f"{path} is missing or not writable: rings live there (mount a tmpfs; docker: "
                               "--shm-size=16g; k8s: an emptyDir with medium Memory)")
        return
    try:
        du = shutil.disk_usage(path)
    except OSError as exc:
        rep["problems"].append(f"{path} is not usable: {exc}")
        return
    rep["dev_shm"].update(total=du.total, free=du.free)
    if du.free < need:
        rep["problems"].append(
            f"{path} has {_size(du.free)} free, but serve --create with {slots} slots x {format_size(slot_bytes)} "
            f"needs {_size(need)}: enlarge it (docker: --shm-size=16g; k8s: an emptyDir with medium Memory) or "
            "make smaller rings (--slots/--slot-bytes, UCXX_TRANSPORT_SLOTS/_SLOT_BYTES; e.g. 16 x 4MiB = 64 MiB)")


def _check_limits(rep: dict) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    rep["memlock"] = {"soft": _limit(soft), "hard": _limit(hard)}
    rdma = bool((rep.get("transport_kinds") or {}).get("RDMA/verbs"))
    if soft != resource.RLIM_INFINITY and soft < MEMLOCK_RDMA_MIN:
        msg = (f"memlock limit {_size(soft)}: RDMA registers ring memory and needs it unlimited (ulimit -l "
               "unlimited; docker: --ulimit memlock=-1)")
        (rep["warnings"] if rdma else rep["notes"]).append(msg if rdma else msg + "; no RDMA here, TCP does not care")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    rep["open_files"] = {"soft": soft, "hard": hard}
    if soft < 4096:
        rep["warnings"].append(f"open-file limit is {soft}: raise it (ulimit -n 65536) for many clients/endpoints")


def _check_tcp_eps(rep: dict, pool_size: int, n_ports: int) -> None:
    env = os.environ.get("UCX_TCP_MAX_NUM_EPS")
    value = int(env) if env and env.lstrip("-").isdigit() else UCX_TCP_MAX_NUM_EPS_DEFAULT
    source = "environment" if env else "UCX default"
    rep["tcp_max_num_eps"] = {"value": value, "source": source}
    if value > 0:
        per_client = pool_size * n_ports
        rep["notes"].append(f"UCX_TCP_MAX_NUM_EPS={value} ({source}): a server takes about {value // per_client} "
                            f"clients of {pool_size} pooled endpoints x {n_ports} ports; raise it for more")


def _expectation(rep: dict) -> None:
    """What throughput to expect from the fabric found, and the TCP-only warning."""
    kinds = rep.get("transport_kinds")
    if not kinds:
        return
    lb = rep.get("loopback")
    measured = f"loopback measured {lb['gbps']:.2f} GB/s" if lb else "no loopback figure"
    parts = []
    if kinds["RDMA/verbs"]:
        devs = sorted({d for tl in kinds["RDMA/verbs"] for d in rep["devices"][tl]})
        parts.append(f"RDMA/verbs on {', '.join(devs)}: across hosts expect close to the NIC's line rate "
                     "(~12 GB/s per 100 Gb/s port) when UCX_TLS allows rc/dc")
    else:
        rep["warnings"].append(f"TCP only: expect ~1-5 GB/s on one host ({measured}), network-bound across hosts "
                               "(~1.2 GB/s per 10 GbE); no RDMA/NVLink transports found (RDMA needs rdma-core or "
                               "MOFED and a UCX built with verbs; check UCX_TLS)")
        parts.append(f"TCP only ({measured}; ~1-5 GB/s on one host, network-bound across hosts)")
    cuda = set(kinds["CUDA"])
    if "cuda_ipc" in cuda:
        parts.append("cuda_ipc: GPU-to-GPU copies over NVLink/PCIe between processes of this host")
    if "gdr_copy" in cuda:
        parts.append("gdr_copy: GPUDirect RDMA for small GPU buffers")
    if cuda == {"cuda_copy"}:
        parts.append("cuda_copy only: GPU buffers are staged through host memory")
    rep["expect"] = "; ".join(parts)


def _limit(v: int) -> int | str:
    return "unlimited" if v == resource.RLIM_INFINITY else v


def _size(n: int) -> str:
    for unit, k in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{n} B"


def format_report(rep: dict) -> str:
    """The text of the report: facts first, then PROBLEM / WARNING / note lines and a verdict."""
    lines = [f"ucxx {rep.get('ucxx_version')}  UCX {rep.get('ucx_version')}"]
    if rep.get("transport_kinds"):
        lines.append("transports:")
        for kind, tls in rep["transport_kinds"].items():
            txt = ", ".join(f"{tl} ({', '.join(rep['devices'][tl])})" for tl in tls) or "none"
            lines.append(f"  {kind:<14} {txt}")
    lines.append(f"progress mode: {rep['progress_mode']} ({rep['progress_mode_source']}; checked as serve checks "
                 "it)   endpoint error handling: on")
    s = rep.get("dev_shm") or {}
    g = rep["ring_geometry"]
    ring = f"serve --create with {g['slots']} x {format_size(g['slot_bytes'])} needs {_size(s['ring_bytes'])}"
    lines.append(f"{s.get('path')}: " + (f"{_size(s['free'])} free of {_size(s['total'])}; " if s.get("total")
                                          is not None else "") + ring)
    ml, of = rep["memlock"], rep["open_files"]
    lines.append(f"memlock: {_fmt_limit(ml['soft'])} (hard {_fmt_limit(ml['hard'])})   open files: {of['soft']} "
                 f"(hard {of['hard']})   cpus: {rep['cpus']}")
    t = rep["tcp_max_num_eps"]
    lines.append(f"UCX_TCP_MAX_NUM_EPS: {t['value']} ({t['source']})")
    lines.append("UCX settings in force: " + " ".join(f"{k}={v}" for k, v in sorted(rep["ucx_settings"].items())))
    lb = rep.get("loopback")
    if lb:
        lines.append(f"loopback: {lb['transfers']} x {_size(lb['bytes'])} in {lb['seconds']:.2f} s: "
                     f"{lb['gbps']:.2f} GB/s (two endpoints of one process)")
    if rep.get("expect"):
        lines.append(f"expect: {rep['expect']}")
    lines += [f"PROBLEM: {p}" for p in rep["problems"]]
    lines += [f"WARNING: {w}" for w in rep["warnings"]]
    lines += [f"note: {n}" for n in rep["notes"]]
    if rep["problems"]:
        lines.append(f"{len(rep['problems'])} problem(s): serving would fail here (exit 1)")
    elif rep["warnings"]:
        lines.append(f"no problems; {len(rep['warnings'])} warning(s): serving works, see above")
    else:
        lines.append("OK: no problems or warnings")
    return "\n".join(lines)


def _fmt_limit(v) -> str:
    return v if isinstance(v, str) else _size(v)
