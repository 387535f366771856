"""Small request helpers shared by the API modules."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from control_plane.errors import BadRequest
from control_plane.json_limits import parse_json


def paging(request: web.Request) -> tuple[int, int]:
    """``page`` (from 1) and ``per_page`` (1..100, default 10) -> (offset, limit)."""
    try:
        page = int(request.query.get("page", "1"))
        per_page = int(request.query.get("per_page", "10"))
    except ValueError as exc:
        raise BadRequest("page and per_page must be integers") from exc
    if page < 1:
        raise BadRequest("page must be 1 or more")
    if not 1 <= per_page <= 100:
        raise BadRequest("per_page must be between 1 and 100")
    return (page - 1) * per_page, per_page


async def json_body(request: web.Request, limit: int = 1024 * 1024) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > limit:
        raise BadRequest(f"body is larger than {limit} bytes")
    raw = await request.content.read(limit + 1)
    if len(raw) > limit:
        raise BadRequest(f"body is larger than {limit} bytes")
    if not raw.strip():
        return {}
    data = parse_json(raw, "body")
    if not isinstance(data, dict):
        raise BadRequest("body must be a JSON object")
    return data
