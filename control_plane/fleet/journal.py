"""The event log: every event a workflow's stream sends, written once, in order, so that a
client that reconnects with ``Last-Event-ID`` gets what it missed, from any control plane.

An event is sent to the streams as it is published, with its id (``<process>-<n>``: unique
however many control planes serve, and across restarts); the log gets it with the next
write, at most ``flush_s`` later, a batch of events in one unit whatever their workflows.
Each workflow's events take the next numbers of its ``event_seq`` in that unit, so the log
has them in the order the control plane published them (and, between control planes, in
the order their writes committed). Events published in the last ``flush_s`` before a
crash are not logged: a client that resumes after them gets the workflow's status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from typing import Any

from control_plane.db.store import LoggedEvent, Store

log = logging.getLogger(__name__)

# Events written at once at most; more wait for the next write.
BATCH = 2000
# Events held while the database cannot take them; past this the oldest go unlogged.
HELD_LIMIT = 100_000


class EventJournal:
    def __init__(self, store: Store, flush_s: float) -> None:
        self._store = store
        self._flush_s = flush_s
        self._epoch = secrets.token_hex(4)
        self._n = 0
        self._pending: list[LoggedEvent] = []
        self._lock = asyncio.Lock()  # one write at a time: the log keeps the publishing order
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def next_id(self) -> str:
        self._n += 1
        return f"{self._epoch}-{self._n}"

    def mine(self, event_id: str) -> bool:
        return event_id.startswith(f"{self._epoch}-")

    def record(self, workflow_id: str, event_id: str, name: str, data: dict[str, Any]) -> None:
        self._pending.append(LoggedEvent(workflow_id, event_id, name, data))
        if len(self._pending) > HELD_LIMIT:
            del self._pending[: len(self._pending) - HELD_LIMIT]
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._flush_s, self._flush_soon)

    def _flush_soon(self) -> None:
        self._timer = None
        task = asyncio.create_task(self._flush_logged(), name="event log write")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _flush_logged(self) -> None:
        try:
            await self.flush()
        except Exception:  # a timer's write: the events wait for the next one
            log.exception("writing the event log failed (%d events wait)", len(self._pending))
            if self._pending and self._timer is None:
                self._timer = asyncio.get_running_loop().call_later(self._flush_s, self._flush_soon)

    async def flush(self) -> None:
        """Write everything recorded so far."""
        async with self._lock:
            while self._pending:
                batch, self._pending = self._pending[:BATCH], self._pending[BATCH:]
                try:
                    await self._store.append_events(batch)
                except BaseException:
                    self._pending[:0] = batch  # ahead of what came since
                    raise

    async def since(
        self, workflow_id: str, event_id: str
    ) -> tuple[dict[str, Any] | None, list[LoggedEvent]] | None:
        """The workflow's events after ``event_id``, oldest first, and the last status logged
        up to it; ``None`` when the log has no such event (an id from elsewhere, or one lost
        in a crash)."""
        if self.mine(event_id):
            await self.flush()
        found = await self._store.events_since(workflow_id, event_id)
        if found is None and not self.mine(event_id):
            # Another control plane's event may not be written yet: it writes within flush_s.
            await asyncio.sleep(3 * self._flush_s)  # its next write, not an event we could wait on
            found = await self._store.events_since(workflow_id, event_id)
        return found

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for task in list(self._tasks):
            with contextlib.suppress(Exception):
                await task
        await self.flush()
