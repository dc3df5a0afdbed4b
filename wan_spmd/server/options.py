"""The HTTP transport's bounds, apart from the transport itself so the CLI can read their defaults
without importing uvicorn and FastAPI."""

from __future__ import annotations

from dataclasses import dataclass

from wan_spmd.options import default


@dataclass(frozen=True)
class HttpOptions:
    """Bounds on what HTTP clients may hold (each one a serve flag; the defaults are the flags')."""

    max_connections: int = default("max_connections")
    """Connections held at once; when full, the one idle longest is closed to make room."""
    header_timeout_s: float = default("header_timeout")
    """A request's headers must arrive within this long (from the connection or the previous answer)."""
    body_timeout_s: float = default("body_timeout")
    """A request's body must arrive within this long after its headers."""
    send_timeout_s: float = default("send_timeout")
    """An answer must make progress (bytes taken by the client) at least this often, as nginx's
    send_timeout; a connection whose unread answers stall longer is closed."""
    uds_mode: int = default("uds_mode")
    """Permissions of the Unix socket file: only its owner may connect by default."""
    backlog: int = 256
    """Connections the kernel queues before we accept them."""
