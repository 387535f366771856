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
from control_plane.model.lifecycle import TERMINAL

log = logging.getLogger(__name__)

# Events written at once at most; more wait for the next write.
BATCH = 2000
# Events held while the database cannot take them; past this the oldest go unlogged.
HELD_LIMIT = 100_000
# How long a resumed stream waits for what other control planes published to be written.
CATCH_UP_S = 3.0


def last_status(before: dict[str, Any] | None, events: list[LoggedEvent]) -> tuple[str, int] | None:
    """The (status, attempt) the log ends with: its last status event, else ``before``."""
    for event in reversed(events):
        if event.name == "status":
            before = event.data
            break
    return None if before is None else (str(before["status"]), int(before["attempt"]))


def behind(logged: tuple[str, int] | None, stored: tuple[str, int]) -> bool:
    """Whether the log has yet to catch up with the store: an earlier attempt, or the same
    one not yet ended where the store has it ended. (A log ahead of a snapshot of the store
    taken a moment before is not behind.)"""
    if logged is None or logged[1] < stored[1]:
        return True
    return logged[1] == stored[1] and stored[0] in TERMINAL and logged[0] not in TERMINAL


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
        # The other control planes heard publishing (by the prefix of their ids): an id of
        # theirs was published, or soon will be relayed, and will be written however long
        # that process's writes are delayed.
        self._heard: set[str] = set()

    def next_id(self) -> str:
        self._n += 1
        return f"{self._epoch}-{self._n}"

    def mine(self, event_id: str) -> bool:
        return event_id.startswith(f"{self._epoch}-")

    def heard(self, event_id: str) -> None:
        """Another control plane published ``event_id`` (relayed to this one)."""
        self._heard.add(event_id.rpartition("-")[0])

    def was_heard(self, event_id: str) -> bool:
        """Whether ``event_id`` is of a control plane heard publishing."""
        return event_id.rpartition("-")[0] in self._heard

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
        self, workflow_id: str, event_id: str, status: tuple[str, int] | None = None
    ) -> tuple[dict[str, Any] | None, list[LoggedEvent]] | None:
        """The workflow's events after ``event_id``, oldest first, and the last status logged
        up to it; ``None`` when the log has no such event (an id from elsewhere, or one lost
        in a crash).

        What another control plane published may not be written yet (it writes every
        ``flush_s``): an id not found is read again for three of those writes, or for up to
        ``CATCH_UP_S`` if it is of a control plane heard publishing (so it will be written,
        whatever delays that process), and a log that is :func:`behind` ``status`` (the workflow's
        (status, attempt) as the store has it now) until it is there, for up to
        ``CATCH_UP_S``."""
        await self.flush()  # this control plane's own are written first
        now = asyncio.get_running_loop().time()
        deadline = now + CATCH_UP_S
        # An id no one wrote within a few of their writes is taken as unknown sooner: a
        # client that resumes with one gets the status without a long wait.
        unknown_deadline = now + 3 * self._flush_s
        while True:
            found = await self._store.events_since(workflow_id, event_id)
            if found is None and self.mine(event_id):
                return None  # ours, written, and not there: lost
            if found is not None and (status is None or not behind(last_status(*found), status)):
                return found
            late = asyncio.get_running_loop().time() >= unknown_deadline
            if found is None and late and not self.was_heard(event_id):
                return None  # not written by another's next writes either: an id from nowhere
            if asyncio.get_running_loop().time() >= deadline:
                return found
            await asyncio.sleep(self._flush_s)  # another process's next write: no event of ours

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for task in list(self._tasks):
            with contextlib.suppress(Exception):
                await task
        await self.flush()
