"""On SQLite, one control plane per database file.

A control plane keeps what is live in its own memory: the connected runners, the index of
waiting workflows, the grace timers. Two serving one SQLite file would each dispatch the
same waiting workflows and neither would see the other's runners. So ``serve`` holds an
exclusive lock on a file beside the database for as long as it runs, and a second one says
so at start and stops. Short commands (``comfyfleet admin``) open the database without it;
several control planes together run on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TextIO

from control_plane.db.refusals import DatabaseInUse


@asynccontextmanager
async def sole_server(url: str) -> AsyncIterator[None]:
    """Hold the lock on the database at ``url`` while inside, if it is a SQLite file."""
    lock = SoleServer.for_url(url)
    if lock is None:
        yield
        return
    await asyncio.to_thread(lock.acquire)
    try:
        yield
    finally:
        lock.release()


class SoleServer:
    def __init__(self, database: Path) -> None:
        self.database = database
        self.path = database.with_name(database.name + ".serve-lock")
        self._held: TextIO | None = None

    @classmethod
    def for_url(cls, url: str) -> SoleServer | None:
        """The lock for a SQLite file database; ``None`` for any other database."""
        from sqlalchemy import make_url  # here: the command line imports this module at start

        parsed = make_url(url)
        if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
            return None
        return cls(Path(parsed.database).resolve())

    def acquire(self) -> None:
        """Take the lock (blocking file calls: run it off the loop), or raise
        :class:`DatabaseInUse` naming the process that holds it. The operating system lets
        go of it when this process ends, however it ends."""
        fh = self.path.open("a+", encoding="utf-8")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "?"
            fh.close()
            raise DatabaseInUse(
                f"another control plane (pid {holder}) already serves {self.database}: SQLite takes "
                "one; several control planes share a PostgreSQL database (--database-url postgresql://…)"
            ) from None
        fh.truncate(0)
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self._held = fh

    def release(self) -> None:
        if self._held is not None:
            fcntl.flock(self._held, fcntl.LOCK_UN)
            self._held.close()
            self._held = None
