"""Where the store's units of work run: each is a plain function over a session, and one call
runs it whole (its statements and its commit) in a single step for the loop.

SQLite's Python driver blocks, so its async adapter hops to a thread for every cursor call
(execute, fetch, close, commit, rollback: five to thirteen hops per session, each a wake-up of
the loop). Here a unit of work hops once: one thread, with the one connection, runs units back
to back, and wakes the loop once for all that finished together. It is also what makes a
read-check-write atomic on SQLite, which has no row locks: no two units ever interleave.
PostgreSQL's driver is async already; a unit runs on a pooled connection through
SQLAlchemy's greenlet bridge, many at once, and locks rows as it goes (``SELECT … FOR
UPDATE``)."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import Session
from sqlmodel.ext.asyncio.session import AsyncSession

from control_plane.db.engine import make_sqlite_engine

T = TypeVar("T")
Work = Callable[[Session], T]
# What the thread hands back: the future, and the result or the exception of its unit.
_Settled = tuple["asyncio.Future[Any]", bool, Any]


class Database:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        self._thread: _SqliteThread | None = None
        if self.dialect == "sqlite":
            self._thread = _SqliteThread(engine.url.render_as_string(hide_password=False))

    async def run(self, work: Work[T]) -> T:
        """Run one unit of work: it commits what it means to keep; whatever it leaves
        uncommitted is rolled back."""
        if self._thread is not None:
            result: T = await self._thread.submit(work)
            return result
        async with AsyncSession(self.engine, expire_on_commit=False) as s:
            # sqlmodel's AsyncSession hands run_sync its own (sqlmodel) Session class.
            return await s.run_sync(work)  # type: ignore[arg-type]

    async def close(self) -> None:
        if self._thread is not None:
            await asyncio.to_thread(self._thread.stop)
            self._thread = None
        await self.engine.dispose()


class _SqliteThread:
    """The one thread that holds SQLite's connection. It runs the units queued for it back
    to back and hands back all that finished in one batch: one wake-up of the loop however
    many there were, where a thread pool wakes it once per unit."""

    def __init__(self, url: str) -> None:
        self._engine = make_sqlite_engine(url)
        self._queue: queue.SimpleQueue[tuple[asyncio.Future[Any], Work[Any]] | None] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._serve, name="sqlite", daemon=True)
        self._thread.start()

    def submit(self, work: Work[T]) -> asyncio.Future[T]:
        self._loop = self._loop or asyncio.get_running_loop()
        future: asyncio.Future[T] = self._loop.create_future()
        self._queue.put((future, work))
        return future

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _serve(self) -> None:
        while True:
            batch = [self._queue.get()]
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            settled: list[_Settled] = []
            for item in batch:
                if item is None:
                    self._hand_back(settled)
                    self._engine.dispose()
                    return
                future, work = item
                try:
                    with Session(self._engine, expire_on_commit=False) as s:
                        settled.append((future, True, work(s)))
                except BaseException as exc:  # the awaiting coroutine gets it, whatever it is
                    settled.append((future, False, exc))
            self._hand_back(settled)

    def _hand_back(self, settled: list[_Settled]) -> None:
        if settled and self._loop is not None:
            self._loop.call_soon_threadsafe(_settle, settled)


def _settle(settled: list[_Settled]) -> None:
    for future, ok, value in settled:
        if future.cancelled():
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)
