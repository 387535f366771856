"""``Idempotency-Key`` on create and rerun: a retry with the same key and the same request
gets the first answer again and creates nothing; the same key with another request is a 422.

The first answer is stored with a fingerprint of the request (for multipart bodies: the
fields, and the sha256 of each file part, which the store already computed)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from sqlalchemy.exc import IntegrityError

from control_plane.errors import BadRequest, Conflict, Unprocessable
from control_plane.services import Services
from control_plane.tables import IdempotencyRecord, as_utc, utcnow

HEADER = "Idempotency-Key"
MAX_KEY_LENGTH = 255
# A key answers retries for a day; a reservation whose request never finished (the process
# died under it) is given up after a few minutes.
KEEP_S = 24 * 3600
ABANDONED_S = 300


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _replay(record: IdempotencyRecord) -> web.Response:
    content_type, _, body = record.body.partition("\n")
    return web.Response(
        status=record.status, text=body, content_type=content_type, headers={"Idempotent-Replayed": "true"}
    )


async def once(
    request: web.Request,
    account_id: str,
    request_hash: str,
    produce: Callable[[], Awaitable[web.Response]],
) -> web.Response:
    """Run ``produce`` unless this key already answered; remember successful answers."""
    key = request.headers.get(HEADER)
    if key is None:
        return await produce()
    if not key or len(key) > MAX_KEY_LENGTH:
        raise BadRequest(f"{HEADER} must be 1 to {MAX_KEY_LENGTH} characters")
    svc: Services = request.app[Services.KEY]
    scoped = f"{request.method} {request.path} {key}"
    # Reserve the key before doing the work, so two concurrent retries cannot both create.
    try:
        await svc.store.put_idempotent(
            IdempotencyRecord(account_id=account_id, key=scoped, request_hash=request_hash, status=0, body="")
        )
    except IntegrityError:
        record = await svc.store.get_idempotent(account_id, scoped)
        age_s = (utcnow() - as_utc(record.created_at)).total_seconds() if record is not None else 0.0
        if record is not None and (age_s > KEEP_S or (record.status == 0 and age_s > ABANDONED_S)):
            await svc.store.delete_idempotent(account_id, scoped)
            record = None
        if record is None:  # the first request failed and let the key go meanwhile
            return await once(request, account_id, request_hash, produce)
        if record.request_hash != request_hash:
            raise Unprocessable(f"{HEADER} {key!r} was already used with a different request") from None
        if record.status == 0:
            raise Conflict(f"a request with {HEADER} {key!r} is still in progress; retry shortly") from None
        return _replay(record)
    try:
        response = await produce()
    except BaseException:
        await svc.store.delete_idempotent(account_id, scoped)
        raise
    if 200 <= response.status < 300 and isinstance(response.text, str):
        await svc.store.finish_idempotent(
            account_id, scoped, response.status, f"{response.content_type}\n{response.text}"
        )
    else:
        await svc.store.delete_idempotent(account_id, scoped)
    return response
