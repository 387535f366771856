"""Waiting workflows across control planes that share one PostgreSQL database.

Each control plane indexes the workflows that wait in its own memory (``waiting.py``) and
dispatches them to its own agents. A workflow submitted to one control plane whose only free
agent is connected to another must reach that other's index: a control plane announces each
workflow it makes wait with ``NOTIFY`` (``Store.announce_waiting``), and every control plane
``LISTEN``s and takes the workflow into its index. Whoever claims it first runs it; the claim
is a conditional update, so the others find it gone and drop it. A notification can be lost
(a control plane that died between its commit and its ``NOTIFY``, a listener reconnecting),
so each control plane also sweeps: every ``sweep_s`` it compares the waiting workflows'
ids in the database with its index.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import asyncpg

from control_plane.db.store import WAITING_CHANNEL

log = logging.getLogger(__name__)
# Between two attempts to listen again after the connection was lost.
RELISTEN_S = 1.0


class WaitingFeed:
    def __init__(
        self,
        dsn: str,
        heard: Callable[[str], None],
        sweep: Callable[[], Awaitable[None]],
        sweep_s: float,
    ) -> None:
        self._dsn = dsn
        self._heard = heard
        self._sweep = sweep
        self._sweep_s = sweep_s

    async def listen(self) -> None:
        """Follow the announcements until cancelled, listening again whenever the
        connection is lost (and sweeping then: what was said meanwhile was not heard)."""
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(self._dsn)
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
                await conn.add_listener(WAITING_CHANNEL, self._notified)
                await self._sweep()
                await lost.wait()
                log.warning("lost the database connection that listens for waiting workflows")
            except (OSError, asyncpg.PostgresError) as exc:
                log.warning("cannot listen for waiting workflows: %s", exc)
            finally:
                if conn is not None and not conn.is_closed():
                    await conn.close()
            await asyncio.sleep(RELISTEN_S)  # a pause before trying again, not a wait for an event

    async def sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_s)  # a periodic safety net, not a wait for an event
            try:
                await self._sweep()
            except Exception:  # a loop boundary: the next sweep tries again
                log.exception("sweeping for waiting workflows failed")

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        self._heard(payload)
