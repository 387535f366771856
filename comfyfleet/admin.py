"""``comfyfleet admin``: accounts and tokens, straight against the database."""

from __future__ import annotations

from datetime import timedelta

from control_plane.db import create_schema, make_engine
from control_plane.settings import Settings
from control_plane.store import Store
from control_plane.tables import utcnow


async def create_token(
    settings: Settings, account: str, tier: str | None, scope: str, expires_in_days: float | None
) -> str:
    if tier is not None and tier not in settings.tiers:
        raise ValueError(f"unknown tier {tier!r}; choose from {', '.join(settings.tiers)}")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.resolved_database_url)
    try:
        await create_schema(engine)
        store = Store(engine)
        acct = await store.get_or_create_account(account, tier)
        expires = utcnow() + timedelta(days=expires_in_days) if expires_in_days else None
        raw, _ = await store.create_token(acct.id, scope, expires)
        return raw
    finally:
        await engine.dispose()
