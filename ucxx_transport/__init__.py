"""The UCXX transport service: wire protocol, server, config, metrics, CLI.

Importing this package does not import ucxx; the server module does.
"""

__all__ = ["TransportServer"]


def __getattr__(name):
    if name == "TransportServer":
        from .server import TransportServer

        return TransportServer
    raise AttributeError(name)
