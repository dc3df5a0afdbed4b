"""`create_app`: the FastAPI app of the HTTP front, built from routers around one `ServerContext`.

The app validates a request with the shared schema, admits it to the bounded `JobQueue`, and awaits
its future; the SPMD loop on rank 0's main thread does the rest. Nothing here imports torch.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from wan_spmd.server.context import ARRIVED, VIDEO_PATHS, ServerContext, ServerSettings
from wan_spmd.server.errors import ApiError, quoted
from wan_spmd.server.routes import system_router, videos_router

__all__ = ["ServerContext", "ServerSettings", "create_app"]

log = logging.getLogger("wan_spmd")


class Front:
    """Pure ASGI middleware around the whole app: stamps each request's arrival time, lets in only
    what may come in (the API key; without one, only this server's own Host and Origin), and turns
    any unexpected exception into the JSON 500 every other error has, logged once with its traceback.
    Caught here, it never reaches Starlette's error middleware (text/plain, then re-raised, so uvicorn
    logs it again and drops the keep-alive connection)."""

    def __init__(self, app: ASGIApp, ctx: ServerContext) -> None:
        self.app = app
        self.ctx = ctx
        key = ctx.settings.api_key
        self.key = key.encode() if key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        scope[ARRIVED] = time.perf_counter()
        started = False

        async def send_tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            refusal = self.refusal(scope)
            if refusal is not None:
                self._count(scope, refusal.outcome)
                return await refusal.response()(scope, receive, send)
            await self.app(scope, receive, send_tracked)
        except Exception as exc:
            ref = f"err_{uuid.uuid4().hex[:12]}"
            log.error("internal error %s on %s %s", ref, scope["method"], scope["path"], exc_info=exc)
            self._count(scope, "failed")
            if not started:  # else the half-sent answer cannot be mended; uvicorn closes the connection
                error = ApiError(500, f"internal server error (ref {ref}); the server log has the details")
                await error.response()(scope, receive, send)

    def refusal(self, scope: Scope) -> ApiError | None:
        """Why this request may not come in, or None. /health is open to probes either way."""
        if scope["path"] == "/health":
            return None
        headers = dict(scope["headers"])
        if self.key is not None:
            if not hmac.compare_digest(bearer_token(headers.get(b"authorization", b"")), self.key):
                return ApiError(
                    401,
                    "missing or wrong API key: send Authorization: Bearer KEY",
                    "Authorization",
                    headers={"WWW-Authenticate": "Bearer"},
                )
            return None
        # No key: a web page must not drive this server. A cross-site form or fetch carries a foreign
        # Origin; a DNS-rebinding page reaches us under its own host name (Host). Unix sockets are
        # out of a browser's reach, so only TCP has a Host to check.
        server = scope.get("server")
        if server is not None and server[1] is None:  # uvicorn's (path, None) for a Unix socket
            server = None
        host = headers.get(b"host")
        if host is not None and server is not None and not is_own_host(host.decode("latin-1"), server):
            return ApiError(
                403,
                f"Host {quoted(host.decode('latin-1'))} is not this server's address; without --api-key only "
                "requests addressed to its IP or localhost are served",
                "Host",
            )
        origin = headers.get(b"origin")
        if origin is not None and not _is_own_origin(origin.decode("latin-1"), server):
            return ApiError(
                403,
                f"Origin {quoted(origin.decode('latin-1'))} is another site; without --api-key requests from web pages "
                "of other origins are refused",
                "Origin",
            )
        return None

    def _count(self, scope: Scope, outcome: str) -> None:
        path = scope["path"]
        self.ctx.metrics.count(path if path in VIDEO_PATHS else "other", outcome)


def bearer_token(value: bytes) -> bytes:
    """The token of `Bearer TOKEN` (the scheme is case-insensitive, RFC 9110); b"" for anything else."""
    scheme, _, token = value.strip().partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" else b""


def _split_host(host: str) -> tuple[str, int | None]:
    """'example.com:8000' -> ('example.com', 8000); '[::1]:80' -> ('::1', 80); the port None if absent
    or not a number."""
    name, port = host.strip(), None
    if name.startswith("["):
        name, _, rest = name[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif name.count(":") == 1:
        name, _, port_text = name.partition(":")
    else:
        port_text = ""
    if port_text:
        port = int(port_text) if port_text.isdigit() else -1
    return name.lower(), port


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)  # a dual-stack socket's view of an IPv4 client
    return mapped or address


def is_own_host(host: str, server: tuple[str, int] | list[Any]) -> bool:
    """Whether `Host` names the address this connection came in on: the same IP literal, or
    localhost when that address is a loopback one, and the same port (80 when none is given)."""
    name, port = _split_host(host)
    own_ip, own_port = _ip(str(server[0])), int(server[1])
    if (port if port is not None else 80) != own_port:
        return False
    if own_ip is None:  # a named server address (an in-process test client's "testserver")
        return name == str(server[0]).lower()
    if name == "localhost" or name.endswith(".localhost"):
        return own_ip.is_loopback
    return _ip(name) == own_ip


def _is_own_origin(origin: str, server: tuple[str, int] | list[Any] | None) -> bool:
    """An Origin is ours when it is http://<this server's Host>; "null" (sandboxed pages, files) and
    every other origin are foreign, and on a Unix socket any Origin is (no page is served there)."""
    scheme, sep, rest = origin.strip().partition("://")
    if server is None or not sep or scheme.lower() != "http" or "/" in rest:
        return False
    return is_own_host(rest, server)


def create_app(ctx: ServerContext) -> FastAPI:
    """The HTTP front's app: video, job, model, health and metrics routers plus FastAPI's OpenAPI page."""
    app = FastAPI(
        title="wan_spmd",
        version="0.1.0",
        summary="Wan2.2 video generation served by one torchrun SPMD program.",
        # No /docs or /redoc: FastAPI's pages load their scripts from a CDN, a blank page offline.
        # /openapi.json stays, for any OpenAPI viewer or client generator.
        docs_url=None,
        redoc_url=None,
    )
    app.state.ctx = ctx
    app.include_router(videos_router)
    app.include_router(system_router)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        path = request.url.path
        if path in VIDEO_PATHS and request.method == "POST":  # GET /v1/videos lists jobs: not a video request
            ctx.metrics.count(path, exc.outcome)
        return exc.response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):  # unknown routes, wrong methods
        return ApiError(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None)).response()

    app.add_middleware(Front, ctx=ctx)
    return app
