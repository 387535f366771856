"""Where the store's units of work run: each is a plain function over a session, and one call
runs it whole (its statements and its commit) in a single step for the loop.

SQLite's Python driver blocks, so its async adapter hops to a thread for every cursor call
(execute, fetch, close, commit, rollback: five to thirteen hops per session, each a wake-up of
the loop). Here a unit of work hops once: one thread, with the one connection, runs units back
to back. It is also what makes a read-check-write atomic on SQLite, which has no row locks: no
two units ever interleave. PostgreSQL's driver is async already; a unit runs on a pooled
connection through SQLAlchemy's greenlet bridge, many at once, and locks rows as it goes
(``SELECT … FOR UPDATE``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import Session
from sqlmodel.ext.asyncio.session import AsyncSession

from control_plane.db.engine import make_sqlite_engine

T = TypeVar("T")
Work = Callable[[Session], T]


class Database:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        self._sqlite: Engine | None = None
        self._thread: ThreadPoolExecutor | None = None
        if self.dialect == "sqlite":
            self._sqlite = make_sqlite_engine(engine.url.render_as_string(hide_password=False))
            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")

    async def run(self, work: Work[T]) -> T:
        """Run one unit of work: it commits what it means to keep; whatever it leaves
        uncommitted is rolled back."""
        if self._thread is not None:
            return await asyncio.get_running_loop().run_in_executor(self._thread, self._in_thread, work)
        async with AsyncSession(self.engine, expire_on_commit=False) as s:
            # sqlmodel's AsyncSession hands run_sync its own (sqlmodel) Session class.
            return await s.run_sync(work)  # type: ignore[arg-type]

    def _in_thread(self, work: Work[T]) -> T:
        with Session(self._sqlite, expire_on_commit=False) as s:
            return work(s)

    async def close(self) -> None:
        if self._thread is not None and self._sqlite is not None:
            sqlite = self._sqlite
            await asyncio.get_running_loop().run_in_executor(self._thread, sqlite.dispose)
            self._thread.shutdown(wait=False)
            self._thread = None
        await self.engine.dispose()
