"""``Idempotency-Key`` on create, both reruns and template runs: a retry with the same key and
the same request gets the first answer again and creates nothing; the same key with another
request is a 422.

Exactly once, whatever crashes when: the answer is stored in the same transaction as what it
answers for (the new workflow, the new attempt), so a retry after a crash finds both or
neither. Finding both, it replays the answer; finding neither, it runs the request cleanly.
Two requests with one key at the same time both do the work but only one commits; the other
answers with what that one stored. Nothing is ever reserved, so nothing is ever left stuck.

The request is identified by a fingerprint (for multipart bodies: the fields, and the
sha256 of each file part, which the store already computed)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from control_plane.db.store import KeyTaken
from control_plane.db.tables import IdempotencyRecord, as_utc, utcnow
from control_plane.model.errors import BadRequest, Conflict, Unprocessable
from control_plane.services import Services

HEADER = "Idempotency-Key"
MAX_KEY_LENGTH = 255
# A key answers retries for a day.
KEEP_S = 24 * 3600


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class Claim:
    """A request under an Idempotency-Key; its answer goes into the transaction that
    creates what the request asked for."""

    account_id: str
    key: str  # scoped: method, path and the client's key
    request_hash: str

    def receipt(self, status: int, body: str, content_type: str = "application/json") -> IdempotencyRecord:
        return IdempotencyRecord(
            account_id=self.account_id,
            key=self.key,
            request_hash=self.request_hash,
            status=status,
            body=f"{content_type}\n{body}",
        )


def _replay(record: IdempotencyRecord, request_hash: str, key: str) -> web.Response:
    if record.request_hash != request_hash:
        raise Unprocessable(f"{HEADER} {key!r} was already used with a different request")
    content_type, _, body = record.body.partition("\n")
    return web.Response(
        status=record.status, text=body, content_type=content_type, headers={"Idempotent-Replayed": "true"}
    )


async def once(
    request: web.Request,
    account_id: str,
    request_hash: str,
    produce: Callable[[Claim | None], Awaitable[web.Response]],
) -> web.Response:
    """Answer a request that already ran under this key again, else run ``produce``, which
    stores its answer with :meth:`Claim.receipt` in the transaction that does the work."""
    key = request.headers.get(HEADER)
    if key is None:
        return await produce(None)
    if not key or len(key) > MAX_KEY_LENGTH or not (key.isascii() and key.isprintable()):
        raise BadRequest(f"{HEADER} must be 1 to {MAX_KEY_LENGTH} printable ASCII characters")
    svc: Services = request.app[Services.KEY]
    scoped = f"{request.method} {request.path} {key}"
    record = await svc.store.get_idempotent(account_id, scoped)
    if record is not None:
        if (utcnow() - as_utc(record.created_at)).total_seconds() <= KEEP_S:
            return _replay(record, request_hash, key)
        await svc.store.forget_idempotent(account_id, scoped)
    try:
        return await produce(Claim(account_id, scoped, request_hash))
    except KeyTaken:
        # Another request with this key committed first: its answer is ours.
        record = await svc.store.get_idempotent(account_id, scoped)
        if record is None:
            raise Conflict(f"a request with {HEADER} {key!r} changed meanwhile; retry it") from None
        return _replay(record, request_hash, key)
