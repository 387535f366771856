"""Who is connected: one AgentConnection per runner, held in the Registry."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from control_plane.capabilities import Offers
from protocol.messages import Interrupt, Reply, StatsRequest, dump_message

log = logging.getLogger(__name__)


@dataclass(eq=False)
class AgentConnection:
    runner_id: str
    account_id: str
    name: str
    tags: list[str]
    status: str
    ws: web.WebSocketResponse
    capacity: dict[str, Any] = field(default_factory=dict)
    comfyui: dict[str, Any] = field(default_factory=dict)
    offers: Offers | None = None  # ``comfyui`` as sets, for scheduling
    free_slots: int = 0
    jobs: set[str] = field(default_factory=set)  # workflow ids this runner holds
    connected_at: float = field(default_factory=time.time)
    last_seen_at: float = field(default_factory=time.time)  # wall clock, for people
    heard_at: float = field(default_factory=time.monotonic)  # the loop's clock, for the watchdog
    persisted_at: float = field(default_factory=time.time)  # capacity last written to the store
    healthy: bool = True
    unhealthy_reason: str | None = None
    # Model files the runner's last job loaded: a job wanting the same ones finds them warm.
    warm_models: frozenset[str] = frozenset()
    _send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _pending: dict[str, asyncio.Future[Reply]] = field(default_factory=dict)

    def heard(self) -> None:
        """A frame came from the runner: it is alive."""
        self.last_seen_at = time.time()
        self.heard_at = time.monotonic()

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
        gpus = self.capacity.get("gpus") or []
        return max((g.get("memory_free_bytes") or 0 for g in gpus), default=0)

    def accepts(self, workflow_tags: list[str]) -> bool:
        """Untagged runners take anything; tagged ones need every workflow tag."""
        # Health is not checked here: an agent offers only its healthy ComfyUI instances'
        # slots, so a runner with one instance down still takes work on the others.
        return self.status == "active" and tags_match(self.tags, workflow_tags)


def tags_match(runner_tags: list[str], workflow_tags: list[str]) -> bool:
    return not runner_tags or set(workflow_tags) <= set(runner_tags)


class Registry:
    def __init__(self) -> None:
        self._conns: dict[str, AgentConnection] = {}

    def add(self, conn: AgentConnection) -> AgentConnection | None:
        """Register ``conn``; returns the connection it replaces, if any."""
        old = self._conns.get(conn.runner_id)
        self._conns[conn.runner_id] = conn
        return old

    def remove(self, conn: AgentConnection) -> bool:
        if self._conns.get(conn.runner_id) is conn:
            del self._conns[conn.runner_id]
            return True
        return False

    def get(self, runner_id: str) -> AgentConnection | None:
        return self._conns.get(runner_id)

    def all(self) -> list[AgentConnection]:
        return list(self._conns.values())
