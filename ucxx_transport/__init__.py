"""The UCXX transport service: wire protocol, server, config, metrics, CLI.

Importing this package does not import ucxx; the server module does.
"""

import os as _os

# Set before ucxx is first imported anywhere in the process.
_os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
_os.environ.setdefault("UCX_TCP_CM_REUSEADDR", "y")

__all__ = ["TransportServer"]


def __getattr__(name):
    if name == "TransportServer":
        from .server import TransportServer

        return TransportServer
    raise AttributeError(name)
