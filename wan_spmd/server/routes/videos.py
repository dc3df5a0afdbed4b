"""The videos resource: every route under /v1/videos.

    POST /v1/videos                make a video (a queued job at once, or the finished video)
    POST /v1/videos/sync           make a video, answer the raw mp4 bytes
    GET /v1/videos                 list (limit, after, order)
    GET /v1/videos/{id}            the video object: status, progress, error
    GET /v1/videos/{id}/content    variant=video (mp4, the default) or thumbnail (JPEG of the first frame);
                                   OpenAI's spritesheet is a 400 saying it is not offered
    DELETE /v1/videos/{id}         a queued job never runs, a running one stops at its next step,
                                   a finished one's files go; the id is unknown afterwards

OpenAI's endpoints that make videos from other videos (remix, edits, extensions, characters) answer
404 saying they are not served. Query parameters are read by hand so that a bad one gets the one
error shape (FastAPI's own validation would answer 422 in another shape).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from starlette.datastructures import Headers

from wan_spmd.params import GenerationParams, RequestError, resolve_params
from wan_spmd.server.body import read_video_request
from wan_spmd.server.compat import adapt_request, parse_bool
from wan_spmd.server.context import ARRIVED, ServerContext, ServerSettings
from wan_spmd.server.errors import ApiError, quoted, scrub_paths
from wan_spmd.server.files import OpenedFileResponse
from wan_spmd.server.queue import JobFailed, PendingVideo, QueueFull, Unavailable, VideoAnswer
from wan_spmd.server.videos import VideoRecord, inference_ms
from wan_spmd.server.wire import (
    ErrorResponse,
    Video,
    VideoData,
    VideoDeleted,
    VideoForm,
    VideoList,
    VideoResponse,
)

log = logging.getLogger("wan_spmd")

PIPELINE_STAGES = ("TextEncoding", "LatentPreparation", "Denoising", "Decoding", "PipelineWall")
SERVER_STAGES = ("Receive", "Validation", "Queue", "Dispatch", "Mp4Encoding", "Base64")
RETRY_AFTER_S = "5"
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


def documented(*errors: tuple[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` of a route: each status with the JSON error body and what it means."""
    return {code: {"model": ErrorResponse, "description": text} for code, text in errors}


ERRORS = documented(
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

videos_router = APIRouter(tags=["videos"])


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
        "video %s %s %s x%d frames %d steps -> %s: %s%s",
        pending.id,
        request.url.path,
        p.size,
        p.num_frames,
        p.num_inference_steps,
        answer.path,
        " ".join(f"{k}={v:.0f}ms" for k, v in timings.items()),
        f"; {answer.peak_memory.describe()}" if answer.peak_memory else "",
    )


def _memory_headers(answer: VideoAnswer) -> dict[str, str]:
    """X-Peak-Memory-MB (vllm-omni's header): the job's peak GPU memory reserved, MiB, the maximum
    over ranks; absent on the CPU, where there is nothing to measure."""
    peak = answer.peak_memory
    return {} if peak is None else {"X-Peak-Memory-MB": f"{peak.peak_memory_mb:.1f}"}


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
    return JSONResponse(body.model_dump(), headers=answer_headers(pending, timings, answer))


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


def answer_headers(pending: PendingVideo, timings: dict[str, float], answer: VideoAnswer) -> dict[str, str]:
    """The headers of a synchronous answer, as vllm-omni's /v1/videos/sync sends them, plus ours:
    X-Stage-Durations is a JSON object of seconds; X-Peak-Memory-MB only where it was measured (a GPU)."""
    return {
        **_id_headers(pending),
        "X-Inference-Time-S": f"{inference_ms(timings) / 1000.0:.3f}",
        "X-Stage-Durations": json.dumps({k: round(v / 1000.0, 4) for k, v in timings.items()}, separators=(",", ":")),
        "Server-Timing": _server_timing(timings),
        **_memory_headers(answer),
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
        **answer_headers(pending, timings, answer),
        "X-Video-Id": pending.id,
        "X-Num-Frames": str(p.num_frames),
        "X-Size": p.size,
        "X-Fps": str(p.fps),
        "X-Seed": str(p.seed),
    }
    return Response(answer.mp4, media_type="video/mp4", headers=headers)


# ---------------------------------------------------------------------------------------------
# Video jobs: list, retrieve, download, delete


VARIANTS = {"video": "video/mp4", "thumbnail": "image/jpeg"}
MAX_LIMIT = 100
JOB_ERRORS = documented(
    (400, "A query parameter is invalid (error.param names it)."),
    (401, "Missing or wrong API key."),
    (404, "No such video (never made, deleted or expired), or no content yet."),
    (422, "The video failed: it will never have content (its object says why)."),
)
UNSERVED = "this server makes videos from a prompt (and an image) only; OpenAI's {what} is not served here"


def _record(ctx: ServerContext, video_id: str) -> VideoRecord:
    record = ctx.videos.get(video_id)
    if record is None:
        message = f"no video {quoted(video_id)} on this server (never made here, deleted or expired)"
        raise ApiError(404, message, "video_id")
    return record


def _query_int(request: Request, name: str, default: int, low: int, high: int) -> int:
    text = request.query_params.get(name)
    if text is None:
        return default
    if not (text.isascii() and text.isdigit()):  # int() would take "５", "1_0" and " 7"
        raise ApiError(400, f"{name} must be a whole number in ASCII digits, got {quoted(text)}", name)
    digits = text.lstrip("0") or "0"
    value = int(digits) if len(digits) <= 9 else high + 1  # past any bound; never a 4300-digit int()
    if not low <= value <= high:
        raise ApiError(400, f"{name} must be within {low}..{high}, got {quoted(text)}", name)
    return value


