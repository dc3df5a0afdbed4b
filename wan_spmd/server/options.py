"""The HTTP transport's bounds, apart from the transport itself so the CLI can read their defaults
without importing uvicorn and FastAPI."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HttpOptions:
    """Bounds on what HTTP clients may hold (each one a serve flag)."""

    max_connections: int = 64
    """Connections held at once; when full, the one idle longest is closed to make room."""
    header_timeout_s: float = 10.0
    """A request's headers must arrive within this long (from the connection or the previous answer)."""
    body_timeout_s: float = 60.0
    """A request's body must arrive within this long after its headers."""
    send_timeout_s: float = 60.0
    """An answer must make progress (bytes taken by the client) at least this often, as nginx's
    send_timeout; a connection whose unread answers stall longer is closed."""
    uds_mode: int = 0o600
    """Permissions of the Unix socket file: only its owner may connect by default."""
    backlog: int = 256
    """Connections the kernel queues before we accept them."""
