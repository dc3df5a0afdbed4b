"""Turn an HTTP request body (multipart form, urlencoded form or JSON) into the schema's dict plus
the image bytes. Transport checks live here (content type, syntax, sizes -> 413, a client that
hangs up -> 499); field validation is `params.resolve_params`'s alone.

Every body kind is read through one byte budget (`body_cap`), counted as the bytes arrive, so no
body is read past it whatever its framing (chunked or not); multipart parts are parsed as they
stream and kept in memory, each checked against its own limit, so nothing is ever spooled to disk.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qsl

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request
from starlette.types import Receive

from wan_spmd.params import Limits
from wan_spmd.server.errors import ApiError, quoted

IMAGE_FIELD = "input_reference"
IMAGE_TEXT_FIELDS = ("input_reference[", "image_reference")
"""Form fields that may carry an image as text (server.compat decodes them)."""
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
TEXT_SLACK = 1024 * 1024  # room for prompts and numbers beside the largest image
MAX_FIELD_BYTES = 64 * 1024  # one text field (a prompt is a few hundred bytes)
MAX_PARTS = 100  # form fields or parts; the schema has fewer than 20 names


def body_cap(limits: Limits) -> int:
    """The byte budget of any body: the largest image base64-encoded (4/3) plus the text fields."""
    return limits.max_upload_bytes * 4 // 3 + 4 + TEXT_SLACK


def _too_large(what: str, limits: Limits, param: str | None = IMAGE_FIELD) -> ApiError:
    return ApiError(
        413,
        f"{what}; {IMAGE_FIELD} may be at most {limits.max_upload_bytes} bytes (--max-upload-bytes) and the "
        f"whole body at most {body_cap(limits)} bytes",
        param,
    )


async def read_video_request(request: Request, limits: Limits) -> tuple[dict[str, Any], bytes | None]:
    """(fields, image bytes or None) from a multipart/urlencoded form or a JSON object."""
    content_type = request.headers.get("content-type", "")
    media_type = content_type.split(";")[0].strip().lower()
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > body_cap(limits):
        raise _too_large(f"the request body is {length} bytes", limits, "body")
    if media_type not in (*FORM_TYPES, "application/json"):
        raise ApiError(
            415,
            f"Content-Type {quoted(media_type or '(none)')} is not accepted; "
            "send multipart/form-data or application/json",
            "Content-Type",
        )
    chunks = body_chunks(request.receive, limits)
    if media_type == "multipart/form-data":
        return await _read_multipart(chunks, content_type, limits)
    data = b"".join([chunk async for chunk in chunks])
    if media_type == "application/json":
        return _parse_json(data, limits)
    return _parse_urlencoded(data, limits)


async def body_chunks(receive: Receive, limits: Limits) -> AsyncIterator[bytes]:
    """The body's chunks as they arrive, refused (413) the moment the total passes `body_cap`, and
    499 when the client hangs up mid-body (nobody is left to answer; the metrics count it)."""
    cap, size = body_cap(limits), 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ApiError(499, "the client closed the connection while sending the body", "body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > cap:
            raise _too_large(f"the request body passed {cap} bytes", limits, "body")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


def _parse_json(data: bytes, limits: Limits) -> tuple[dict[str, Any], bytes | None]:
    try:
        fields = json.loads(data)
    except ValueError as exc:  # bad syntax or UTF-8, or an integer of more than 4300 digits
        raise ApiError(400, f"the body is not valid JSON: {exc}", "body") from None
    except RecursionError:
        raise ApiError(400, "the JSON body is nested too deeply", "body") from None
    if not isinstance(fields, dict):
        raise ApiError(400, f"the JSON body must be an object, got {type(fields).__name__}", "body")
    reference = fields.get(IMAGE_FIELD)
    if isinstance(reference, dict):  # OpenAI's {"image_url": ...} reference: server.compat reads it
        return fields, None
    fields.pop(IMAGE_FIELD, None)
    if reference is None or reference == "":
        return fields, None
    if not isinstance(reference, str):
        raise ApiError(400, f"{IMAGE_FIELD} must be a base64 string or a data URL in a JSON body", IMAGE_FIELD)
    return fields, decode_base64_image(reference, limits)


def _parse_urlencoded(data: bytes, limits: Limits) -> tuple[dict[str, Any], bytes | None]:
    try:
        pairs = parse_qsl(data.decode("utf-8"), keep_blank_values=True, max_num_fields=MAX_PARTS, errors="strict")
    except ValueError as exc:  # too many fields, or not UTF-8
        raise ApiError(400, f"the form body cannot be parsed: {exc}", "body") from None
    fields: dict[str, Any] = dict(pairs)
    reference = fields.pop(IMAGE_FIELD, "")
    return fields, decode_base64_image(reference, limits) if reference.strip() else None


def decode_base64_image(text: str, limits: Limits, field: str = IMAGE_FIELD) -> bytes:
    """Base64 or a `data:image/...;base64,` URL -> bytes. URLs and paths are never fetched or opened.
    `field` names where the image came (input_reference, image_reference) in the errors."""
    text = text.strip()
    if text.startswith(("http://", "https://", "file:", "/")):
        raise ApiError(
            400,
            f"{field} must be the image itself (base64 or a data URL); URLs and paths are not fetched",
            field,
        )
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or not header.endswith(";base64"):
            raise ApiError(400, f"{field} data URL must look like data:image/png;base64,...", field)
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{field} is not valid base64", field) from None
    if len(data) > limits.max_upload_bytes:
        raise _too_large(f"{field} is {len(data)} bytes", limits, field)
    return data


async def _read_multipart(
    chunks: AsyncIterator[bytes], content_type: str, limits: Limits
) -> tuple[dict[str, Any], bytes | None]:
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise ApiError(400, "the multipart Content-Type has no boundary", "Content-Type")
    form = _Form(limits)
    try:
        parser = MultipartParser(boundary, form.callbacks())
        async for chunk in chunks:
            parser.write(chunk)
        parser.finalize()
    except ValueError as exc:  # python-multipart's parse errors
        raise ApiError(400, f"the form body cannot be parsed: {exc}", "body") from None
    if not form.ended:
        raise ApiError(400, "the form body ends before its closing boundary", "body")
    return form.fields, form.image


class _Form:
    """python-multipart's callbacks: each part's bytes are kept in memory and checked against the
    part's own limit as they arrive (the image against --max-upload-bytes, a text field against
    MAX_FIELD_BYTES), so an oversized part is refused after at most that many bytes."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.fields: dict[str, Any] = {}
        self.image: bytes | None = None
        self.ended = False
        self.parts = 0
        self._headers: dict[bytes, bytes] = {}
        self._header = [b"", b""]
        self._name = ""
        self._filename: bytes | None = None
        self._chunks: list[bytes] = []
        self._size = 0
        self._limit = 0

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda data, start, end: self._add_header(0, data[start:end]),
            "on_header_value": lambda data, start, end: self._add_header(1, data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise ApiError(400, f"the form has more than {MAX_PARTS} parts", "body")
        self._headers, self._chunks, self._size = {}, [], 0

    def _add_header(self, index: int, data: bytes) -> None:
        self._header[index] += data

    def _header_end(self) -> None:
        name, value = self._header
        self._headers[name.strip().lower()] = value.strip()
        self._header = [b"", b""]

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        try:
            self._name = options[b"name"].decode("utf-8")
        except (KeyError, UnicodeDecodeError):
            raise ApiError(400, "a form part has no name (Content-Disposition: form-data; name=...)", "body") from None
        self._filename = options.get(b"filename")
        if self._name == IMAGE_FIELD:
            is_file = self._filename is not None
            self._limit = self.limits.max_upload_bytes if is_file else body_cap(self.limits)
        elif self._name.startswith(IMAGE_TEXT_FIELDS) and self._filename is None:
            self._limit = body_cap(self.limits)  # an image as text: {"image_url": "data:..."} and the like
        elif self._filename is not None:
            raise ApiError(400, f"{self._name} must be a text field, not a file upload", self._name)
        else:
            self._limit = MAX_FIELD_BYTES

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        self._size += end - start
        if self._size > self._limit:
            what = "the uploaded file" if self._filename is not None else "the field"
            raise _too_large(f"{what} {self._name} passed {self._limit} bytes", self.limits, self._name)
        self._chunks.append(data[start:end])

    def _part_end(self) -> None:
        value = b"".join(self._chunks)
        self._chunks = []
        if self._name == IMAGE_FIELD and self._filename is not None:
            # an HTML form's empty file input (no file chosen) means no image
            self.image = value if value or self._filename else None
            return
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(400, f"{self._name} is not UTF-8 text", self._name) from None
        if self._name == IMAGE_FIELD:  # a form may carry the image as base64 text too
            self.image = decode_base64_image(text, self.limits) if text.strip() else None
        else:
            self.fields[self._name] = text

    def _end(self) -> None:
        self.ended = True
