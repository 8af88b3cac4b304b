"""The CLI's logging flags: ``--log-level`` and ``--log-format`` (text or JSON lines),
accepted before or after any command, with their environment variables."""

from __future__ import annotations

import argparse
import logging
import sys

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_LEVEL_HELP = "one of DEBUG (logs every request, and the traceback of an error), INFO, WARNING, ERROR, " \
                 "CRITICAL; before or after the command [env UCXX_TRANSPORT_LOG_LEVEL; default INFO, ERROR for " \
                 "status and doctor]"
LOG_FORMATS = ("text", "json")
LOG_FORMAT_HELP = "text (default) or json: one JSON object per line with time, level, logger, message " \
                  "(python-json-logger); before or after the command [env UCXX_TRANSPORT_LOG_FORMAT]"


def log_level(text: str) -> str:
    """``text`` as a level name; ArgumentTypeError names the accepted ones."""
    if text.upper() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"invalid log level {text!r}: use one of {', '.join(LOG_LEVELS)}")
    return text.upper()


def log_format(text: str) -> str:
    """``text`` as a format name; ArgumentTypeError names the accepted ones."""
    if text.lower() not in LOG_FORMATS:
        raise argparse.ArgumentTypeError(f"invalid log format {text!r}: use one of {', '.join(LOG_FORMATS)}")
    return text.lower()


def setup(level: str, fmt: str = "text") -> None:
    """Log to stderr at ``level``, as text lines or one JSON object per line."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s",
                                           rename_fields={"asctime": "time", "levelname": "level", "name": "logger"}))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])
