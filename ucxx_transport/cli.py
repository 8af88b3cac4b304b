"""`ucxx-transport` command line: serve, status, doctor, bench.

Every knob also reads its ``UCXX_TRANSPORT_*`` environment variable; the
help of each subcommand lists them with their defaults.

An expected failure (bad flag, unreachable server, refused token, missing
ring...) ends the command with one line on stderr,
``ucxx-transport: error: <what happened>; <what to do>``, and an
:class:`ExitCode`; only a bug shows a traceback (``--log-level DEBUG`` logs
one for expected failures too).

Why one module past 400 lines: it is the composition root, the one place that
wires ring, server, metrics and clients together; each command's logic beyond
wiring lives in its own module (``status``, ``doctor``, ``logs``, ``config``).
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import json
import logging
import os
import signal
import sys
import threading

from . import doctor, logs, status
from .config import KNOBS, ConfigError, help_text, resolve

log = logging.getLogger("ucxx_transport.cli")

EPILOG_ENV = "Every option also reads an environment variable UCXX_TRANSPORT_<OPTION> (e.g. UCXX_TRANSPORT_PORTS); " \
             "the command line wins over the environment."


class ExitCode(enum.IntEnum):
    """Exit status of every command; documented in docs/OPERATIONS.md ("Exit codes")."""

    OK = 0
    #: an expected failure not listed below (a port in use, a missing optional package,
    #: a busy server); ``doctor``: it found a problem
    ERROR = 1
    #: a bad flag, option value or environment variable (argparse's own code)
    USAGE = 2
    #: no server answered at the address: connection refused, timed out or lost; no address known
    UNREACHABLE = 3
    #: the server refused our token (or wants one)
    AUTH = 4
    #: the ring is missing, not ours, already exists (``--create``), or of another layout
    RING = 5
    #: interrupted (Ctrl-C)
    INTERRUPTED = 130


class CommandError(Exception):
    """An expected failure with its exit code and what to do (``hint``; None when
    the message already says it)."""

    def __init__(self, message: str, code: ExitCode = ExitCode.ERROR, hint: str | None = None):
        super().__init__(message)
        self.code = code
        self.hint = hint


def _expected_failures() -> tuple:
    """The one table of expected failures: (exception types, exit code, what to do),
    first match wins. Anything else is a bug and keeps its traceback."""
    import shm
    from clients.errors import (
        AuthError,
        CallTimeoutError,
        ConnectionLostError,
        NoAddressError,
        TransientTransportError,
        TransportError,
    )

    return (
        (CommandError, None, None),  # carries its own code and hint
        (ConfigError, ExitCode.USAGE, "see `ucxx-transport {cmd} --help`"),
        (AuthError, ExitCode.AUTH,
         "pass the token the server was started with: --token-file FILE (or UCXX_TRANSPORT_TOKEN_FILE)"),
        ((ConnectionLostError, CallTimeoutError, NoAddressError), ExitCode.UNREACHABLE, _UNREACHABLE_HINT),
        (TransientTransportError, ExitCode.ERROR, "the server is busy or restarting: try again"),
        (TransportError, ExitCode.ERROR, "see the server's log (--log-level DEBUG)"),
        (shm.RingLayoutError, ExitCode.RING, _RING_LAYOUT_HINT),
        (shm.RingError, ExitCode.ERROR, None),
        (ValueError, ExitCode.USAGE, "see `ucxx-transport {cmd} --help`"),
        ((ImportError, OSError), ExitCode.ERROR, None),
    )


_UNREACHABLE_HINT = "check that `ucxx-transport serve` runs there, that the port is one it printed, and " \
                    "that no firewall blocks it"
_RING_LAYOUT_HINT = "serve it with the ucxx-transport version that made it, or remove /dev/shm/RING (if no " \
                    "process uses it) and serve --create a new one"


def _expected_types() -> tuple:
    return tuple(t for types, _, _ in _expected_failures() for t in (types if isinstance(types, tuple) else (types,)))


def describe_failure(exc: BaseException, cmd: str) -> tuple[ExitCode, str]:
    """The exit code and the one stderr line for an expected failure."""
    code, hint = ExitCode.ERROR, None
    for types, c, h in _expected_failures():
        if isinstance(exc, types):
            code, hint = (exc.code, exc.hint) if isinstance(exc, CommandError) else (c, h)
            break
    what = " ".join(str(exc).split()) or type(exc).__name__
    line = f"ucxx-transport: error: {what}"
    if hint:
        line += "; " + hint.replace("{cmd}", cmd)
    return code, line


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's one-line error (argparse prints the usage first)."""

    def error(self, message):
        sys.stderr.write(f"ucxx-transport: error: {' '.join(message.split())}; see `{self.prog} --help`\n")
        sys.exit(ExitCode.USAGE)


