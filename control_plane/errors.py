"""Domain errors, turned into JSON HTTP answers in one middleware.

    DomainError
     ├── BadRequest        400
     │    └── TooLarge     400 (the request is over the size cap)
     ├── Unauthorized      401
     ├── Forbidden         403 (tier limits)
     ├── NotFound          404 (also for other accounts' objects: never 403)
     ├── Conflict          409
     ├── PayloadTooLarge   413 (an agent's upload past its limits, refused before its body)
     ├── Unprocessable     422 (an idempotency key reused with another body)
     ├── TooManyRequests   429 (a submit rate limit; ``retry_after_s`` goes in Retry-After)
     └── GatewayTimeout    504 (a runner did not answer in time)

Nothing below the API layer raises ``web.HTTP*``.
"""

from __future__ import annotations

import json
import logging
import math

from aiohttp import web

log = logging.getLogger(__name__)


class DomainError(Exception):
    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(DomainError):
    status = 400


class TooLarge(BadRequest):
    pass


class Unauthorized(DomainError):
    status = 401


class Forbidden(DomainError):
    status = 403


class NotFound(DomainError):
    status = 404


class Conflict(DomainError):
    status = 409


class PayloadTooLarge(DomainError):
    status = 413


class Unprocessable(DomainError):
    status = 422


class TooManyRequests(DomainError):
    status = 429

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class GatewayTimeout(DomainError):
    status = 504


def error_response(status: int, message: str) -> web.Response:
    return web.json_response({"status": status, "message": message}, status=status)


@web.middleware
async def error_middleware(request: web.Request, handler):  # type: ignore[no-untyped-def]
    try:
        return await handler(request)
    except TooManyRequests as exc:
        resp = error_response(exc.status, exc.message)
        resp.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
        return resp
    except DomainError as exc:
        return error_response(exc.status, exc.message)
    except web.HTTPException as exc:
        # aiohttp's own answers (unknown route, wrong method) in the same JSON shape.
        if exc.status >= 400 and not isinstance(exc, web.HTTPSuccessful):
            resp = error_response(exc.status, exc.reason or "error")
            for key in ("Allow",):
                if key in exc.headers:
                    resp.headers[key] = exc.headers[key]
            return resp
        raise
    except json.JSONDecodeError as exc:
        return error_response(400, f"request body is not valid JSON: {exc.msg}")


@web.middleware
async def url_middleware(request: web.Request, handler):  # type: ignore[no-untyped-def]
    """A NUL anywhere in the path or the query (ids, filters) is refused up front: PostgreSQL
    cannot compare text with one, so every database answers the same."""
    if "\x00" in request.path or any("\x00" in k or "\x00" in v for k, v in request.query.items()):
        raise BadRequest("the URL holds a NUL character (%00)")
    return await handler(request)
