"""`create_app`: the FastAPI app of the HTTP front, built from routers around one `ServerContext`.

The app validates a request with the shared schema, admits it to the bounded `JobQueue`, and awaits
its future; the SPMD loop on rank 0's main thread does the rest. Nothing here imports torch.
"""

from __future__ import annotations

import hmac
import time

from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from wan_spmd.server.context import ARRIVED, VIDEO_PATHS, ServerContext, ServerSettings
from wan_spmd.server.errors import ApiError
from wan_spmd.server.routes import system_router, videos_router

__all__ = ["ServerContext", "ServerSettings", "create_app"]


class Gate:
    """Pure ASGI middleware: stamps each request's arrival time and enforces --api-key."""

    def __init__(self, app: ASGIApp, ctx: ServerContext) -> None:
        self.app = app
        self.ctx = ctx
        key = ctx.settings.api_key
        self.expected = f"Bearer {key}".encode() if key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        scope[ARRIVED] = time.perf_counter()
        if self.expected is not None and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                path = scope["path"]
                self.ctx.metrics.count(path if path in VIDEO_PATHS else "other", "unauthorized")
                error = ApiError(
                    401,
                    "missing or wrong API key: send Authorization: Bearer KEY",
                    "Authorization",
                    headers={"WWW-Authenticate": "Bearer"},
                )
                return await error.response()(scope, receive, send)
        return await self.app(scope, receive, send)


def create_app(ctx: ServerContext) -> FastAPI:
    """The HTTP front's app: video, model, health and metrics routers plus FastAPI's OpenAPI page."""
    app = FastAPI(
        title="wan_spmd",
        version="0.1.0",
        summary="Wan2.2 video generation served by one torchrun SPMD program.",
    )
    app.state.ctx = ctx
    app.include_router(videos_router)
    app.include_router(system_router)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        path = request.url.path
        if path in VIDEO_PATHS:
            ctx.metrics.count(path, exc.outcome)
        return exc.response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):  # unknown routes, wrong methods
        return ApiError(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None)).response()

    app.add_middleware(Gate, ctx=ctx)
    return app