def _add(p: argparse.ArgumentParser, name: str, **kw):
    k = KNOBS[name]
    if k.choices:  # validated by resolve() like the environment variable; listed in the usage line
        kw.setdefault("metavar", "{" + ",".join(k.choices()) + "}")
    p.add_argument(k.flag, dest=name, default=None, help=help_text(name), **kw)


#: commands that print a result or one error line: their logs start at ERROR unless asked
QUIET_COMMANDS = ("status", "doctor")


def _knob_type(name: str):
    """An argparse ``type`` checking a flag by its knob (the message names the knob and its variable)."""
    def parse(text):
        try:
            return resolve(name, text)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return parse


def _add_log_flags(p: argparse.ArgumentParser, default) -> None:
    for name in ("log_level", "log_format"):  # checked when parsed: the flag may follow any command
        k = KNOBS[name]
        p.add_argument(k.flag, dest=name, type=_knob_type(name), default=default,
                       metavar="{" + ",".join(k.choices()) + "}", help=help_text(name) + "; before or after the command")


# ------------------------------------------------------------------ serve ---
def cmd_serve(a) -> int:
    import shm

    from . import engine

    token = _read_token(resolve("token_file", a.token_file))
    # every flag and variable is validated before anything is created
    knobs = {name: resolve(name, getattr(a, name)) for name in (
        "slots", "slot_bytes", "on_full", "ports", "n_ports", "ack_timeout_s", "idle_timeout_s", "max_take",
        "min_rate", "metrics_port", "metrics_host", "directory_file")}
    spin = resolve("progress_spin_s", a.progress_spin_s)  # checked before anything starts
    os.environ[KNOBS["progress_spin_s"].env] = str(spin)  # one value per process: the engine reads it there
    engine.resolve_mode(resolve("progress_mode", a.progress_mode))
    if a.create and a.attach_existing:
        raise ConfigError("--create and --attach-existing exclude each other")
    if a.create:
        try:
            ring = shm.RingBuffer.create(a.ring, slots=knobs["slots"], slot_bytes=knobs["slot_bytes"],
                                         on_full=knobs["on_full"])
        except FileExistsError:
            raise CommandError(
                f"ring {a.ring!r} already exists (/dev/shm/{a.ring}): --create only makes a new ring",
                ExitCode.RING, "serve the existing one with --attach-existing (it must be yours, mode 0600), or "
                "remove it first if no process uses it") from None
        except (shm.RingError, OSError) as exc:
            raise _ring_error(exc, a.ring) from exc
    else:
        ring = _attach_ring(a.ring)
    try:
        return _serve(a, ring, token, knobs)
    finally:
        ring.close()
        if a.unlink_on_exit:
            shm.RingBuffer.unlink_name(a.ring)


def _read_token(path: str | None) -> bytes | None:
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            token = f.read().strip()
    except OSError as exc:
        raise CommandError(f"cannot read --token-file {path!r}: {exc.strerror or exc}", ExitCode.USAGE,
                           "check the path and its permissions (or UCXX_TRANSPORT_TOKEN_FILE)") from None
    if not token:
        raise CommandError(f"--token-file {path!r} is empty", ExitCode.USAGE, "put the server's token in it")
    return token


def _ring_error(exc: BaseException, name: str) -> CommandError:
    import shm

    # shm's own messages say what to do, except for a layout it cannot read
    hint = _RING_LAYOUT_HINT.replace("RING", name) if isinstance(exc, shm.RingLayoutError) else None
    return CommandError(str(exc), ExitCode.RING, hint)


def _attach_ring(name: str):
    import shm

    try:
        return shm.RingBuffer.attach(name)
    except (shm.RingError, OSError) as exc:
        raise _ring_error(exc, name) from exc


