"""What control planes sharing one PostgreSQL database tell each other: ``LISTEN``/``NOTIFY``
on one connection per control plane, no broker besides the database.

Each channel carries small JSON messages:

- ``comfyfleet_waiting``: the id of a workflow that waits for a runner (``waiting.py`` has
  the index it feeds; a sweep finds what was missed).
- ``comfyfleet_events``: a workflow's events as the control plane that saw them publishes
  them, for the streams the others serve (``events.py``).
- ``comfyfleet_commands``: what only the control plane holding a runner's connection can do
  (stop a job, ask the agent for its stats or an interrupt, pass on a renamed or deleted
  runner), and the answers to what was asked.

A control plane hears its own notifications too; messages carry the sender's replica id so
that it can tell. What is said while the connection is down is held and sent once it is
back (up to ``HELD_LIMIT`` messages); what the others said meanwhile is not heard, which is
why each (re)connect runs the ``on_listening`` callbacks (a sweep, a refresh of the
streams), and why every message here is a wake-up whose truth is in the database.

Control planes of two versions serve together during a rolling upgrade, so what they say
only ever grows: a receiver ignores kinds and fields it does not know, and a message that
lacks what its kind needs, or has it of the wrong type; a change of meaning takes a new kind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

log = logging.getLogger(__name__)

WAITING_CHANNEL = "comfyfleet_waiting"
EVENTS_CHANNEL = "comfyfleet_events"
COMMANDS_CHANNEL = "comfyfleet_commands"
# PostgreSQL refuses a payload of 8000 bytes or more; a message near that is not sent as is.
MAX_PAYLOAD_BYTES = 7900
# Between two attempts to listen again after the connection was lost.
RELISTEN_S = 1.0
# Messages kept while the connection is down; past this the oldest go (the sweeps and the
# refresh at reconnect stand in for them).
HELD_LIMIT = 10_000

Handler = Callable[[dict[str, Any]], None]


class ReplicaBus:
    def __init__(self, dsn: str, replica_id: str) -> None:
        self._dsn = dsn
        self.replica_id = replica_id
        self._handlers: dict[str, Handler] = {}
        self._on_listening: list[Callable[[], Awaitable[None]]] = []
        self._conn: asyncpg.Connection | None = None
        self._outbox: list[tuple[str, str]] = []
        self._flushing: asyncio.Task[None] | None = None
        self.listening = asyncio.Event()

    def on(self, channel: str, handler: Handler) -> None:
        """``handler(message)`` for each message on ``channel``, from any control plane."""
        self._handlers[channel] = handler

    def on_listening(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run after every (re)connect, for what went unheard while the connection was down."""
        self._on_listening.append(callback)

    def fits(self, message: dict[str, Any]) -> bool:
        return len(self._encode(message).encode()) <= MAX_PAYLOAD_BYTES

    def say(self, channel: str, message: dict[str, Any]) -> None:
        """Send ``message`` (with this replica's id as ``from``) soon, in order with what was
        said before; everything said in one turn of the loop goes in one round trip."""
        payload = self._encode(message)
        if len(payload.encode()) > MAX_PAYLOAD_BYTES:
            raise ValueError(f"a message on {channel} is at most {MAX_PAYLOAD_BYTES} bytes")
        self._outbox.append((channel, payload))
        if len(self._outbox) > HELD_LIMIT:
            del self._outbox[: len(self._outbox) - HELD_LIMIT]
        if self._conn is not None and self._flushing is None:
            self._flushing = asyncio.create_task(self._flush(), name="replica-bus flush")

    async def run(self) -> None:
        """Listen until cancelled, connecting again whenever the connection is lost."""
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(self._dsn)
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
                for channel in self._handlers:
                    await conn.add_listener(channel, self._notified)
                self._conn = conn
                self.listening.set()
                if self._outbox and self._flushing is None:
                    self._flushing = asyncio.create_task(self._flush(), name="replica-bus flush")
                for callback in self._on_listening:
                    await callback()
                await lost.wait()
                log.warning("lost the database connection that other control planes are heard on")
            except (OSError, asyncpg.PostgresError) as exc:
                log.warning("cannot listen to the other control planes: %s", exc)
            finally:
                self._conn = None
                self.listening.clear()
                if conn is not None and not conn.is_closed():
                    with contextlib.suppress(OSError, asyncpg.PostgresError):
                        await conn.close()
            await asyncio.sleep(RELISTEN_S)  # a pause before trying again, not a wait for an event

    async def _flush(self) -> None:
        try:
            while self._outbox and self._conn is not None:
                batch, self._outbox = self._outbox, []
                try:
                    await self._conn.execute(
                        "SELECT pg_notify(m.c, m.p) FROM unnest($1::text[], $2::text[]) AS m(c, p)",
                        [c for c, _ in batch],
                        [p for _, p in batch],
                    )
                except (OSError, asyncpg.PostgresError) as exc:
                    # Kept for the next connection, ahead of what was said since.
                    log.warning(
                        "cannot tell the other control planes (%d messages held): %s", len(batch), exc
                    )
                    self._outbox[:0] = batch
                    return
        finally:
            self._flushing = None

    def _encode(self, message: dict[str, Any]) -> str:
        return json.dumps({**message, "from": self.replica_id}, separators=(",", ":"))

    def _notified(self, _conn: object, _pid: int, channel: str, payload: str) -> None:
        handler = self._handlers.get(channel)
        if handler is None:
            return
        try:
            message = json.loads(payload)
        except ValueError:
            log.warning("unreadable message on %s: %.200s", channel, payload)
            return
        if isinstance(message, dict):
            handler(message)
