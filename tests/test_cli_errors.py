"""Every expected CLI failure: one line on stderr, no traceback, the documented exit code.

Real subprocesses (`python -m ucxx_transport ...`), as an operator runs them.
"""

import os
import pathlib
import re
import socket
import subprocess
import sys
import time

import pytest

from ucxx_transport.cli import ExitCode

ROOT = pathlib.Path(__file__).resolve().parent.parent


def cli(*args, timeout=60):
    env = {k: v for k, v in os.environ.items() if k not in ("UCXX_TRANSPORT_LOG_LEVEL", "UCXX_TRANSPORT_TOKEN_FILE")}
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "ucxx_transport", *args], capture_output=True, text=True,
                       timeout=timeout, env=env, cwd=ROOT)
    return r, time.monotonic() - t0


def one_error_line(r) -> str:
    """The single stderr line: 'ucxx-transport: error: <what>; <what to do>'."""
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    what, sep, todo = lines[0].removeprefix("ucxx-transport: error: ").partition("; ")
    assert lines[0].startswith("ucxx-transport: error: ") and what and sep and todo, lines[0]
    return lines[0]


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.mark.timeout(60)
def test_status_dead_address_fails_fast_with_one_line():
    port = closed_port()
    # a long --timeout: only the refused-connect fast path can make this quick
    r, took = cli("status", "--address", f"127.0.0.1:{port}", "--timeout", "30")
    line = one_error_line(r)
    assert r.returncode == ExitCode.UNREACHABLE == 3
    assert f"127.0.0.1:{port}" in line and "refused" in line
    assert took < 10, f"a refused connect took {took:.1f} s"


@pytest.mark.timeout(60)
def test_status_silent_address_times_out_at_timeout():
    with socket.socket() as s:  # accepts TCP, never speaks UCX
        s.bind(("127.0.0.1", 0))
        s.listen()
        r, took = cli("status", "--address", f"127.0.0.1:{s.getsockname()[1]}", "--timeout", "1")
    line = one_error_line(r)
    assert r.returncode == ExitCode.UNREACHABLE
    assert "no answer within 1 s" in line
    assert took < 15


@pytest.mark.timeout(60)
def test_debug_log_level_shows_the_traceback_too():
    r, _ = cli("--log-level", "DEBUG", "status", "--address", f"127.0.0.1:{closed_port()}")
    assert r.returncode == ExitCode.UNREACHABLE
    assert "Traceback" in r.stderr
    assert r.stderr.splitlines()[-1].startswith("ucxx-transport: error: no ucxx-transport server answered")


@pytest.mark.timeout(90)
def test_status_wrong_or_missing_token_is_auth_error(make_ring, ring_name, serve, tmp_path):
    make_ring()
    tok, bad = tmp_path / "tok", tmp_path / "bad"
    tok.write_text("right\n")
    bad.write_text("wrong\n")
    srv = serve(ring_name, "--n-ports", "1", "--token-file", str(tok))
    address = f"127.0.0.1:{srv.ports[0]}"
    for extra in (["--token-file", str(bad)], []):
        r, _ = cli("status", "--address", address, *extra)
        line = one_error_line(r)
        assert r.returncode == ExitCode.AUTH == 4, line
        assert "--token-file" in line
    r, _ = cli("status", "--address", address, "--token-file", str(tok), "--json")
    assert r.returncode == ExitCode.OK, r.stderr
    assert '"auth": true' in r.stdout


@pytest.mark.timeout(60)
def test_serve_missing_ring_is_ring_error(ring_name):
    r, _ = cli("serve", "--ring", ring_name)
    line = one_error_line(r)
    assert r.returncode == ExitCode.RING == 5
    assert ring_name in line and "--create" in line
    assert not os.path.exists(f"/dev/shm/{ring_name}")


@pytest.mark.timeout(60)
def test_serve_create_existing_ring_is_ring_error(make_ring, ring_name):
    make_ring()
    r, _ = cli("serve", "--ring", ring_name, "--create")
    assert r.returncode == ExitCode.RING
    assert "--attach-existing" in one_error_line(r)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args, says", [
    (["status"], "exactly one of --ring"),
    (["status", "--address", "nohost"], "HOST:PORT"),
    (["status", "--address", "127.0.0.1:1", "--token-file", "/nonexistent/tok"], "cannot read --token-file"),
    (["serve", "--ring", "x", "--slots", "0"], "--slots"),
    (["serve"], "--ring"),
    (["--log-level", "LOUD", "doctor"], "invalid log_level 'LOUD'"),
    (["doctor", "--log-level", "LOUD"], "invalid log_level 'LOUD'"),
    (["bench", "--log-format", "yaml"], "invalid log_format 'yaml'"),
    (["status", "--ring", "x", "--count", "2"], "--count needs --watch"),
    (["status", "--ring", "x", "--watch", "0"], "--watch must be > 0"),
    (["teleport"], "invalid choice"),
])
def test_usage_errors_are_one_line_exit_2(args, says):
    r, _ = cli(*args)
    line = one_error_line(r)
    assert r.returncode == ExitCode.USAGE == 2
    assert says in line


def test_exit_codes_are_documented():
    doc = (ROOT / "docs" / "OPERATIONS.md").read_text()
    section = doc.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| (\d+) \| (\w+) \|", section, re.M))
    assert rows == {str(c.value): c.name.lower() for c in ExitCode}


@pytest.mark.timeout(120)
def test_log_format_json_writes_one_json_object_per_line(make_ring, ring_name):
    import json
    import signal

    make_ring(slots=2)
    p = subprocess.Popen([sys.executable, "-m", "ucxx_transport", "serve", "--ring", ring_name, "--host",
                          "127.0.0.1", "--n-ports", "1", "--log-format", "json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert json.loads(p.stdout.readline())["ring"] == ring_name
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=30)
    finally:
        p.kill()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines, "no log lines"
    records = [json.loads(ln) for ln in lines]  # every line is a JSON object
    assert all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    assert any(r["message"].startswith("signal 15: stopping") for r in records)
    bad, _ = cli("status", "--ring", ring_name, "--log-format", "yaml")
    assert bad.returncode == ExitCode.USAGE and "invalid log_format 'yaml'" in one_error_line(bad)
