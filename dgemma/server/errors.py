"""Errors in OpenAI's JSON shape: {"error": {"message", "type", "param", "code"}}.

Every error the server answers with is an `APIError`; the app's exception handlers turn it (and Starlette's
404/405, and anything unexpected) into that shape, so a client never sees another body.
"""

from __future__ import annotations

from http import HTTPStatus

from fastapi.responses import JSONResponse

# HTTP status -> OpenAI error type (the values OpenAI and vLLM send).
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """An error answered to the client. `param` names the offending request field when there is one."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        if self.status in (429, 503):
            headers = {"Retry-After": "1"}
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def unsupported(param: str, why: str) -> APIError:
    """A standard parameter this server does not honour: a precise 400 instead of silently ignoring it."""
    return APIError(400, f"{param}: {why}", param=param, code="unsupported_parameter")


def status_error(status: int, message: str | None = None) -> APIError:
    """An APIError for a plain HTTP status (Starlette's 404/405 and the like)."""
    return APIError(status, message or HTTPStatus(status).phrase)
