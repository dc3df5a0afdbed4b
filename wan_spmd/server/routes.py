"""The routers: videos (POST /v1/videos, /v1/videos/sync) and system (health, models, metrics)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers

from wan_spmd.params import GenerationParams, RequestError, model_limits, resolve_params
from wan_spmd.server.body import read_video_request
from wan_spmd.server.compat import adapt_request, parse_bool
from wan_spmd.server.context import ARRIVED, ServerContext, ServerSettings
from wan_spmd.server.errors import ApiError, quoted, scrub_paths
from wan_spmd.server.queue import JobFailed, PendingVideo, QueueFull, Unavailable, VideoAnswer
from wan_spmd.server.videos import VideoRecord, inference_ms
from wan_spmd.server.wire import (
    ErrorResponse,
    Health,
    ModelCard,
    ModelList,
    Video,
    VideoData,
    VideoForm,
    VideoResponse,
)

log = logging.getLogger("wan_spmd")

PIPELINE_STAGES = ("TextEncoding", "LatentPreparation", "Denoising", "Decoding", "PipelineWall")
SERVER_STAGES = ("Receive", "Validation", "Queue", "Dispatch", "Mp4Encoding", "Base64")
RETRY_AFTER_S = "5"
# Debugging and tests only (README, "Tests"): a request whose prompt equals this variable's value
# fails with an unexpected exception, the one path no client input reaches any more (issue 20).
FAULT_ENV = "WAN_SPMD_FAULT_PROMPT"
STRICT_FIELD = "strict"
"""A request's own choice: true makes a size or frame count the model cannot take a 400 (not rounded)."""

# The request body is read by hand (so every field error comes from the one schema), so the OpenAPI
# page is told what it looks like.
_schema = VideoForm.model_json_schema()
_upload_schema = {
    **_schema,
    "properties": {**_schema["properties"], "input_reference": {"type": "string", "format": "binary"}},
}
REQUEST_BODY = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": _upload_schema}, "application/json": {"schema": _schema}},
    }
}
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in (
        (401, "Missing or wrong API key."),
        (403, "Without --api-key: the Host is not this server's address, or the Origin is another site."),
        (400, "A field is invalid or not supported (error.param names it), or the model is not served here."),
        (408, "The request's headers or body did not arrive within --header-timeout / --body-timeout."),
        (413, "The image upload is over --max-upload-bytes, or the body over its byte budget."),
        (415, "The body is neither multipart/form-data nor JSON."),
        (429, "--max-queue requests are already waiting; retry after Retry-After seconds."),
        (499, "Never seen by a client: it closed the connection, and the job was cancelled (counted in /metrics)."),
        (500, "The generation failed on some rank, or the server failed (the log has a traceback)."),
        (503, "The model is still loading, or the server is stopping or lost a rank; retry after Retry-After."),
    )
}

videos_router = APIRouter(tags=["videos"])
system_router = APIRouter(tags=["system"])


def _ctx(request: Request) -> ServerContext:
    return request.app.state.ctx


def _ms(since: float) -> float:
    return (time.perf_counter() - since) * 1000.0