def _serve(a, ring, token, knobs) -> int:
    import shm

    from .server import TransportServer, is_loopback

    srv = TransportServer(ring, host=a.host, ports=knobs["ports"], n_ports=a.n_ports, token=token,
                          ack_timeout_s=knobs["ack_timeout_s"], idle_timeout_s=knobs["idle_timeout_s"],
                          progress_mode=a.progress_mode, max_take=knobs["max_take"], min_rate=knobs["min_rate"])
    stop = threading.Event()
    registration = None

    def on_signal(signum, frame):
        log.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        ports = srv.start()
    except shm.RingError as exc:  # another live server owns the ring
        raise _ring_error(exc, ring.name) from exc
    host, _ = srv.address
    if token is None:
        # ucxx's Python API binds listeners on every interface whatever --host says
        log.warning("no --token-file: any host that can reach ports %s may read every payload of ring %r "
                    "(listeners accept on all interfaces%s); set a token or firewall these ports",
                    ports, ring.name, "" if not is_loopback(host) else ", even with a loopback --host")
    try:
        if knobs["metrics_port"] is not None:
            _start_metrics(srv, knobs["metrics_port"], knobs["metrics_host"] or host)
        if knobs["directory_file"]:
            from .directory import StaticDirectory, register_server

            registration = register_server(StaticDirectory(path=knobs["directory_file"]), srv)
        sys.stdout.write(json.dumps({"ring": ring.name, "ring_id": ring.ring_id, "host": host, "ports": ports,
                                     "pid": os.getpid()}) + "\n")
        sys.stdout.flush()
        while not stop.wait(0.5):
            if not srv.running:
                log.error("server thread exited unexpectedly")
                return ExitCode.ERROR
    finally:
        if registration is not None:
            registration.stop()
        srv.stop()
    return 0


def _start_metrics(srv, port: int, addr: str):
    try:
        from prometheus_client import CollectorRegistry, start_http_server
    except ImportError:
        raise ConfigError("--metrics-port needs prometheus-client: pip install 'ucxx-transport[metrics]'") from None
    from .metrics import prometheus_collector

    reg = CollectorRegistry()
    reg.register(prometheus_collector(srv.snapshot))
    try:
        start_http_server(port, addr=addr, registry=reg)
    except OSError as exc:
        raise CommandError(f"cannot serve metrics on {addr}:{port}: {exc.strerror or exc}", ExitCode.ERROR,
                           "pick a free --metrics-port (or 0 for any)") from exc
    log.info("Prometheus metrics on %s:%d/metrics", addr, port)


# ----------------------------------------------------------------- status ---
def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def cmd_status(a) -> int:
    if bool(a.ring) == bool(a.address):
        raise ConfigError("status needs exactly one of --ring NAME (local) or --address HOST:PORT (remote)")
    if a.count is not None and a.watch is None:
        raise ConfigError("--count needs --watch")
    with contextlib.ExitStack() as stack:
        sample = _ring_sampler(a.ring, stack, detail=a.watch is None) if a.ring else _server_sampler(a, stack)
        if a.watch is not None:
            return status.watch(sample, a.watch, a.count, sys.stdout, as_json=a.json)
        info = sample()
    if a.json:
        print(json.dumps(info, indent=1))
    else:
        print(status.format_ring(info) if a.ring else status.format_server(info))
    return 0


def _ring_sampler(name: str, stack: contextlib.ExitStack, detail: bool):
    ring = stack.enter_context(_attach_ring(name))

    def sample() -> dict:
        info = ring.stats()
        info["stuck_slots"] = ring.stuck_slots()
        addr = ring.server_address()
        info["server"] = {"host": addr[0], "ports": list(addr[1])} if addr else None
        if detail:
            info["slots_detail"] = ring.slot_info()
        return info
    return sample


def _server_sampler(a, stack: contextlib.ExitStack):
    host, _, port = a.address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--address must be HOST:PORT, got {a.address!r}")
    from clients.client import TransportClient
    from clients.errors import CallTimeoutError, ConnectionLostError

    token = _read_token(resolve("token_file", a.token_file))
    # a refused connection fails in milliseconds; a silent host at --timeout
    c = stack.enter_context(TransportClient(token=token, timeout=a.timeout, local_fast_path=False))

    def sample() -> dict:
        try:
            return c.server_stats((host, [int(port)]))
        except (ConnectionLostError, CallTimeoutError) as exc:
            why = f"no answer within {c.timeout:g} s" if isinstance(exc, CallTimeoutError) else \
                "connection refused or lost"
            raise CommandError(f"no ucxx-transport server answered at {host}:{port} ({why})",
                               ExitCode.UNREACHABLE, _UNREACHABLE_HINT) from exc
    return sample


