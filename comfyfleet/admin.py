"""``comfyfleet admin``: accounts and tokens, straight against the database."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

from control_plane.db.engine import make_engine
from control_plane.db.schema import create_schema
from control_plane.db.store import Store
from control_plane.db.tables import utcnow
from control_plane.settings import Settings


@asynccontextmanager
async def _store(settings: Settings) -> AsyncIterator[Store]:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.resolved_database_url)
    try:
        await create_schema(engine)
    except BaseException:
        await engine.dispose()
        raise
    store = Store(engine)
    try:
        yield store
    finally:
        await store.close()


async def create_token(
    settings: Settings, account: str, tier: str | None, scope: str, expires_in_days: float | None
) -> str:
    """A new token (and the account, when it is new); it is shown this once."""
    if tier is not None and tier not in settings.tiers:
        raise ValueError(f"unknown tier {tier!r}; choose from {', '.join(settings.tiers)}")
    if expires_in_days is not None and not (math.isfinite(expires_in_days) and expires_in_days > 0):
        raise ValueError("--expires-in-days must be a number of days above 0 (leave it out: no expiry)")
    async with _store(settings) as store:
        acct = await store.get_or_create_account(account, tier)
        expires = utcnow() + timedelta(days=expires_in_days) if expires_in_days is not None else None
        raw, _ = await store.create_token(acct.id, scope, expires)
        return raw


async def list_tokens(settings: Settings, account: str | None) -> list[dict[str, Any]]:
    """Every token (of one account, if named), newest first; never the token itself."""
    async with _store(settings) as store:
        return await store.list_tokens(account)


async def revoke_token(settings: Settings, token_id: str) -> bool:
    async with _store(settings) as store:
        return await store.revoke_token(token_id)
