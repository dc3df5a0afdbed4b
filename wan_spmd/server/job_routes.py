"""The jobs router: OpenAI's video job endpoints over the store (server/videos.py).

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
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse

from wan_spmd.server.context import ServerContext
from wan_spmd.server.errors import ApiError, quoted
from wan_spmd.server.files import OpenedFileResponse
from wan_spmd.server.videos import VideoRecord
from wan_spmd.server.wire import ErrorResponse, Video, VideoDeleted, VideoList

jobs_router = APIRouter(tags=["videos"])

VARIANTS = {"video": "video/mp4", "thumbnail": "image/jpeg"}
MAX_LIMIT = 100
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in (
        (400, "A query parameter is invalid (error.param names it)."),
        (401, "Missing or wrong API key."),
        (404, "No such video (never made, deleted or expired), or no content yet."),
        (422, "The video failed: it will never have content (its object says why)."),
    )
}
UNSERVED = "this server makes videos from a prompt (and an image) only; OpenAI's {what} is not served here"


def _ctx(request: Request) -> ServerContext:
    return request.app.state.ctx


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
@jobs_router.post("/v1/videos/{video_id}/remix", responses={404: {"model": ErrorResponse}}, include_in_schema=False)
async def remix_video(video_id: str) -> None:
    raise ApiError(404, UNSERVED.format(what="remix"))


@jobs_router.post("/v1/videos/edits", responses={404: {"model": ErrorResponse}}, include_in_schema=False)
async def edit_video() -> None:
    raise ApiError(404, UNSERVED.format(what="video edits"))


@jobs_router.post("/v1/videos/extensions", responses={404: {"model": ErrorResponse}}, include_in_schema=False)
async def extend_video() -> None:
    raise ApiError(404, UNSERVED.format(what="video extensions"))


@jobs_router.api_route("/v1/videos/characters", methods=["GET", "POST"], include_in_schema=False)
@jobs_router.api_route("/v1/videos/characters/{character_id}", methods=["GET", "DELETE"], include_in_schema=False)
async def characters(request: Request) -> None:
    raise ApiError(404, UNSERVED.format(what="characters API"))


@jobs_router.get(
    "/v1/videos",
    response_model=VideoList,
    responses=ERRORS,
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


@jobs_router.get("/v1/videos/{video_id}", response_model=Video, responses=ERRORS, summary="A video's status")
async def retrieve_video(request: Request, video_id: str) -> JSONResponse:
    return JSONResponse(_record(_ctx(request), video_id).public())


@jobs_router.get(
    "/v1/videos/{video_id}/content",
    responses={200: {"content": {"video/mp4": {}, "image/jpeg": {}}}, **ERRORS},
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


@jobs_router.delete(
    "/v1/videos/{video_id}", response_model=VideoDeleted, responses=ERRORS, summary="Cancel or remove a video"
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
