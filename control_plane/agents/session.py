"""One agent's connection after its handshake: the receive loop that hands each message to the
fleet, and the watchdog that closes the socket of a runner gone silent. One object per
connection, owning both; it reads time only through the connection's clock."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import WSMsgType

from control_plane.fleet.registry import AgentConnection
from control_plane.services import Services
from protocol.closing import Close
from protocol.messages import (
    CapacityUpdate,
    JobDone,
    JobUpdate,
    ProtocolError,
    Ready,
    Reply,
    parse_message,
)

log = logging.getLogger(__name__)


class AgentSession:
    def __init__(self, svc: Services, conn: AgentConnection) -> None:
        self.svc = svc
        self.conn = conn

    async def run(self) -> None:
        """Until the socket closes, from either end."""
        watchdog = asyncio.create_task(self._watchdog())
        try:
            await self._receive()
        except ConnectionResetError as exc:
            # The agent's host went away mid-frame: the ordinary end of a connection.
            log.info("runner %s: connection reset: %s", self.conn.runner_id, exc)
        finally:
            watchdog.cancel()

    async def _receive(self) -> None:
        conn = self.conn
        async for frame in conn.ws:
            if frame.type != WSMsgType.TEXT:
                continue
            conn.heard()
            try:
                msg = parse_message(frame.data)
            except ProtocolError as exc:
                log.warning("runner %s: bad message ignored: %s", conn.runner_id, exc)
                continue
            try:
                await self._handle(msg)
            except asyncio.CancelledError:
                raise
            except Exception:  # one bad report must not drop the runner's connection
                log.exception("runner %s: handling %s failed", conn.runner_id, type(msg).__name__)

    async def _handle(self, msg: object) -> None:
        fleet, conn = self.svc.fleet, self.conn
        if isinstance(msg, Ready):
            await fleet.runner_ready(conn, msg.free_slots)
        elif isinstance(msg, JobUpdate):
            await fleet.job_update(conn, msg)
        elif isinstance(msg, JobDone):
            await fleet.job_done(conn, msg)
        elif isinstance(msg, CapacityUpdate):
            await self._capacity(msg)
        elif isinstance(msg, Reply):
            conn.resolve(msg)
        # Anything else (including types this version does not know) is ignored.

    async def _capacity(self, msg: CapacityUpdate) -> None:
        conn = self.conn
        health_changed = conn.report_capacity(msg.capacity, msg.healthy, msg.unhealthy_reason)
        if health_changed:
            state = "healthy" if conn.healthy else f"unhealthy: {conn.unhealthy_reason}"
            log.info("runner %s is %s", conn.runner_id, state)
            self.svc.fleet.kick()
        self.svc.fleet.runner_states.changed(conn)
        self.svc.fleet.changed()

    async def _watchdog(self) -> None:
        """Close the socket of a runner gone silent: its jobs then get their grace period.

        Silence is counted only while the control plane itself was there to listen: when the
        watchdog wakes late, the event loop was busy and the runner's frames may be sitting
        unread, so that time is not held against the runner."""
        conn, clock = self.conn, self.conn.clock
        timeout_s = self.svc.settings.runner_timeout_s
        check_s = timeout_s / 3
        missed_s = 0.0  # of the silence so far, how long the loop was too busy to listen
        heard = conn.heard_at
        while not conn.ws.closed:
            planned = clock.monotonic() + check_s
            await asyncio.sleep(check_s)  # a periodic check, not a wait for an event
            late_s = clock.monotonic() - planned
            if conn.heard_at != heard:
                heard, missed_s = conn.heard_at, 0.0
            missed_s += max(0.0, late_s)
            if late_s > check_s / 2:
                continue  # just back from a stall: let the receive loop read what waited first
            silent_s = clock.monotonic() - conn.heard_at - missed_s
            if silent_s > timeout_s:
                log.warning(
                    "runner %s: nothing heard for %.0f s; closing its connection", conn.runner_id, silent_s
                )
                await conn.ws.close(code=Close.SILENT, message=b"no heartbeat")
                return
