"""Errors the server returns, in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

Request handlers raise `APIError` (or a subclass); the app's exception handlers turn it, FastAPI's
validation errors and anything unexpected into a JSON body of this shape with the right HTTP status.
Plain Python: no web framework or jax is imported here.
"""

from __future__ import annotations

from http import HTTPStatus


class APIError(Exception):
    """An error answered with HTTP `status` and an OpenAI-shaped body.

    Args:
        message: what went wrong, naming the value and the limit where there is one.
        status: HTTP status code (400 bad input, 401 bad API key, 503 overloaded, ...).
        type: OpenAI's error type ("invalid_request_error", "authentication_error", "server_error").
        param: the request field at fault, if one is.
        code: a short machine-readable code, if any.
        headers: HTTP headers to send with it (`Retry-After` on 503).
    """

    def __init__(self, message: str, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    """The JSON body OpenAI sends with an error."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """HTTP 400 for input the server can never serve."""
    return APIError(message, HTTPStatus.BAD_REQUEST, "invalid_request_error", param, code)


def unauthorized(message: str) -> APIError:
    """HTTP 401 for a missing or wrong API key."""
    return APIError(message, HTTPStatus.UNAUTHORIZED, "authentication_error", None, "invalid_api_key")


RETRY_AFTER_S = 1


def overloaded(message: str) -> APIError:
    """HTTP 503 when the server holds as many requests as it may, with `Retry-After` (seconds): the
    official clients wait that long and retry (twice by default)."""
    return APIError(message, HTTPStatus.SERVICE_UNAVAILABLE, "server_error", None, "server_overloaded",
                    {"Retry-After": str(RETRY_AFTER_S)})


def stopping(message: str) -> APIError:
    """HTTP 503 for a request cut short because the server is shutting down."""
    return APIError(message, HTTPStatus.SERVICE_UNAVAILABLE, "server_error", None, "server_stopping")


def internal_error(message: str) -> APIError:
    """HTTP 500 for a failure of the server, not of the request."""
    return APIError(message, HTTPStatus.INTERNAL_SERVER_ERROR, "server_error", None, "internal_error")


def error_type_for_status(status: int) -> str:
    """OpenAI's error type for an HTTP status the framework produced itself (404, 405, ...)."""
    if status == HTTPStatus.UNAUTHORIZED:
        return "authentication_error"
    return "invalid_request_error" if status < 500 else "server_error"