# Registered before /v1/videos/{video_id}, which would otherwise take `characters` for an id.
@videos_router.post("/v1/videos/{video_id}/remix", responses={404: {"model": ErrorResponse}}, include_in_schema=False)
async def remix_video(video_id: str) -> None:
    raise ApiError(404, UNSERVED.format(what="remix"))


@videos_router.post("/v1/videos/edits", responses={404: {"model": ErrorResponse}}, include_in_schema=False)
async def edit_video() -> None:
    raise ApiError(404, UNSERVED.format(what="video edits"))


@videos_router.post("/v1/videos/extensions", responses={404: {"model": ErrorResponse}}, include_in_schema=False)
async def extend_video() -> None:
    raise ApiError(404, UNSERVED.format(what="video extensions"))


@videos_router.api_route("/v1/videos/characters", methods=["GET", "POST"], include_in_schema=False)
@videos_router.api_route("/v1/videos/characters/{character_id}", methods=["GET", "DELETE"], include_in_schema=False)
async def characters(request: Request) -> None:
    raise ApiError(404, UNSERVED.format(what="characters API"))


@videos_router.get(
    "/v1/videos",
    response_model=VideoList,
    responses=JOB_ERRORS,
    summary="List the videos (of every replica sharing the job store)",
)
async def list_videos(request: Request) -> JSONResponse:
    """Newest first by default (`order=asc` for oldest first); `after` is the last id of the previous
    page (an unknown one gives an empty page); `limit` 0..100 (0: no records, has_more says if any)."""
    ctx = _ctx(request)
    limit = _query_int(request, "limit", 20, 0, MAX_LIMIT)
    order = request.query_params.get("order", "desc").strip().lower()
    if order not in ("asc", "desc"):
        raise ApiError(400, f"order must be 'asc' or 'desc', got {quoted(order)}", "order")
    after = request.query_params.get("after") or None
    try:
        records, has_more = ctx.videos.page(limit, after, order)
    except KeyError:  # as vllm-omni answers: nothing after an id this server does not know
        records, has_more = [], False
    data = [r.public() for r in records]
    body = VideoList(
        data=data,
        first_id=data[0]["id"] if data else None,
        last_id=data[-1]["id"] if data else None,
        has_more=has_more,
    )
    return JSONResponse(body.model_dump())


@videos_router.get("/v1/videos/{video_id}", response_model=Video, responses=JOB_ERRORS, summary="A video's status")
async def retrieve_video(request: Request, video_id: str) -> JSONResponse:
    return JSONResponse(_record(_ctx(request), video_id).public())


@videos_router.get(
    "/v1/videos/{video_id}/content",
    responses={200: {"content": {"video/mp4": {}, "image/jpeg": {}}}, **JOB_ERRORS},
    response_class=FileResponse,
    summary="Download a finished video (variant=video) or a JPEG of its first frame (variant=thumbnail)",
)
async def video_content(request: Request, video_id: str) -> FileResponse:
    ctx = _ctx(request)
    variant = request.query_params.get("variant", "video")
    if variant == "spritesheet":  # OpenAI's third variant: named, so a client learns it is not offered
        raise ApiError(400, "variant spritesheet is not offered by this server; ask for video or thumbnail", "variant")
    if variant not in VARIANTS:
        raise ApiError(400, f"variant must be one of {', '.join(VARIANTS)}, got {quoted(variant)}", "variant")
    record = _record(ctx, video_id)
    if record.status == "failed":  # vllm-omni's status for it: the job exists, and will never have content
        raise ApiError(422, f"video {video_id} failed: it has no content; GET /v1/videos/{video_id} says why")
    if record.status != "completed":
        raise ApiError(404, f"video {video_id} is {record.status}: it has no content yet (only completed videos do)")
    if variant == "thumbnail":
        path = await asyncio.to_thread(ctx.videos.thumbnail, video_id)  # ffmpeg: off the event loop
    else:
        path = ctx.videos.video_file(record)
    suffix = "mp4" if variant == "video" else "jpg"
    if path is not None:
        try:  # opened now and sent from the open file: a DELETE meanwhile cannot cut the answer
            return OpenedFileResponse(path, media_type=VARIANTS[variant], filename=f"{video_id}.{suffix}")
        except FileNotFoundError:  # deleted or expired since
            pass
    raise ApiError(404, f"video {video_id} was deleted or expired", "video_id")


@videos_router.delete(
    "/v1/videos/{video_id}", response_model=VideoDeleted, responses=JOB_ERRORS, summary="Cancel or remove a video"
)
async def delete_video(request: Request, video_id: str) -> JSONResponse:
    ctx = _ctx(request)
    _record(ctx, video_id)
    pending = ctx.live.get(video_id)
    if pending is not None:
        # withdrawn first: queued, it is dropped now; running, the loop stops it at its next step
        # (on every rank, by the step agreement) and its outcome finds no record to update
        ctx.queue.withdraw(pending, "deleted")
    if ctx.videos.delete(video_id) is None:
        raise ApiError(404, f"no video {quoted(video_id)} on this server (deleted meanwhile)", "video_id")
    return JSONResponse(VideoDeleted(id=video_id).model_dump())
