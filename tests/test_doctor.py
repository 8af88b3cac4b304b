"""`ucxx-transport doctor`: transports by kind, limits, /dev/shm, UCX settings, a loopback
transfer and what to expect; non-zero exit on what would break serving; TCP only is a warning."""

import json
import os
import subprocess
import sys

import pytest

from ucxx_transport import doctor

pytestmark = pytest.mark.timeout(120)


def run_doctor(*args, env=None, drop=()):
    e = {k: v for k, v in os.environ.items() if not k.startswith("UCXX_TRANSPORT_") and k not in drop}
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "ucxx_transport", "doctor", *args], capture_output=True, text=True,
                          timeout=90, env=e)


def test_report_names_transports_limits_settings_and_throughput():
    r = run_doctor(drop=("UCX_TCP_MAX_NUM_EPS",))
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    for kind in ("TCP", "shared memory", "RDMA/verbs", "CUDA"):
        assert f"\n  {kind} " in out, kind
    assert "tcp (" in out
    for field in ("memlock: ", "/dev/shm: ", "progress mode: adaptive (default", "UCX settings in force: ",
                  "UCX_TCP_MAX_NUM_EPS: 256 (UCX default)", "expect: "):
        assert field in out, field
    assert "GB/s (two endpoints of one process)" in out and "loopback: " in out
    assert "PROBLEM" not in out
    if "RDMA/verbs     none" in out:  # a TCP-only machine is a warning, never an "OK"
        assert "WARNING: TCP only: expect ~1-5 GB/s" in out
        assert "OK" not in out


def test_json_report_has_the_same_fields():
    r = run_doctor("--json", env={"UCX_TCP_MAX_NUM_EPS": "1024"})
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads(r.stdout)
    assert rep["problems"] == [] and "tcp" in rep["transports"] and rep["transport_kinds"]["TCP"] == ["tcp"]
    assert set(rep["transport_kinds"]) == {"TCP", "shared memory", "RDMA/verbs", "CUDA", "other"}
    assert all(rep["devices"][tl] for tl in rep["transports"])
    assert rep["tcp_max_num_eps"] == {"value": 1024, "source": "environment"}
    assert rep["memlock"]["soft"] and rep["dev_shm"]["free"] > 0 and rep["dev_shm"]["ring_bytes"] > 0
    assert rep["progress_mode"] == rep["progress_mode_in_force"] == "adaptive"
    assert rep["ucx_settings"]["UCX_TCP_MAX_NUM_EPS"] == "1024"
    assert rep["ucx_settings"]["UCX_TCP_MAX_POLL"] == "1"  # ours, since the environment sets none
    lb = rep["loopback"]
    assert lb["transfers"] >= 1 and lb["gbps"] > 0 and lb["seconds"] < 5
    assert rep["expect"]


def test_a_ring_too_large_for_dev_shm_and_a_bad_knob_are_problems_exit_1():
    r = run_doctor(env={"UCXX_TRANSPORT_SLOTS": "65536", "UCXX_TRANSPORT_SLOT_BYTES": "1GiB",
                        "UCXX_TRANSPORT_PROGRESS_MODE": "fast"})
    assert r.returncode == 1, r.stdout + r.stderr
    assert "PROBLEM: /dev/shm has " in r.stdout and "65536 slots x 1GiB needs" in r.stdout
    assert "PROBLEM: invalid progress_mode 'fast'" in r.stdout and "serve would refuse it" in r.stdout
    assert "serving would fail here (exit 1)" in r.stdout


def test_ucxx_not_importable_is_a_problem_exit_1(tmp_path):
    (tmp_path / "ucxx").mkdir()
    (tmp_path / "ucxx" / "__init__.py").write_text("raise ImportError('libucxx.so: cannot open shared object')\n")
    r = run_doctor("--json", env={"PYTHONPATH": str(tmp_path)})
    assert r.returncode == 1, r.stdout + r.stderr
    rep = json.loads(r.stdout)
    assert any(p.startswith("ucxx does not import (libucxx.so") for p in rep["problems"]), rep["problems"]
    assert rep["ucxx_version"] is None and rep["dev_shm"]["free"] > 0  # the other checks still ran


CONTEXT_INFO = """#
#      resource 0  :  md 0  dev 0  flags -- self/memory
#      resource 1  :  md 1  dev 1  flags -- tcp/eth0
#      resource 2  :  md 1  dev 2  flags -- tcp/ib0
#      resource 3  :  md 2  dev 0  flags -- posix/memory
#      resource 4  :  md 5  dev 3  flags -- rc_mlx5/mlx5_0:1
#      resource 5  :  md 5  dev 3  flags -- dc_mlx5/mlx5_0:1
#      resource 6  :  md 6  dev 4  flags -- cuda_copy/cuda
#      resource 7  :  md 7  dev 4  flags -- cuda_ipc/cuda
#      resource 8  :  md 8  dev 5  flags -- gdr_copy/gdr
"""


def test_rdma_and_cuda_are_classified_and_no_tcp_only_warning():
    devices = doctor.parse_resources(CONTEXT_INFO)
    assert devices["tcp"] == ["eth0", "ib0"] and devices["rc_mlx5"] == ["mlx5_0:1"]
    assert [doctor.kind_of(t) for t in ("tcp", "posix", "cma", "rc_mlx5", "dc_mlx5", "ud_verbs", "cuda_ipc",
                                         "gdr_copy", "self")] == \
        ["TCP", "shared memory", "shared memory", "RDMA/verbs", "RDMA/verbs", "RDMA/verbs", "CUDA", "CUDA", "other"]
    kinds = {k: [] for k, _ in doctor.TRANSPORT_KINDS} | {"other": []}
    for tl in sorted(devices):
        kinds[doctor.kind_of(tl)].append(tl)
    rep = {"problems": [], "warnings": [], "notes": [], "transport_kinds": kinds, "devices": devices,
           "loopback": {"gbps": 3.0}}
    doctor._expectation(rep)
    assert not any("TCP only" in w for w in rep["warnings"])
    assert "RDMA/verbs on mlx5_0:1" in rep["expect"] and "cuda_ipc" in rep["expect"] and "gdr_copy" in rep["expect"]


def test_our_ucx_defaults_never_override_the_environment(monkeypatch):
    from ucxx_transport import engine

    monkeypatch.delenv("UCX_TCP_MAX_POLL", raising=False)
    monkeypatch.setenv("UCX_TCP_TX_SEG_SIZE", "64K")
    settings = engine.ucx_settings()
    assert settings["UCX_TCP_MAX_POLL"] == "1" and settings["UCX_TCP_TX_SEG_SIZE"] == "64K"
    engine.apply_ucx_defaults()
    assert os.environ["UCX_TCP_MAX_POLL"] == "1" and os.environ["UCX_TCP_TX_SEG_SIZE"] == "64K"


def test_the_progress_spin_knob_reaches_the_adaptive_driver():
    code = ("from ucxx_transport import engine; engine.acquire(); "
            "print(engine._engine.driver.spin_s); engine.release()")
    env = {**os.environ, "UCXX_TRANSPORT_PROGRESS_SPIN_S": "0", "UCXX_TRANSPORT_PROGRESS_MODE": "adaptive"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0.0"
    bad = subprocess.run([sys.executable, "-m", "ucxx_transport", "serve", "--ring", "no-such-ring-x",
                          "--progress-spin-s", "-1"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "progress_spin_s" in bad.stderr and "UCXX_TRANSPORT_PROGRESS_SPIN_S" in bad.stderr