async def _generate(
    request: Request, detached: bool = False
) -> tuple[PendingVideo, VideoAnswer | None, dict[str, float]]:
    """Admit, parse, validate and await one request; the timings so far, in ms. A `detached`
    (asynchronous) request returns once it is queued, with no answer.

    A full queue answers 429 before the body is read; a request takes its place in the queue only
    once its body is complete and valid (so bodies that never come hold no place), and gets 429
    then if the places went to others meanwhile.
    """
    ctx = _ctx(request)
    settings = ctx.settings
    if not ctx.ready.is_set():
        raise ApiError(503, f"the server is {ctx.status}; try again shortly", headers={"Retry-After": RETRY_AFTER_S})
    arrived = request.scope.get(ARRIVED, time.perf_counter())
    _admit(ctx.queue.check_room)
    fields, image = await read_video_request(request, settings.limits)
    received = time.perf_counter()
    model = served_model(settings, fields.pop("model", None))
    strict = settings.strict_sizes
    if fields.get(STRICT_FIELD) not in (None, ""):
        strict = parse_bool(STRICT_FIELD, fields.pop(STRICT_FIELD))
    fields.pop(STRICT_FIELD, None)
    fields, image, notes = adapt_request(fields, image, settings.limits)
    if os.environ.get(FAULT_ENV) and fields.get("prompt") == os.environ[FAULT_ENV]:
        raise RuntimeError(f"fault injected by {FAULT_ENV} (a test of the unexpected-error path)")
    try:
        # in a worker thread: decoding an image takes up to seconds, and the event loop serves
        # /health and every other connection meanwhile (images.DECODE_SLOTS bounds the decodes)
        params: GenerationParams = await asyncio.to_thread(
            resolve_params,
            fields,
            info=settings.info,
            defaults=settings.defaults,
            limits=settings.limits,
            image=image,
            round_to_model=not strict,
        )
    except RequestError as exc:
        raise ApiError(400, str(exc), exc.field) from None
    if notes:
        params = replace(params, warnings=(*params.warnings, *notes))
    timings = {"Receive": (received - arrived) * 1000.0, "Validation": _ms(received)}
    pending = PendingVideo(
        id=ctx.videos.new_id(),
        params=params,
        created=int(time.time()),
        detached=detached,
        model=model,
        seconds=seconds_as_sent(fields),
    )
    ctx.track(pending)  # its record exists before the loop can take it
    try:
        _admit(lambda: ctx.queue.submit(pending))
    except ApiError:
        ctx.untrack(pending.id)
        raise
    if detached:
        return pending, None, timings
    try:
        answer = await _answer_or_disconnect(request, pending)
    except asyncio.CancelledError:
        _withdraw(ctx, pending)  # nobody waits any more: the loop drops or stops the job
        raise
    except Unavailable as exc:
        raise ApiError(
            503, f"video {pending.id} was not made: {scrub_paths(str(exc))}", headers={"Retry-After": RETRY_AFTER_S}
        ) from None
    except JobFailed as exc:
        raise ApiError(500, f"video {pending.id} failed: {scrub_paths(str(exc))}") from None
    for warning in params.warnings:
        log.info("video %s: %s", pending.id, warning)
    return pending, answer, {**answer.timings_ms, **timings}


def served_model(settings: ServerSettings, name: Any) -> str:
    """The served name a request gives (an alias included); none means the server's first name; any
    other is a 400 that lists the served names (as vllm-omni answers a mismatch)."""
    names = settings.served_model_names
    if name in (None, ""):
        return names[0]
    if not isinstance(name, str) or name not in names:
        shown = quoted(name) if isinstance(name, str) else "that name"
        raise ApiError(400, f"model {shown} is not served here; this server serves {', '.join(names)}", "model")
    return name


def seconds_as_sent(fields: dict[str, Any]) -> str | None:
    """`seconds` as the client wrote it ("4" stays "4", a JSON 4 or 4.0 becomes "4") when it decided
    the frame count; None when num_frames did (or neither came): the record then says whole seconds."""
    value = fields.get("seconds")
    if fields.get("num_frames") not in (None, "") or value in (None, "") or isinstance(value, bool):
        return None
    if isinstance(value, str):
        return value.strip()[:32]
    return f"{value:g}" if isinstance(value, int | float) else None


def _admit(step: Callable[[], object]) -> None:
    """Run a queue step; QueueFull is 429 and Unavailable 503, both with Retry-After."""
    try:
        step()
    except QueueFull as exc:
        raise ApiError(429, f"the server is busy: {exc}", headers={"Retry-After": RETRY_AFTER_S}) from None
    except Unavailable as exc:
        raise ApiError(
            503, f"the server is not taking requests: {exc}", headers={"Retry-After": RETRY_AFTER_S}
        ) from None


