"""One error shape for every failure (OpenAI's `{"error": {message, type, param, code}}`), never a 200."""

from __future__ import annotations

from fastapi.responses import JSONResponse

# status -> (OpenAI-style type, the metrics outcome)
KINDS = {
    400: ("invalid_request_error", "invalid"),
    401: ("authentication_error", "unauthorized"),
    404: ("not_found_error", "unknown_model"),
    413: ("request_too_large", "too_large"),
    415: ("unsupported_media_type", "unsupported_media_type"),
    429: ("rate_limit_error", "queue_full"),
    499: ("client_closed_request", "disconnected"),  # nginx's code; the answer reaches nobody
    500: ("server_error", "failed"),
    503: ("service_unavailable", "unavailable"),
}


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
        return KINDS.get(self.status, ("error", "error"))[1]

    def response(self) -> JSONResponse:
        kind = KINDS.get(self.status, ("error", "error"))[0]
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.status}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)
