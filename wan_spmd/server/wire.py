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
    fields["image_reference"] = (
        str | None,
        Field(
            None,
            description='OpenAI\'s JSON-safe reference, {"image_url": "data:image/png;base64,..."} (a JSON object, or '
            "its text in a form field), a data URL or base64. A file_id is refused: no file store here.",
        ),
    )
    fields["model"] = (
        str | None,
        Field(
            None, description="A served model name (GET /v1/models); none means the server's model; another is a 400."
        ),
    )
    fields["strict"] = (
        bool | None,
        Field(
            None,
            description="true: a size that is not a multiple of the model's, or a frame count that is not 4k+1, is a "
            "400; by default (unless the server runs with --strict-sizes) they are rounded as diffusers rounds and "
            "reported (`adjusted`, X-Adjusted).",
        ),
    )
    fields["true_cfg_scale"] = (
        float | None,
        Field(None, description="vllm-omni's name for the CFG scale: used as guidance_scale when that is absent."),
    )
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
    seconds: str = Field(
        description='As the client sent it ("4"), else the duration in whole seconds; the true length is duration_s.'
    )
    duration_s: float = Field(description="num_frames / fps (4.125 for 33 frames at 8 fps).")
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
    adjusted: dict[str, dict[str, str]] = Field(
        default_factory=dict,
        description="{field: {requested, used}} for a size or frame count rounded to what the model takes, e.g. "
        '{"size": {"requested": "854x480", "used": "848x480"}}.',
    )
    quality: str = Field("default", description="vllm-omni's field: one quality here.")
    file_name: str | None = Field(None, description="The mp4's name (<id>.mp4) once completed.")
    stage_durations: dict[str, float] = Field(
        default_factory=dict, description="The timings in seconds (vllm-omni's field) once completed."
    )
    peak_memory_mb: float | None = Field(
        None,
        description="The job's peak GPU memory reserved, MiB, the maximum over ranks, once completed; null on the CPU.",
    )
    inference_time_s: float | None = Field(
        None, description="Seconds from the job's start on the ranks to its mp4 in place, once completed."
    )


class VideoResponse(Video):
    """The synchronous answer of POST /v1/videos (--sync-videos): the video object, completed, with the mp4."""

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
    code: str = Field(description="invalid_request, invalid_api_key, not_found, queue_full, server_error, ...")


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
    image: str | None = Field(None, description="The input image: required, optional or refused.")
    max_width: int | None = Field(None, description="Widest frame a request may ask for (the flags and the model).")
    max_height: int | None = Field(None, description="Tallest frame a request may ask for.")
    size_multiple: int | None = Field(None, description="Width and height are rounded down to multiples of this.")
    max_frames: int | None = Field(None, description="Most frames a request may ask for (frames are 4k+1).")
    default_size: str | None = Field(None, description="The size when a request gives none (and no image).")
    default_max_area: str | None = Field(
        None, description="With an image and no size: the image's aspect ratio within this area."
    )
    default_fps: int | None = None
    default_num_frames: int | None = None
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
