"""The two middlewares every request passes: domain errors become JSON answers, and URLs that
no database could look up are refused before any handler sees them."""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable

from aiohttp import web

from control_plane.model.errors import BadRequest, DomainError, TooManyRequests

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(status: int, message: str) -> web.Response:
    return web.json_response({"status": status, "message": message}, status=status)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
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
async def url_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A NUL anywhere in the path or the query (ids, filters) is refused up front: PostgreSQL
    cannot compare text with one, so every database answers the same."""
    if "\x00" in request.path or any("\x00" in k or "\x00" in v for k, v in request.query.items()):
        raise BadRequest("the URL holds a NUL character (%00)")
    return await handler(request)
