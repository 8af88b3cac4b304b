"""`ucxx-transport doctor`: what UCX sees here, and what to change."""

from __future__ import annotations

import os
import resource
import shutil


def run() -> dict:
    rep: dict = {"problems": [], "advice": []}
    try:
        import ucxx

        rep["ucxx_version"] = getattr(ucxx, "__version__", "?")
        rep["ucx_version"] = ucxx.__ucx_version__
    except Exception as exc:
        rep["ucxx_version"] = None
        rep["problems"].append(f"ucxx does not import ({exc}): pip install 'ucxx-transport[cu12]' (or [cu13])")
        ucxx = None
    from . import engine

    rep["progress_mode"] = os.environ.get("UCXX_TRANSPORT_PROGRESS_MODE") or engine.DEFAULT_PROGRESS_MODE
    rep["endpoint_error_handling"] = True
    rep["advice"].append("endpoint error handling is on (needed to detect dead peers): UCX uses tcp even on one "
                         "host; same-host trainers should use the local fast path (default) for full speed")
    if ucxx is not None:
        try:
            engine.init()
            rep["transports"] = sorted({str(t) for t in ucxx.get_active_transports()})
        except Exception as exc:
            rep["transports"] = None
            rep["problems"].append(f"UCX failed to initialise: {exc}")
        finally:
            engine.reset()
    rep["ucx_env"] = {k: os.environ.get(k) for k in ("UCX_TLS", "UCX_NET_DEVICES", "UCX_RNDV_THRESH")}
    rep["ucx_env"].update(engine.ucx_settings())  # ours unless the environment overrides them
    for k, v in engine.UCX_DEFAULTS.items():
        if os.environ.get(k, v) != v:
            rep["advice"].append(f"{k}={os.environ[k]} from the environment overrides our default {v}")
    try:
        du = shutil.disk_usage("/dev/shm")
        rep["dev_shm"] = {"total": du.total, "free": du.free}
        if du.total < (1 << 30):
            rep["problems"].append(f"/dev/shm is only {du.total >> 20} MiB: rings need slots x slot_bytes; "
                                   f"enlarge it (docker: --shm-size=16g; k8s: an emptyDir with medium Memory)")
    except OSError as exc:
        rep["problems"].append(f"/dev/shm is not usable: {exc}")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    rep["open_files"] = {"soft": soft, "hard": hard}
    if soft < 4096:
        rep["advice"].append(f"open-file limit is {soft}: raise it (ulimit -n 65536) for many clients/endpoints")
    rep["cpus"] = os.cpu_count()
    if (os.cpu_count() or 1) <= 2 and rep["progress_mode"].startswith("thread"):
        rep["advice"].append("on 2 cores 'thread' progress measured ~20x slower round trips than 'adaptive'")
    return rep


def format_report(rep: dict) -> str:
    lines = [
        f"ucxx {rep.get('ucxx_version')}  UCX {rep.get('ucx_version')}",
        f"progress mode: {rep['progress_mode']}   endpoint error handling: {rep['endpoint_error_handling']}",
        f"transports: {rep.get('transports')}",
        f"/dev/shm: {rep.get('dev_shm')}",
        f"open files: {rep['open_files']}   cpus: {rep['cpus']}",
        f"UCX env: {rep.get('ucx_env')}",
    ]
    for p in rep["problems"]:
        lines.append(f"PROBLEM: {p}")
    for a in rep["advice"]:
        lines.append(f"note: {a}")
    if not rep["problems"]:
        lines.append("OK: no problems found")
    return "\n".join(lines)
