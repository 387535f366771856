"""This control plane's dealings with the others that serve the same PostgreSQL database.

Each holds the connections of the agents that reached it, and the event streams of the
clients that reached it, so a workflow's events are relayed to the others as they are
published, and what only an agent's own control plane can do (stop a job, answer for its
stats, interrupt it, hear that it was renamed or deleted) is asked of whoever holds it. All
of it travels on the :class:`ReplicaBus`; the database stays the truth: a stream that may
have missed something reads the workflow again, and a job that a lost command should have
stopped is stopped by the fence at its next report.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from datetime import timedelta
from typing import Any, Protocol, cast

from control_plane.db.store import Store
from control_plane.db.tables import new_id, utcnow
from control_plane.fleet.events import EventHub, EventName, cause_event, status_event
from control_plane.fleet.registry import AgentConnection, Registry
from control_plane.fleet.replica_bus import COMMANDS_CHANNEL, EVENTS_CHANNEL, WAITING_CHANNEL, ReplicaBus
from control_plane.model.lifecycle import WorkflowStatus
from protocol.closing import Close
from protocol.messages import Cancel, Interrupt, Reply, StatsRequest

log = logging.getLogger(__name__)

# A lease on a runner's connection lasts this long unless renewed, and is renewed this often:
# a control plane that dies loses its runners to the others within LEASE_S.
LEASE_S = 30.0
LEASE_RENEW_S = 10.0
_STREAMED: frozenset[str] = frozenset({"status", "node", "output", "cause"})


class Fleet(Protocol):
    """What of the fleet (``dispatch.py``) this module works with."""

    store: Store
    hub: EventHub
    registry: Registry

    def changed(self) -> None: ...
    def kick(self) -> None: ...
    def heard_waiting(self, workflow_id: str) -> None: ...
    def keep_grace(self, runner_id: str) -> None: ...
    async def sweep_waiting(self) -> None: ...
    async def close_deleted(self, conn: AgentConnection) -> None: ...


class Replicas:
    def __init__(
        self, fleet: Fleet, bus: ReplicaBus, spawn: Callable[[Coroutine[Any, Any, Any]], None]
    ) -> None:
        self.fleet = fleet
        self.bus = bus
        self._spawn = spawn
        self._asked: dict[str, asyncio.Future[Reply]] = {}
        bus.on(WAITING_CHANNEL, self._heard_waiting)
        bus.on(EVENTS_CHANNEL, self._heard_event)
        bus.on(COMMANDS_CHANNEL, self._heard_command)
        bus.on_listening(self.fleet.sweep_waiting)
        bus.on_listening(self._refresh_streams)
        fleet.hub.relay = self._relay_event

    @property
    def me(self) -> str:
        return self.bus.replica_id

    # -- waiting workflows -------------------------------------------------------------------

    def announce_waiting(self, workflow_id: str) -> None:
        self.bus.say(WAITING_CHANNEL, {"w": workflow_id})

    def _heard_waiting(self, message: dict[str, Any]) -> None:
        workflow_id = message.get("w")
        if isinstance(workflow_id, str):
            self.fleet.heard_waiting(workflow_id)

    # -- events ------------------------------------------------------------------------------

    def _relay_event(
        self, workflow_id: str, name: EventName, data: dict[str, Any], event_id: str | None
    ) -> None:
        if name not in _STREAMED:
            return
        message: dict[str, Any] = {"w": workflow_id, "n": name, "d": data, "i": event_id}
        if not self.bus.fits(message):
            # Too large for a notification (a long error): the others read the workflow.
            message = {"w": workflow_id, "n": "refresh"}
        self.bus.say(EVENTS_CHANNEL, message)

    def _heard_event(self, message: dict[str, Any]) -> None:
        workflow_id, name, data = message.get("w"), message.get("n"), message.get("d")
        if message.get("from") == self.me or not isinstance(workflow_id, str):
            return
        if name == "refresh":
            self._spawn(self._refresh(workflow_id))
        elif name in _STREAMED and isinstance(data, dict):
            event_id = message.get("i")
            if isinstance(event_id, str) and self.fleet.hub.journal is not None:
                self.fleet.hub.journal.heard(event_id)
            self.fleet.hub.deliver(
                workflow_id, cast(EventName, name), data, event_id if isinstance(event_id, str) else None
            )
        self.fleet.changed()  # the dashboard's live view follows every control plane's work

    async def _refresh(self, workflow_id: str) -> None:
        """The workflow as the database has it, for the streams here that follow it."""
        if not self.fleet.hub.watches(workflow_id):
            return
        state = await self.fleet.store.state_of(workflow_id)
        if state is None:
            return
        if state.status == WorkflowStatus.FAILED:
            self.fleet.hub.deliver(workflow_id, "cause", cause_event(state))
        self.fleet.hub.deliver(workflow_id, "status", status_event(state))

    async def _refresh_streams(self) -> None:
        for workflow_id in self.fleet.hub.watched():
            await self._refresh(workflow_id)

    # -- leases ------------------------------------------------------------------------------

    async def connected(self, conn: AgentConnection) -> None:
        expires = utcnow() + timedelta(seconds=LEASE_S)
        previous = await self.fleet.store.take_lease(conn.runner_id, self.me, conn.connection_id, expires)
        if previous is not None:
            log.info("runner %s moved here from control plane %s", conn.runner_id, previous[0])
            self.bus.say(COMMANDS_CHANNEL, {"k": "replaced", "r": conn.runner_id, "c": previous[1]})

    async def disconnected(self, conn: AgentConnection) -> None:
        await self.fleet.store.drop_lease(conn.runner_id, conn.connection_id)

    async def holder(self, runner_id: str) -> str | None:
        """The control plane holding the runner's connection (this one included), if any."""
        return await self.fleet.store.lease_holder(runner_id)

    async def lease_loop(self) -> None:
        """Renew this control plane's leases; take over the runners of one that let theirs
        lapse, keeping their grace period (exactly one control plane gets each)."""
        while True:
            await asyncio.sleep(LEASE_RENEW_S)  # a periodic renewal, not a wait for an event
            try:
                await self.renew_leases()
            except Exception:  # a loop boundary: the next round tries again
                log.exception("renewing leases failed")

    async def renew_leases(self) -> list[str]:
        """One round of :meth:`lease_loop`; the runners taken over."""
        await self.fleet.store.renew_leases(self.me, utcnow() + timedelta(seconds=LEASE_S))
        taken = await self.fleet.store.take_over_lapsed_leases()
        for runner_id in taken:
            log.warning(
                "runner %s: its control plane let its lease lapse; its grace period runs here", runner_id
            )
            self.fleet.keep_grace(runner_id)
        return taken

    # -- commands ----------------------------------------------------------------------------

    def stop_job(self, runner_id: str, workflow_id: str, attempt: int) -> None:
        """Whoever holds the runner tells its agent to stop the job."""
        self.bus.say(COMMANDS_CHANNEL, {"k": "stop", "r": runner_id, "w": workflow_id, "a": attempt})

    def runner_changed(self, runner_id: str, name: str, tags: list[str], status: str) -> None:
        self.bus.say(
            COMMANDS_CHANNEL, {"k": "rename", "r": runner_id, "name": name, "tags": tags, "status": status}
        )

    def runner_deleted(self, runner_id: str) -> None:
        self.bus.say(COMMANDS_CHANNEL, {"k": "deleted", "r": runner_id})

    async def ask(self, runner_id: str, message: Interrupt | StatsRequest, timeout_s: float) -> Reply:
        """Send ``message`` to the agent through the control plane that holds it and wait for
        its reply: TimeoutError when no answer comes in time (no one holds it, or the agent
        is silent); ConnectionError when its control plane found the connection gone."""
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._asked[message.request_id] = future
        try:
            self.bus.say(
                COMMANDS_CHANNEL,
                {"k": "ask", "r": runner_id, "q": message.request_id, "what": message.type, "t": timeout_s},
            )
            async with asyncio.timeout(timeout_s):
                return await future
        finally:
            self._asked.pop(message.request_id, None)

    def _heard_command(self, message: dict[str, Any]) -> None:
        kind = message.get("k")
        if kind == "reply":
            self._heard_reply(message)
            return
        if message.get("from") == self.me:
            return
        runner_id = message.get("r")
        conn = self.fleet.registry.get(runner_id) if isinstance(runner_id, str) else None
        if conn is None:
            return
        if kind == "replaced":
            if conn.connection_id == message.get("c"):
                self._spawn(conn.ws.close(code=Close.REPLACED, message=b"replaced by a newer connection"))
        elif kind == "stop" and isinstance(message.get("w"), str) and isinstance(message.get("a"), int):
            conn.let_go(message["w"])
            self._spawn(conn.send(Cancel(workflow_id=message["w"], attempt=message["a"])))
        elif kind == "rename" and _renamed(message):
            conn.rename(message["name"], message["tags"], message["status"])
            self.fleet.kick()
        elif kind == "deleted":
            self._spawn(self.fleet.close_deleted(conn))
        elif kind == "ask" and _asked(message):
            self._spawn(self._answer(conn, message))

    async def _answer(self, conn: AgentConnection, message: dict[str, Any]) -> None:
        request_id = message["q"]
        request: Interrupt | StatsRequest = (
            Interrupt(request_id=new_id())
            if message.get("what") == "interrupt"
            else StatsRequest(request_id=new_id())
        )
        answer: dict[str, Any] = {"k": "reply", "to": message.get("from"), "q": request_id}
        timeout_s = float(message["t"])
        try:
            reply = await conn.request(request, timeout_s)
            answer |= {"ok": reply.ok, "data": reply.data, "error": reply.error}
        except TimeoutError:
            return  # the asker times out as well
        except ConnectionError as exc:
            answer |= {"gone": str(exc)}
        if not self.bus.fits(answer):
            answer = {
                "k": "reply",
                "to": message.get("from"),
                "q": request_id,
                "ok": False,
                "error": "the answer is too large to relay",
            }
        self.bus.say(COMMANDS_CHANNEL, answer)

    def _heard_reply(self, message: dict[str, Any]) -> None:
        if message.get("to") != self.me:
            return
        future = self._asked.get(str(message.get("q")))
        if future is None or future.done():
            return
        if "gone" in message:
            future.set_exception(ConnectionError(str(message["gone"])))
            return
        data = message.get("data")
        future.set_result(
            Reply(
                request_id=str(message.get("q")),
                ok=bool(message.get("ok")),
                data=data if isinstance(data, dict) else {},
                error=message.get("error") if isinstance(message.get("error"), str) else None,
            )
        )


def _renamed(message: dict[str, Any]) -> bool:
    tags = message.get("tags")
    return (
        isinstance(message.get("name"), str)
        and isinstance(tags, list)
        and all(isinstance(t, str) for t in tags)
        and message.get("status") in ("active", "disabled")
    )


def _asked(message: dict[str, Any]) -> bool:
    return isinstance(message.get("q"), str) and isinstance(message.get("t"), float | int)
