"""Pydantic wire types of the HTTP API (no torch). They document the API in the OpenAPI page and
shape the answers; request *validation* is `params.resolve_params`, the one schema every front
shares, so the request types here describe fields without re-checking them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, create_model

from wan_spmd.params import FIELDS


def _video_form() -> type[BaseModel]:
    """The fields of POST /v1/videos and /v1/videos/sync (multipart form or JSON body), made from
    the one field table (`params.FIELDS`) so the OpenAPI page and the CLI say the same things.

    Numbers may arrive as text (form fields); every field but `prompt` falls back to the model's
    defaults. `num_frames` wins over `seconds` x `fps`; `size` wins over `width`/`height`.
    """
    fields: dict[str, Any] = {
        f.name: (f.type, Field(description=f.help))
        if f.name == "prompt"
        else (f.type | None, Field(None, description=f.help))
        for f in FIELDS
    }
    fields["input_reference"] = (
        str | None,
        Field(
            None,
            description="The input image for image-to-video models: a file upload in a multipart form, "
            "base64 or a data URL in a JSON body. At most --max-upload-bytes (20 MiB by default).",
        ),
    )
    fields["model"] = (str | None, Field(None, description="The served model name; another name gets 404."))
    return create_model("VideoForm", **fields)


VideoForm = _video_form()


class VideoData(BaseModel):
    b64_json: str
    """The mp4, base64-encoded."""


class VideoError(BaseModel):
    code: str = Field(
        description='"cancelled" (deleted, shutdown, a synchronous client gone), "server_restarted", '
        '"replica_lost" (its replica stopped renewing its lease on the shared job store), or "generation_failed".'
    )
    message: str


class Video(BaseModel):
    """OpenAI's video object, plus the resolved frames, fps and seed (and timings once finished)."""

    id: str = Field(description="video_<replica>_<hex>: the replica that took the job is in its id.")
    object: Literal["video"] = "video"
    status: Literal["queued", "in_progress", "completed", "failed"]
    progress: int = Field(description="Percent of the denoising steps done; 100 once the mp4 exists.")
    created_at: int
    completed_at: int | None = Field(None, description="When it finished (completed or failed).")
    expires_at: int | None = Field(
        None, description="When its files go (--job-ttl after it finished); null without a TTL."
    )
    model: str
    size: str
    seconds: str = Field(description='num_frames / fps, as a string like OpenAI\'s (e.g. "4.125").')
    prompt: str
    error: VideoError | None = None
    num_frames: int
    fps: int
    seed: int
    timings: dict[str, float] = Field(
        default_factory=dict,
        description="Milliseconds: the pipeline's stages (TextEncoding, LatentPreparation, Denoising, Decoding), "
        "PipelineWall, and the server's own parts (Receive, Validation, Queue, Dispatch, Mp4Encoding, Base64), "
        "ServerTotal (request arrival to answer ready) and Overhead = ServerTotal - PipelineWall.",
    )
    warnings: list[str] = Field(default_factory=list, description="What was ignored or derived.")


class VideoResponse(Video):
    """The synchronous answer of POST /v1/videos: the video object, completed, with the mp4."""

    created: int
    data: list[VideoData]


class VideoList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Video]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool


class VideoDeleted(BaseModel):
    id: str
    object: Literal["video.deleted"] = "video.deleted"
    deleted: bool = True


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = Field(None, description="The request field at fault, when one is.")
    code: int


class ErrorResponse(BaseModel):
    """Every 4xx/5xx answer (OpenAI's error shape)."""

    error: ErrorDetail


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "wan_spmd"
    root: str | None = Field(None, description="The model folder's name (never where it lies).")
    pipeline: str | None = None
    family: str | None = None
    loras: list[dict[str, Any]] = Field(
        default_factory=list, description="LoRAs fused at launch: file name, scale, experts, sha256 (12 hex digits)."
    )


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: str
    """"ok" once every rank has loaded; "loading" or "stopping" with 503 otherwise."""
    ranks: int
