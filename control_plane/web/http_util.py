"""Small request helpers shared by the API modules."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from control_plane.model.errors import BadRequest
from control_plane.model.json_limits import json_holds_nul, parse_json

# Far beyond any list's end, and well inside what both databases take as an offset.
MAX_PAGE = 1_000_000


def paging(request: web.Request) -> tuple[int, int]:
    """``page`` (1..1,000,000) and ``per_page`` (1..100, default 10) -> (offset, limit)."""
    try:
        page = int(request.query.get("page", "1"))
        per_page = int(request.query.get("per_page", "10"))
    except ValueError as exc:
        raise BadRequest("page and per_page must be integers") from exc
    if not 1 <= page <= MAX_PAGE:
        raise BadRequest(f"page must be between 1 and {MAX_PAGE}")
    if not 1 <= per_page <= 100:
        raise BadRequest("per_page must be between 1 and 100")
    return (page - 1) * per_page, per_page


async def json_body(
    request: web.Request, limit: int = 1024 * 1024, *, required: bool = False
) -> dict[str, Any]:
    """The request's JSON object (``{}`` for an empty body unless ``required``)."""
    if request.content_length is not None and request.content_length > limit:
        raise BadRequest(f"body is larger than {limit} bytes")
    raw = await request.content.read(limit + 1)
    if len(raw) > limit:
        raise BadRequest(f"body is larger than {limit} bytes")
    if not raw.strip():
        if required:
            raise BadRequest("a JSON object is required as the body")
        return {}
    data = parse_json(raw, "body")
    if not isinstance(data, dict):
        raise BadRequest("body must be a JSON object")
    if json_holds_nul(data):
        raise BadRequest("body holds a NUL character (\\u0000), which cannot be stored")
    return data
