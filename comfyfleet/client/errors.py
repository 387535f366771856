"""What a call can fail with. Every failure is a :class:`ClientError`; an answer of the
server's own (a 4xx or 5xx) is an :class:`ApiError` carrying its status, message and code.

    ClientError
     ├── ConnectionFailed     the server could not be reached, or the connection broke
     ├── WaitTimeout          a wait ran past its deadline (the workflow goes on)
     └── ApiError             any answer >= 400
          ├── BadRequest      400
          ├── Unauthorized    401
          ├── Forbidden       403
          ├── NotFound        404 (also another account's object)
          ├── Conflict        409
          ├── PayloadTooLarge 413
          ├── Unprocessable   422
          ├── RateLimited     429 (``retry_after_s`` from Retry-After)
          └── ServerError     5xx
"""

from __future__ import annotations

import json
from http import HTTPStatus

import httpx


class ClientError(Exception):
    """Anything that stopped a call of :class:`~comfyfleet.client.Client`."""


class ConnectionFailed(ClientError):
    pass


class WaitTimeout(ClientError):
    pass


class ApiError(ClientError):
    status = 0

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        # The server's machine-readable code when it sends one; otherwise the status's name
        # ("not_found"), so that callers always have something stable to compare.
        self.code = code or _status_code_name(status)

    def __str__(self) -> str:
        return f"{self.message} (HTTP {self.status})"


class BadRequest(ApiError):
    pass


class Unauthorized(ApiError):
    pass


class Forbidden(ApiError):
    pass


class NotFound(ApiError):
    pass


class Conflict(ApiError):
    pass


class PayloadTooLarge(ApiError):
    pass


class Unprocessable(ApiError):
    pass


class RateLimited(ApiError):
    def __init__(
        self, status: int, message: str, code: str | None = None, retry_after_s: float = 1.0
    ) -> None:
        super().__init__(status, message, code)
        self.retry_after_s = retry_after_s


class ServerError(ApiError):
    pass


_BY_STATUS: dict[int, type[ApiError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    422: Unprocessable,
}


def _status_code_name(status: int) -> str:
    try:
        return HTTPStatus(status).name.lower()
    except ValueError:
        return f"http_{status}"


def _retry_after(response: httpx.Response) -> float:
    try:
        return max(0.0, float(response.headers.get("Retry-After", "1")))
    except ValueError:  # an HTTP date: not something this server sends
        return 1.0


def _message_and_code(response: httpx.Response) -> tuple[str, str | None]:
    """The server answers errors as ``{"status": N, "message": "..."}``; a proxy in between
    may answer with a page of its own, of which the first line says enough."""
    try:
        body = json.loads(response.content)
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        code = body.get("code")
        return body["message"], code if isinstance(code, str) else None
    text = response.content.decode("utf-8", "replace").strip()
    first = text.splitlines()[0][:300] if text else ""
    return first or response.reason_phrase or f"HTTP {response.status_code}", None


def error_for(response: httpx.Response) -> ApiError:
    """The typed error for an answer >= 400 (its body must have been read)."""
    status = response.status_code
    message, code = _message_and_code(response)
    if status == 429:
        return RateLimited(status, message, code, _retry_after(response))
    if status >= 500:
        return ServerError(status, message, code)
    return _BY_STATUS.get(status, ApiError)(status, message, code)
