"""Engine creation (SQLite with WAL, busy timeout and foreign keys by default; PostgreSQL by
URL) and the schema, built by alembic migrations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event, make_url, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from control_plane.db import tables  # noqa: F401  (registers the tables on the metadata)


def make_engine(url: str) -> AsyncEngine:
    """The engine migrations run on, and PostgreSQL's units of work (SQLite's run on
    :func:`make_sqlite_engine`'s, see ``database.py``)."""
    if url.startswith("sqlite"):
        engine = create_async_engine(url, connect_args={"timeout": 30})
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    for plain in ("postgresql://", "postgres://"):
        if url.startswith(plain):
            url = "postgresql+asyncpg://" + url.removeprefix(plain)
    return create_async_engine(url, pool_pre_ping=True)


def make_sqlite_engine(url: str) -> Engine:
    """The blocking driver, for the one thread that runs SQLite's units of work."""
    engine = create_engine(make_url(url).set(drivername="sqlite"), connect_args={"timeout": 30})
    event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=5000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


MIGRATIONS = Path(__file__).parent / "migrations"


def alembic_config(connection: Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


# The key of the PostgreSQL advisory lock migrations run under ("comfyfle", as a bigint).
MIGRATION_LOCK = 0x636F6D6679666C65


async def create_schema(engine: AsyncEngine) -> None:
    """Bring the database to the newest schema (alembic upgrade head). On PostgreSQL,
    control planes starting together take turns under an advisory lock held until the
    migration commits: one migrates, the others then find nothing left to do (unlocked,
    all but one failed creating the same tables)."""
    async with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        await conn.run_sync(lambda sync: command.upgrade(alembic_config(sync), "head"))
