"""One error shape for every failure (OpenAI's `{"error": {message, type, param, code}}`), never a 200."""

from __future__ import annotations

import re
from typing import Any

from fastapi.responses import JSONResponse

# status -> (OpenAI-style type, the error's code: a string, as OpenAI's clients read it, the metrics outcome)
KINDS = {
    400: ("invalid_request_error", "invalid_request", "invalid"),
    401: ("authentication_error", "invalid_api_key", "unauthorized"),
    403: ("permission_error", "forbidden", "forbidden"),
    404: ("not_found_error", "not_found", "unknown_model"),
    408: ("request_timeout", "request_timeout", "timeout"),
    413: ("request_too_large", "request_too_large", "too_large"),
    415: ("unsupported_media_type", "unsupported_media_type", "unsupported_media_type"),
    422: ("invalid_request_error", "video_failed", "invalid"),
    429: ("rate_limit_error", "queue_full", "queue_full"),
    499: ("client_closed_request", "client_closed_request", "disconnected"),  # nginx's code; the answer reaches nobody
    500: ("server_error", "server_error", "failed"),
    503: ("service_unavailable", "unavailable", "unavailable"),
}
_OTHER = ("error", "error", "error")

# An absolute path inside a message (`'/srv/out/x.mp4'`, `/models/wan: ...`), but not a URL's
# slashes or a ratio like 1/2: what comes right before the slash must not be a word, ':' or '/'.
_ABSOLUTE_PATH = re.compile(r"(?<![\w:/.~-])/[^\s'\"`,;:()\[\]{}<>]+")


QUOTED_CHARS = 40


def quoted(value: object) -> str:
    """What a client sent, quoted in an error: its repr, cut to the first QUOTED_CHARS characters
    (an answer never echoes a 60 KB id back whole)."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= QUOTED_CHARS:
        return repr(text)
    return f"{text[:QUOTED_CHARS]!r}... ({len(text)} characters)"


def scrub_paths(text: str) -> str:
    """`text` with absolute paths replaced by <path>: answers never reveal the server's folders."""
    return _ABSOLUTE_PATH.sub("<path>", text)


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """The JSON of an error answer (also written raw by the transport, which has no app to ask)."""
    kind, code, _ = KINDS.get(status, _OTHER)
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class ApiError(Exception):
    """An answer other than success; `param` names the request field at fault."""

    def __init__(
        self, status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers or {}

    @property
    def outcome(self) -> str:
        return KINDS.get(self.status, _OTHER)[2]

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.status, self.message, self.param), self.status, headers=self.headers)
