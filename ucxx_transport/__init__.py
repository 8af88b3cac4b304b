"""The UCXX transport service: wire protocol, server, config, metrics, CLI.

Importing this package does not import ucxx; the server module does.
"""

from .engine import apply_ucx_defaults as _apply_ucx_defaults

# Our UCX defaults (engine.UCX_DEFAULTS, never over the user's environment), set
# before ucxx is first imported anywhere in the process.
_apply_ucx_defaults()

__all__ = ["TransportServer"]


def __getattr__(name):
    if name == "TransportServer":
        from .server import TransportServer

        return TransportServer
    raise AttributeError(name)
