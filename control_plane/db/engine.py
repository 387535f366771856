"""Engine creation: SQLite with WAL, busy timeout and foreign keys by default; PostgreSQL by
URL. The schema they serve is ``schema.py``'s."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, create_engine, event, make_url
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
