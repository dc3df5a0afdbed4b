"""The system routes: /health (open to probes), /v1/models and /metrics."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from wan_spmd.params import model_limits
from wan_spmd.server.context import ServerContext
from wan_spmd.server.routes.videos import ERRORS
from wan_spmd.server.wire import Health, ModelCard, ModelList

system_router = APIRouter(tags=["system"])


def _ctx(request: Request) -> ServerContext:
    return request.app.state.ctx


@system_router.get("/health", response_model=Health, responses={503: {"model": Health}})
async def health(request: Request) -> JSONResponse:
    """200 once every rank has loaded the model; 503 while loading or stopping."""
    ctx = _ctx(request)
    body = Health(status=ctx.status, ranks=ctx.settings.world_size).model_dump()
    return JSONResponse(body, status_code=200 if ctx.ready.is_set() else 503)


@system_router.get("/v1/models", response_model=ModelList, responses=ERRORS)
async def models(request: Request) -> ModelList:
    """Every served name (aliases included) with what a request may ask of the model: clients read
    the limits here instead of assuming a size."""
    settings = _ctx(request).settings
    bounds = model_limits(settings.info, settings.limits)
    defaults = settings.defaults
    cards = [
        ModelCard(
            id=name,
            created=int(time.time()),
            root=settings.info.path.name if settings.info.path else None,  # the folder's name, never where it is
            pipeline=settings.info.family.pipeline_class,
            family=settings.info.family.name,
            image=settings.info.family.image,
            max_width=bounds.max_width,
            max_height=bounds.max_height,
            size_multiple=bounds.multiple,
            max_frames=bounds.max_frames,
            default_size=defaults.get("size"),
            default_max_area=defaults.get("max_area"),
            default_fps=defaults.get("fps"),
            default_num_frames=defaults.get("num_frames"),
            loras=list(settings.loras),
        )
        for name in settings.served_model_names
    ]
    return ModelList(data=cards)


@system_router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def metrics(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(_ctx(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)