# ----------------------------------------------------------------- doctor ---
def cmd_doctor(a) -> int:
    report = doctor.run()
    if a.json:
        print(json.dumps(report, indent=1))
    else:
        print(doctor.format_report(report))
    return ExitCode.OK if not report["problems"] else ExitCode.ERROR


# ------------------------------------------------------------------ main ----
def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="ucxx-transport",
        description="Zero-copy UCXX transport for RL rollout payloads: serve a shared-memory ring over UCX, "
                    "inspect it, benchmark it.",
        epilog="Quick start: ucxx-transport serve --ring rollouts --create --slots 16 --slot-bytes 4MiB\n"
               "             (a ring takes about slots x (slot_bytes + 4 KiB) of /dev/shm: 64 MiB here)\n"
               "             ucxx-transport status --ring rollouts --watch\n"
               "             ucxx-transport bench --quick\n" + EPILOG_ENV + "\n"
               "Exit codes: " + ", ".join(f"{c.value} {c.name.lower()}" for c in ExitCode) +
               " (docs/OPERATIONS.md).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_log_flags(p, None)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    s = sub.add_parser("serve", help="serve a ring over UCX until SIGTERM/SIGINT",
                       description="Serve one ring over UCX. When ready, prints one JSON line to stdout: "
                                   '{"ring", "host", "ports", "pid"}; logs go to stderr. SIGTERM/SIGINT stop it '
                                   "gracefully (leases return to READY) and exit 0.",
                       epilog=EPILOG_ENV)
    s.add_argument("--ring", required=True, help="ring name (a file in /dev/shm)")
    s.add_argument("--create", action="store_true",
                   help="create a new ring (an error if /dev/shm/RING exists: see --attach-existing)")
    s.add_argument("--attach-existing", action="store_true",
                   help="serve an existing ring (the default without --create; it must be owned by you, mode 0600)")
    s.add_argument("--unlink-on-exit", action="store_true", help="remove the ring segment when the server exits")
    for name in ("slots", "slot_bytes", "on_full", "host", "ports", "n_ports", "token_file", "progress_mode",
                 "progress_spin_s", "metrics_port", "metrics_host", "ack_timeout_s", "idle_timeout_s", "max_take", "min_rate",
                 "directory_file"):
        _add(s, name)
    s.set_defaults(func=cmd_serve)

    st = sub.add_parser("status", help="show a ring's slots (--ring) or a running server's metrics (--address); "
                                       "--watch for a live view",
                        description=status.DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    st.add_argument("--ring", help="local ring name: slot states, generations, drops, owner pids")
    st.add_argument("--address", help="HOST:PORT of a running server: its metrics")
    _add(st, "token_file")
    _add(st, "timeout")
    st.add_argument("--json", action="store_true", help="machine-readable output (with --watch: one JSON object "
                                                        "per refresh and line)")
    st.add_argument("--watch", nargs="?", type=status.watch_interval, const=status.WATCH_DEFAULT_S, default=None,
                    metavar="SECONDS", help=f"refresh a live view every SECONDS (default {status.WATCH_DEFAULT_S:g}) "
                                            "until Ctrl-C")
    st.add_argument("--count", type=_positive_int, default=None, metavar="N",
                    help="with --watch: stop after N refreshes")
    st.set_defaults(func=cmd_status)

    d = sub.add_parser("doctor", help="check UCX, transports, progress mode, /dev/shm and limits; say what to fix",
                       description=doctor.DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("--json", action="store_true",
                   help="the same report as one JSON object (problems, warnings and notes as lists)")
    d.set_defaults(func=cmd_doctor)

    from benchmarks import end_to_end as bench  # the CLI is the one place that wires layers together

    bench.add_parser(sub)
    for command in sub.choices.values():  # the logging flags may also follow any command
        _add_log_flags(command, argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        level = resolve("log_level", a.log_level) or ("ERROR" if a.cmd in QUIET_COMMANDS else "INFO")
        fmt = resolve("log_format", a.log_format)
    except ConfigError as exc:
        parser.error(str(exc))
    logs.setup(level, fmt)
    try:
        return int(a.func(a) or 0)
    except KeyboardInterrupt:
        print("ucxx-transport: error: interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
    except _expected_types() as exc:
        log.debug("%s failed", a.cmd, exc_info=exc)
        code, line = describe_failure(exc, a.cmd)
        print(line, file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
