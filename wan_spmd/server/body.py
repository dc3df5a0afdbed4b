"""Turn an HTTP request body (multipart form, urlencoded form or JSON) into the schema's dict plus
the image bytes. Transport checks live here (content type, JSON syntax, upload size -> 413);
field validation is `params.resolve_params`'s alone."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from fastapi import Request
from starlette.datastructures import UploadFile

from wan_spmd.params import Limits
from wan_spmd.server.errors import ApiError

IMAGE_FIELD = "input_reference"
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
TEXT_SLACK = 1024 * 1024  # room for prompts and numbers beside the largest image


def body_cap(limits: Limits) -> int:
    """Largest body worth reading: the largest image base64-encoded (4/3) plus the text fields."""
    return limits.max_upload_bytes * 4 // 3 + 4 + TEXT_SLACK


def _too_large(size: int | str, limits: Limits) -> ApiError:
    return ApiError(
        413,
        f"{IMAGE_FIELD} is {size} bytes, over the {limits.max_upload_bytes}-byte upload limit (--max-upload-bytes)",
        IMAGE_FIELD,
    )


async def read_video_request(request: Request, limits: Limits) -> tuple[dict[str, Any], bytes | None]:
    """(fields, image bytes or None) from a multipart/urlencoded form or a JSON object."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > body_cap(limits):
        raise ApiError(
            413,
            f"the request body is {length} bytes; {IMAGE_FIELD} may be at most {limits.max_upload_bytes} bytes "
            "(--max-upload-bytes)",
            IMAGE_FIELD,
        )
    if media_type == "application/json":
        return await _read_json(request, limits)
    if media_type in FORM_TYPES:
        return await _read_form(request, limits)
    raise ApiError(
        415,
        f"Content-Type {media_type or '(none)'!r} is not accepted; send multipart/form-data or application/json",
        "Content-Type",
    )


async def _read_json(request: Request, limits: Limits) -> tuple[dict[str, Any], bytes | None]:
    chunks, size, cap = [], 0, body_cap(limits)
    async for chunk in request.stream():  # bounded even without a Content-Length (chunked uploads)
        size += len(chunk)
        if size > cap:
            raise _too_large(f"over {cap}", limits)
        chunks.append(chunk)
    try:
        fields = json.loads(b"".join(chunks))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}", "body") from None
    if not isinstance(fields, dict):
        raise ApiError(400, f"the JSON body must be an object, got {type(fields).__name__}", "body")
    reference = fields.pop(IMAGE_FIELD, None)
    if reference is None or reference == "":
        return fields, None
    if not isinstance(reference, str):
        raise ApiError(400, f"{IMAGE_FIELD} must be a base64 string or a data URL in a JSON body", IMAGE_FIELD)
    return fields, decode_base64_image(reference, limits)


def decode_base64_image(text: str, limits: Limits) -> bytes:
    """Base64 or a `data:image/...;base64,` URL -> bytes. URLs and paths are never fetched or opened."""
    text = text.strip()
    if text.startswith(("http://", "https://", "file:", "/")):
        raise ApiError(
            400,
            f"{IMAGE_FIELD} must be the image itself (base64 or a data URL); URLs and paths are not fetched",
            IMAGE_FIELD,
        )
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or not header.endswith(";base64"):
            raise ApiError(400, f"{IMAGE_FIELD} data URL must look like data:image/png;base64,...", IMAGE_FIELD)
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{IMAGE_FIELD} is not valid base64", IMAGE_FIELD) from None
    if len(data) > limits.max_upload_bytes:
        raise _too_large(len(data), limits)
    return data


async def _read_form(request: Request, limits: Limits) -> tuple[dict[str, Any], bytes | None]:
    try:
        form = await request.form(max_files=4, max_fields=100)
    except Exception as exc:  # starlette reports malformed multipart as an HTTPException(400)
        raise ApiError(400, f"the form body cannot be parsed: {getattr(exc, 'detail', exc)}", "body") from None
    try:
        fields: dict[str, Any] = {}
        image: bytes | None = None
        for key, value in form.multi_items():
            if key == IMAGE_FIELD:
                image = await _read_form_image(value, limits)
            elif isinstance(value, UploadFile):
                raise ApiError(400, f"{key} must be a text field, not a file upload", key)
            else:
                fields[key] = value
        return fields, image
    finally:
        await form.close()


async def _read_form_image(value: UploadFile | str, limits: Limits) -> bytes | None:
    if isinstance(value, str):  # a form may carry the image as base64 text too
        return decode_base64_image(value, limits) if value.strip() else None
    data = await value.read(limits.max_upload_bytes + 1)
    if len(data) > limits.max_upload_bytes:
        raise _too_large(value.size if value.size is not None else f"over {limits.max_upload_bytes}", limits)
    if not data and not value.filename:  # an HTML form's empty file input: no image given
        return None
    return data
