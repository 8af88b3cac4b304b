"""Every configuration knob, defined once: CLI flag, environment variable
``UCXX_TRANSPORT_*``, default, parser and validation.

Precedence: explicit argument / CLI flag > environment variable > default.
A bad value raises :class:`ConfigError` naming the knob, its flag and its
environment variable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

from .engine import DEFAULT_PROGRESS_MODE, PROGRESS_MODES
from .units import parse_duration, parse_size


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the knob and the fix."""


def _ports(text: str) -> list[int]:
    ports = [int(p) for p in str(text).replace(" ", "").split(",") if p != ""]
    if not ports or any(not 0 <= p <= 65535 for p in ports):
        raise ValueError("expected a comma-separated list of ports in 0..65535 (0 = any free port)")
    if len(ports) > 16:
        raise ValueError("at most 16 ports")
    nonzero = [p for p in ports if p]
    if len(set(nonzero)) != len(nonzero):
        raise ValueError("duplicate ports")
    return ports


def _int_range(lo: int, hi: int) -> Callable[[str], int]:
    def parse(text):
        v = int(text)
        if not lo <= v <= hi:
            raise ValueError(f"must be in [{lo}, {hi}]")
        return v
    return parse


def _positive_duration(text) -> float:
    v = parse_duration(text)
    if v <= 0:
        raise ValueError("must be > 0")
    return v


def _duration_at_least_zero(text) -> float:
    v = parse_duration(text)
    if v < 0:
        raise ValueError("must be >= 0")
    return v


def _choice(choices: Callable[[], tuple[str, ...]]) -> Callable[[str], str]:
    def parse(text):
        if text not in choices():
            raise ValueError(f"must be one of {', '.join(choices())}")
        return text
    return parse


def _progress_modes() -> tuple[str, ...]:
    return PROGRESS_MODES  # the engine defines the modes it runs


def _on_full_policies() -> tuple[str, ...]:
    from shm.layout import ON_FULL_CODES  # the ring defines its policies (imports shm: only when asked)

    return tuple(ON_FULL_CODES)


def _log_levels() -> tuple[str, ...]:
    from .logs import LOG_LEVELS

    return LOG_LEVELS


def _log_formats() -> tuple[str, ...]:
    from .logs import LOG_FORMATS

    return LOG_FORMATS


def _bool(text) -> bool:
    if isinstance(text, bool):
        return text
    t = str(text).strip().lower()
    if t in ("1", "true", "yes", "on", "y"):
        return True
    if t in ("0", "false", "no", "off", "n"):
        return False
    raise ValueError("must be true/false")


@dataclass(frozen=True)
class Knob:
    name: str
    default: Any
    parse: Callable[[Any], Any]
    help: str
    #: the accepted values of a choice knob, from the module that defines them
    choices: Callable[[], tuple[str, ...]] | None = None
    #: the default as ``--help`` words it, where it is not one value
    default_help: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "UCXX_TRANSPORT_" + self.name.upper()


