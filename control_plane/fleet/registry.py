"""Who is connected: one AgentConnection per runner, held in the Registry."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import web

from control_plane.fleet.capabilities import Offers
from protocol.capacity import Capacity
from protocol.messages import Interrupt, Reply, StatsRequest, dump_message

log = logging.getLogger(__name__)
RUNNER_ACTIVE = "active"  # a runner's status: active (takes work) or disabled


class Clock(Protocol):
    def monotonic(self) -> float: ...
    def time(self) -> float: ...


class SystemClock:
    """The loop-independent clocks the registry reads: ``monotonic`` for silences and
    intervals, ``time`` (the wall clock) for what people see."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()


SYSTEM_CLOCK = SystemClock()


@dataclass(eq=False)
class AgentConnection:
    """A connected runner as the fleet sees it: who it is, what it can run and has free, what
    it holds. Changed only through its methods (by the agent endpoint and by dispatch)."""

    runner_id: str
    account_id: str
    name: str
    tags: list[str]
    status: str
    ws: web.WebSocketResponse
    capacity: Capacity = field(default_factory=Capacity)
    comfyui: dict[str, Any] = field(default_factory=dict)
    offers: Offers | None = None  # ``comfyui`` as sets, for scheduling
    free_slots: int = 0
    jobs: set[str] = field(default_factory=set)  # workflow ids this runner holds
    healthy: bool = True
    unhealthy_reason: str | None = None
    # Model files the runner's last job loaded: a job wanting the same ones finds them warm.
    warm_models: frozenset[str] = frozenset()
    clock: Clock = SYSTEM_CLOCK
    connected_at: float = 0.0  # wall clock
    last_seen_at: float = 0.0  # wall clock, for people
    heard_at: float = 0.0  # monotonic, for the watchdog
    _send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # The registry's set of connections with a free slot, kept as slots come and go, so
    # that dispatch never scans a large fleet for the few runners it can use.
    _with_free_slots: set[AgentConnection] | None = None
    _pending: dict[str, asyncio.Future[Reply]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.connected_at = self.last_seen_at = self.clock.time()
        self.heard_at = self.clock.monotonic()

    def heard(self) -> None:
        """A frame came from the runner: it is alive."""
        self.last_seen_at = self.clock.time()
        self.heard_at = self.clock.monotonic()

    def report_capacity(self, capacity: Capacity, healthy: bool, unhealthy_reason: str | None) -> bool:
        """A capacity update; true when the runner's health changed."""
        changed = healthy != self.healthy
        self.capacity, self.healthy, self.unhealthy_reason = capacity, healthy, unhealthy_reason
        return changed

    def rename(self, name: str, tags: list[str], status: str) -> None:
        """The runner was updated through the API: schedule by what it says now."""
        self.name, self.tags, self.status = name, list(tags), status

    def ready(self, free_slots: int) -> None:
        """The agent's count of free slots, less the jobs sent that it has not seen yet."""
        self.free_slots = max(0, min(free_slots, (self.capacity.slots or 1) - len(self.jobs)))
        self._note_free()

    def took(self, workflow_id: str, models: frozenset[str]) -> None:
        """A job was sent: one slot fewer, and its models are what is warm now."""
        self.free_slots -= 1
        self._note_free()
        self.jobs.add(workflow_id)
        if models:
            self.warm_models = models

    def holds(self, workflow_id: str) -> None:
        self.jobs.add(workflow_id)

    def let_go(self, workflow_id: str) -> None:
        self.jobs.discard(workflow_id)

    def unsent(self, workflow_id: str) -> None:
        """A job that could not be sent after all: its slot is free again."""
        self.jobs.discard(workflow_id)
        self.free_slots += 1
        self._note_free()

    def _note_free(self) -> None:
        if self._with_free_slots is None:
            return
        if self.free_slots > 0:
            self._with_free_slots.add(self)
        else:
            self._with_free_slots.discard(self)

    @property
    def gpu_busy_pct(self) -> float:
        """Mean GPU utilisation the runner last reported (0 when it reported none)."""
        used = [g.utilization_pct for g in self.capacity.gpus if g.utilization_pct is not None]
        return sum(used) / len(used) if used else 0.0

    async def request(self, message: Interrupt | StatsRequest, timeout_s: float) -> Reply:
        """Send a request and wait for the agent's Reply with the same request_id."""
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[message.request_id] = future
        try:
            if not await self.send(message):
                raise ConnectionError("the runner's connection is closed")
            return await asyncio.wait_for(future, timeout_s)
        finally:
            self._pending.pop(message.request_id, None)

    def resolve(self, reply: Reply) -> None:
        future = self._pending.get(reply.request_id)
        if future is not None and not future.done():
            future.set_result(reply)

    def fail_pending(self) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionError("the runner disconnected"))

    async def send(self, message: Any) -> bool:
        """Send one protocol message; false when the socket is gone."""
        return await self.send_frame(dump_message(message))

    async def send_frame(self, frame: str) -> bool:
        """Send a message already serialised (dispatch serialises before it claims)."""
        if self.ws.closed:
            return False
        async with self._send_lock:
            try:
                await self.ws.send_str(frame)
            except (ConnectionError, RuntimeError) as exc:
                log.info("runner %s: send failed: %s", self.runner_id, exc)
                return False
        return True

    @property
    def gpu_free_bytes(self) -> int:
        """The most free memory on any one of the runner's GPUs, as last reported."""
        return max((g.memory_free_bytes or 0 for g in self.capacity.gpus), default=0)

    def accepts(self, workflow_tags: Collection[str]) -> bool:
        """Untagged runners take anything; tagged ones need every workflow tag."""
        # Health is not checked here: an agent offers only its healthy ComfyUI instances'
        # slots, so a runner with one instance down still takes work on the others.
        return self.status == RUNNER_ACTIVE and tags_match(self.tags, workflow_tags)


def tags_match(runner_tags: Collection[str], workflow_tags: Collection[str]) -> bool:
    return not runner_tags or set(workflow_tags) <= set(runner_tags)


class Registry:
    def __init__(self) -> None:
        self._conns: dict[str, AgentConnection] = {}
        self._with_free_slots: set[AgentConnection] = set()

    def add(self, conn: AgentConnection) -> AgentConnection | None:
        """Register ``conn``; returns the connection it replaces, if any."""
        old = self._conns.get(conn.runner_id)
        if old is not None:
            self._forget(old)
        self._conns[conn.runner_id] = conn
        conn._with_free_slots = self._with_free_slots
        conn._note_free()
        return old

    def remove(self, conn: AgentConnection) -> bool:
        if self._conns.get(conn.runner_id) is conn:
            del self._conns[conn.runner_id]
            self._forget(conn)
            return True
        return False

    def _forget(self, conn: AgentConnection) -> None:
        self._with_free_slots.discard(conn)
        conn._with_free_slots = None

    def with_free_slots(self) -> list[AgentConnection]:
        """The connected runners with a free slot (in no particular order)."""
        return list(self._with_free_slots)

    def get(self, runner_id: str) -> AgentConnection | None:
        return self._conns.get(runner_id)

    def all(self) -> list[AgentConnection]:
        return list(self._conns.values())
