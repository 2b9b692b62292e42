"""Name resolution faked at the socket boundary, for the download tests
(nothing here ever connects anywhere)."""

import socket

# A sitecustomize for a child process: every lookup of a non-local name
# fails as it does offline, so the real ModelScope SDK meets no network.
OFFLINE_SITECUSTOMIZE = """
import socket

_real = socket.getaddrinfo

def _offline(host, *args, **kwargs):
    if host in ("localhost", "127.0.0.1", "::1"):
        return _real(host, *args, **kwargs)
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

socket.getaddrinfo = _offline
"""


def resolve_every_name(monkeypatch):
    """Makes every name lookup answer 127.0.0.1, so the reachability check
    passes in front of a faked SDK."""

    def lookup(host, port, *args, **kwargs):
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))
        ]

    monkeypatch.setattr(socket, "getaddrinfo", lookup)