KNOBS: dict[str, Knob] = {k.name: k for k in [
    # server
    Knob("host", None, str, "address advertised in refs (default: this host's primary IP, else 127.0.0.1)"),
    Knob("ports", None, _ports, "comma-separated listener ports; 0 = any free port (overrides --n-ports)"),
    Knob("n_ports", 4, _int_range(1, 16), "number of listener ports when --ports is not given (any free ports)"),
    Knob("token_file", None, str, "file holding the shared-secret token clients must present (HELLO)"),
    Knob("progress_mode", DEFAULT_PROGRESS_MODE, _choice(_progress_modes),
         "UCX progress mode (adaptive: poll under load, sleep when idle; see docs/PROGRESS_MODES.md)",
         _progress_modes),
    Knob("progress_spin_s", 0.002, _duration_at_least_zero, "adaptive progress: how long a process keeps "
         "polling after its last UCX traffic before it sleeps (0: sleep at once; lower latency after pauses on "
         "VMs whose idle vCPUs wake slowly, fewer payloads/s in a stream; see docs/PROGRESS_MODES.md)"),
    Knob("ack_timeout_s", 10.0, _positive_duration, "seconds a handler waits for a client's ACK before "
         "returning the payload to READY"),
    Knob("idle_timeout_s", 120.0, _positive_duration, "seconds an idle endpoint is kept before eviction"),
    Knob("metrics_port", None, _int_range(0, 65535), "serve Prometheus metrics on this port (needs prometheus-client)"),
    Knob("metrics_host", None, str, "address the metrics endpoint binds (default: the serve --host; 0.0.0.0 for "
         "every interface)"),
    Knob("min_rate", 4 << 20, lambda t: _size_min(t, 1024), "bytes/s the slowest link is expected to sustain: "
         "a payload transfer's deadline is the base deadline + nbytes / min_rate (server ACK wait, client call)"),
    Knob("directory_file", None, str, "register in this JSON directory file and heartbeat while serving "
         "(a StaticDirectory; see docs/DEPLOYMENT.md)"),
    Knob("max_take", 256, _int_range(1, 256), "most payloads one TAKE request (batched or not) may return"),
    Knob("slots", 64, _int_range(1, 65536), "ring slots (with --create)"),
    Knob("slot_bytes", 64 << 20, lambda t: _size_min(t, 4096), "bytes per slot, e.g. 64MiB (with --create)"),
    Knob("on_full", "block", _choice(_on_full_policies), "writer policy when no slot is FREE", _on_full_policies),
    # client
    Knob("timeout", 5.0, _positive_duration, "client: deadline of one network call (seconds)"),
    Knob("max_attempts", 2, _int_range(1, 20), "client: attempts per ref for transient errors"),
    Knob("max_rounds", 3, _int_range(1, 20), "client: rounds of a batch fetch"),
    Knob("quarantine_s", 30.0, _positive_duration, "client: seconds a failing (host, port) is skipped"),
    Knob("endpoint_max_age_s", 100.0, _positive_duration, "client: pooled endpoints older than this are replaced"),
    Knob("pool_size", 2, _int_range(1, 64), "client: pooled endpoints per (host, port)"),
    Knob("max_inflight", 16, _int_range(1, 1024), "client: concurrent requests of a batch fetch"),
    Knob("max_idle_endpoints", None, _int_range(1, 1 << 20), "client: idle pooled endpoints kept in all, least "
         "recently used closed first (default: 3/4 of UCX_TCP_MAX_NUM_EPS, i.e. 192)"),
    Knob("max_idle_per_server", None, _int_range(1, 1 << 16), "client: idle pooled endpoints kept per server, "
         "across its ports (default: no cap beyond --pool-size per port)"),
    Knob("endpoint_idle_s", 60.0, _positive_duration, "client: a pooled endpoint idle this long is closed"),
    Knob("direct_calls", True, _bool, "client: run a sync call's network exchange in the calling thread, "
         "on an event loop of its own that progresses the same UCX worker (no hand-over to the UCX loop thread "
         "and back: a 4 KiB fetch 2x faster on a 2-core VM); off: every call runs on the UCX loop thread"),
    # logging (the CLI's flags, accepted before or after any command)
    Knob("log_level", None, lambda t: _choice(_log_levels)(str(t).upper()),
         "DEBUG logs every request (and the traceback of an error)", _log_levels,
         default_help="INFO; ERROR for status and doctor"),
    Knob("log_format", "text", lambda t: _choice(_log_formats)(str(t).lower()),
         "text lines, or json: one object per line with time, level, logger, message (python-json-logger)",
         _log_formats),
]}


def _size_min(text, lo: int) -> int:
    v = parse_size(text)
    if v < lo:
        raise ValueError(f"must be >= {lo} bytes")
    return v


def resolve(name: str, value: Any = None, *, env: dict | None = None) -> Any:
    """The effective value of knob ``name`` given an explicit ``value`` (None = unset)."""
    knob = KNOBS[name]
    env = os.environ if env is None else env
    source = "argument"
    if value is None:
        raw = env.get(knob.env)
        if raw is None or raw == "":
            return knob.default
        value, source = raw, f"environment variable {knob.env}"
    if isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    if name in ("host", "token_file", "directory_file"):
        return value
    try:
        return knob.parse(value)
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"invalid {name} {value!r} (from {source}; flag {knob.flag}, env {knob.env}): {exc}"
        ) from None


def help_text(name: str) -> str:
    """The ``--help`` line of knob ``name``: what it does, its choices, variable and default."""
    k = KNOBS[name]
    choices = f"; one of {', '.join(k.choices())}" if k.choices else ""
    return f"{k.help}{choices} [env {k.env}; default {k.default if k.default_help is None else k.default_help}]"