async def _answer_or_disconnect(request: Request, pending: PendingVideo) -> VideoAnswer:
    """The job's answer; if the client hangs up first, the job is cancelled (its queue place given
    back at once, or stopped at its next denoising step while running, nothing kept) and the request
    ends as 499."""
    answer = asyncio.wrap_future(pending.future)
    gone = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if answer.done():
        return answer.result()
    _withdraw(_ctx(request), pending)  # cancelled first, so the loop cannot start it meanwhile
    answer.cancel()  # the loop's later answer then goes nowhere (PendingVideo.resolve allows that)
    raise ApiError(499, f"the client closed the connection; video {pending.id} was cancelled")


def _withdraw(ctx: ServerContext, pending: PendingVideo, reason: str = "the client went away") -> None:
    """Cancel a job nobody waits for: one still queued never runs, and its record says so now; a
    running one stops at its next step, and the loop's outcome updates its record."""
    if ctx.queue.withdraw(pending, reason):
        ctx.videos.fail(pending.id, "cancelled", f"cancelled before it started: {reason}")


async def _client_gone(request: Request) -> None:
    """Return when the client closes the connection: with the body read, the server's next ASGI
    message is the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _close_timings(timings: dict[str, float], request: Request) -> dict[str, float]:
    """Order the stages, then add ServerTotal and Overhead = ServerTotal - PipelineWall."""
    ordered = {k: timings[k] for k in PIPELINE_STAGES + SERVER_STAGES if k in timings}
    ordered.update({k: v for k, v in timings.items() if k not in ordered})
    ordered["ServerTotal"] = _ms(request.scope.get(ARRIVED, time.perf_counter()))
    ordered["Overhead"] = ordered["ServerTotal"] - ordered.get("PipelineWall", 0.0)
    return {k: round(v, 3) for k, v in ordered.items()}


def _done(request: Request, pending: PendingVideo, answer: VideoAnswer, timings: dict[str, float]) -> None:
    ctx = _ctx(request)
    ctx.metrics.count(request.url.path, "ok")
    ctx.metrics.observe(timings)
    p = pending.params
    log.info(
        "video %s %s %s x%d frames %d steps -> %s: %s",
        pending.id,
        request.url.path,
        p.size,
        p.num_frames,
        p.num_inference_steps,
        answer.path,
        " ".join(f"{k}={v:.0f}ms" for k, v in timings.items()),
    )


def _server_timing(timings: dict[str, float]) -> str:
    return ", ".join(f"{k};dur={v:.1f}" for k, v in timings.items())


@videos_router.post(
    "/v1/videos",
    response_model=Video,
    responses=ERRORS,
    openapi_extra=REQUEST_BODY,
    summary="Create a video job: the video object, queued, at once (OpenAI's API); poll GET /v1/videos/{id}. "
    "With --sync-videos a plain client (not the OpenAI SDK, no `Prefer: respond-async`) waits and gets the "
    "completed object with the mp4 as base64",
)
async def create_video(request: Request) -> JSONResponse:
    ctx = _ctx(request)
    if wants_async(request.headers, ctx.settings.sync_videos):
        return await _create_detached(request)
    pending, answer, timings = await _generate(request)
    start = time.perf_counter()
    b64 = base64.b64encode(answer.mp4).decode("ascii")
    timings["Base64"] = _ms(start)
    timings = _close_timings(timings, request)
    video = _video_object(ctx, pending, "completed")
    body = VideoResponse(**{**video, "timings": timings}, created=pending.created, data=[VideoData(b64_json=b64)])
    _done(request, pending, answer, timings)
    return JSONResponse(body.model_dump(), headers=answer_headers(pending, timings))


def wants_async(headers: Headers, sync_videos: bool) -> bool:
    """Whether POST /v1/videos answers a queued job at once: always, unless the server runs with
    --sync-videos; then still for a client that asks (RFC 7240's `Prefer: respond-async`) and for
    the OpenAI SDK (its `X-Stainless-*` headers), whose `create` expects a queued job and retries a
    request that outlasts its timeout, which would start a long video again and again."""
    if not sync_videos:
        return True
    for value in headers.getlist("prefer"):
        if any(token.split("=")[0].strip().lower() == "respond-async" for token in value.replace(";", ",").split(",")):
            return True
    return any(key.lower().startswith("x-stainless-") for key in headers)


async def _create_detached(request: Request) -> JSONResponse:
    """Admit and queue the job; answer its video object (queued) without waiting for it. A client
    that hangs up afterwards changes nothing: the job runs and can be fetched by id."""
    ctx = _ctx(request)
    pending, _, _ = await _generate(request, detached=True)
    ctx.metrics.count(request.url.path, "accepted")
    for warning in pending.params.warnings:
        log.info("video %s: %s", pending.id, warning)
    video = pending.admitted or _video_object(ctx, pending, "queued")  # as admitted, as OpenAI answers
    log.info(
        "video %s queued (asynchronous): %s x%d frames", pending.id, pending.params.size, pending.params.num_frames
    )
    headers = {**_id_headers(pending), "Preference-Applied": "respond-async"}
    return JSONResponse(video, headers=headers)


def _id_headers(pending: PendingVideo) -> dict[str, str]:
    """X-Request-Id and X-Model (vllm-omni's names), and X-Adjusted when a value was rounded to what
    the model takes (`size=854x480->848x480, num_frames=80->81`)."""
    headers = {"X-Request-Id": pending.id, "X-Model": pending.model or ""}
    if pending.params.adjusted:
        headers["X-Adjusted"] = ", ".join(f"{name}={asked}->{used}" for name, asked, used in pending.params.adjusted)
    return headers


def answer_headers(pending: PendingVideo, timings: dict[str, float]) -> dict[str, str]:
    """The headers of a synchronous answer, as vllm-omni's /v1/videos/sync sends them, plus ours:
    X-Stage-Durations is a JSON object of seconds; X-Peak-Memory-MB is left out (not measured)."""
    return {
        **_id_headers(pending),
        "X-Inference-Time-S": f"{inference_ms(timings) / 1000.0:.3f}",
        "X-Stage-Durations": json.dumps({k: round(v / 1000.0, 4) for k, v in timings.items()}, separators=(",", ":")),
        "Server-Timing": _server_timing(timings),
    }


def _video_object(ctx: ServerContext, pending: PendingVideo, status: str) -> dict[str, Any]:
    """The job's video object from its record; made up from the request if the record is gone
    already (deleted, or evicted by retention, in the instant since)."""
    record = ctx.videos.get(pending.id)
    if record is None:
        model = pending.model or ctx.settings.served_model_name
        record = VideoRecord.new(pending.id, pending.params, model, float(pending.created), seconds=pending.seconds)
        record.status, record.progress = status, 100 if status == "completed" else 0
    return record.public()


@videos_router.post(
    "/v1/videos/sync",
    responses={200: {"content": {"video/mp4": {}}}, **ERRORS},
    openapi_extra=REQUEST_BODY,
    response_class=Response,
    summary="Generate a video; answer the raw mp4 bytes",
)
async def create_video_sync(request: Request) -> Response:
    pending, answer, timings = await _generate(request)
    timings = _close_timings(timings, request)
    _done(request, pending, answer, timings)
    p = pending.params
    headers = {
        **answer_headers(pending, timings),
        "X-Video-Id": pending.id,
        "X-Num-Frames": str(p.num_frames),
        "X-Size": p.size,
        "X-Fps": str(p.fps),
        "X-Seed": str(p.seed),
    }
    return Response(answer.mp4, media_type="video/mp4", headers=headers)


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
