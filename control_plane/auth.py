"""Bearer tokens: ``Authorization: Bearer cf_…`` or ``X-Authorization: <token>``.

Client and operator tokens belong to an account; runner tokens (``cfr_…``) belong to one
runner and open nothing but the agent endpoints.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from aiohttp import web

from control_plane.db.store import Store
from control_plane.db.tables import Account, Runner, as_utc, utcnow
from control_plane.model.errors import Forbidden, Unauthorized

# last_used_at is written at most this often per token, not on every request.
_TOUCH_EVERY_S = 60.0


# What a token may do: act for its account (client), watch its account's fleet (operator),
# or watch every account's (admin, the platform's own operators).
SCOPES = ("client", "operator", "admin")
_OPERATOR_SCOPES = frozenset({"operator", "admin"})


@dataclass(frozen=True)
class Principal:
    account: Account
    scope: str
    token_id: str

    @property
    def sees_every_account(self) -> bool:
        return self.scope == "admin"


def bearer_token(request: web.Request) -> str | None:
    """The token sent, if any. Tokens are printable ASCII: anything else is no token of ours
    (and bytes that are not even UTF-8 must not reach the hash)."""
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        raw: str | None = header[7:].strip() or None
    else:
        alt = request.headers.get("X-Authorization", "").strip()
        raw = (alt[7:].strip() if alt.lower().startswith("bearer ") else alt) or None
    if raw is not None and not (raw.isascii() and raw.isprintable()):
        raise Unauthorized("invalid token: a token is printable ASCII")
    return raw


class Authenticator:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._touched: dict[str, float] = {}

    async def client(self, request: web.Request, scope: str | None = None) -> Principal:
        raw = bearer_token(request)
        if raw is None:
            raise Unauthorized("missing token: send 'Authorization: Bearer <token>'")
        return await self.token(raw, scope)

    async def token(self, raw: str, scope: str | None = None) -> Principal:
        """Whose token ``raw`` is; :class:`Unauthorized` if nobody's (or not ``scope``)."""
        found = await self.store.resolve_token(raw)
        if found is None:
            raise Unauthorized("invalid token")
        token, account = found
        if token.expires_at is not None and as_utc(token.expires_at) <= utcnow():
            raise Unauthorized("token expired")
        if scope == "operator" and token.scope not in _OPERATOR_SCOPES:
            raise Forbidden("this needs an operator token")
        now = time.monotonic()
        if now - self._touched.get(token.id, -_TOUCH_EVERY_S) >= _TOUCH_EVERY_S:
            self._touched[token.id] = now
            await self.store.touch_token(token.id)
        return Principal(account=account, scope=token.scope, token_id=token.id)

    async def runner(self, request: web.Request) -> Runner:
        raw = bearer_token(request)
        if raw is None:
            raise Unauthorized("missing runner token")
        runner = await self.store.runner_by_token(raw)
        if runner is None:
            raise Unauthorized("invalid runner token")
        return runner
