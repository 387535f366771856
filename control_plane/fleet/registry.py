"""Who is connected: one AgentConnection per runner, held in the Registry."""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import web

from control_plane.fleet.capabilities import Offers
from control_plane.fleet.free_runners import FreeRunners, LoadKey
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
    gpu_busy_pct: float = 0.0  # mean utilisation of its GPUs, as last reported (0: none said)
    _send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # The registry this connection files itself with while it has a free slot, under its
    # class (see RunnerClass), so that dispatch never scans a large fleet runner by runner;
    # with the warm models and load it was filed with, to see when to file it again.
    _registry: Registry | None = None
    _filed: RunnerClass | None = None
    _filed_warm: frozenset[str] = frozenset()
    _filed_load: LoadKey | None = None
    _counted: RunnerClass | None = None  # the class the registry counts it under
    _class: RunnerClass | None = None
    _pending: dict[str, asyncio.Future[Reply]] = field(default_factory=dict)
    # Tells this connection from the runner's others (its lease names it, replicas.py).
    connection_id: str = field(default_factory=lambda: secrets.token_hex(8))

    def __post_init__(self) -> None:
        self.connected_at = self.last_seen_at = self.clock.time()
        self.heard_at = self.clock.monotonic()
        self.gpu_busy_pct = _busy_pct(self.capacity)

    @property
    def runner_class(self) -> RunnerClass:
        if self._class is None:
            key = None if self.offers is None else self.offers.dispatch_key
            self._class = RunnerClass(self.account_id, frozenset(self.tags), self.status, key, self.offers)
        return self._class

    def heard(self) -> None:
        """A frame came from the runner: it is alive."""
        self.last_seen_at = self.clock.time()
        self.heard_at = self.clock.monotonic()

    def report_capacity(self, capacity: Capacity, healthy: bool, unhealthy_reason: str | None) -> bool:
        """A capacity update; true when the runner's health changed."""
        changed = healthy != self.healthy
        self.capacity, self.healthy, self.unhealthy_reason = capacity, healthy, unhealthy_reason
        self.gpu_busy_pct = _busy_pct(capacity)
        self._note_free()
        return changed

    def load(self) -> LoadKey:
        """Among runners of one class, the least loaded first: jobs, GPU use, then the
        longest connected."""
        return (len(self.jobs), self.gpu_busy_pct, self.connected_at)

    def rename(self, name: str, tags: list[str], status: str) -> None:
        """The runner was updated through the API: schedule by what it says now."""
        self.name, self.tags, self.status = name, list(tags), status
        self._class = None
        self._note_free()

    def ready(self, free_slots: int) -> None:
        """The agent's count of free slots, less the jobs sent that it has not seen yet."""
        self.free_slots = max(0, min(free_slots, (self.capacity.slots or 1) - len(self.jobs)))
        self._note_free()

    def took(self, workflow_id: str, models: frozenset[str]) -> None:
        """A job was sent: one slot fewer, and its models are what is warm now."""
        self.free_slots -= 1
        self.jobs.add(workflow_id)
        if models:
            self.warm_models = models
        self._note_free()

    def holds(self, workflow_id: str) -> None:
        self.jobs.add(workflow_id)
        self._note_free()

    def let_go(self, workflow_id: str) -> None:
        self.jobs.discard(workflow_id)
        self._note_free()

    def unsent(self, workflow_id: str) -> None:
        """A job that could not be sent after all: its slot is free again."""
        self.jobs.discard(workflow_id)
        self.free_slots += 1
        self._note_free()

    def _note_free(self) -> None:
        if self._registry is not None:
            self._registry.file(self)

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


def _busy_pct(capacity: Capacity) -> float:
    used = [g.utilization_pct for g in capacity.gpus if g.utilization_pct is not None]
    return sum(used) / len(used) if used else 0.0


@dataclass(frozen=True)
class RunnerClass:
    """Runners that scheduling tells apart only by load: one account, the same tags and
    status, ComfyUIs that run the same workflows. Whether a workflow may go to a runner of
    a class is decided once for the class, however many runners it has."""

    account_id: str
    tags: frozenset[str]
    status: str
    offers_key: object  # Offers.dispatch_key; None when the runner never said what it has
    # The first member's offers: equal in what dispatch reads to every other member's.
    offers: Offers | None = field(compare=False, hash=False)

    def accepts(self, workflow_tags: Collection[str]) -> bool:
        return self.status == RUNNER_ACTIVE and tags_match(self.tags, workflow_tags)


class Registry:
    def __init__(self) -> None:
        self._conns: dict[str, AgentConnection] = {}
        self._free: dict[RunnerClass, FreeRunners[AgentConnection]] = {}
        self._classes: dict[RunnerClass, int] = {}  # connected runners by class
        self._seq = itertools.count()

    def add(self, conn: AgentConnection) -> AgentConnection | None:
        """Register ``conn``; returns the connection it replaces, if any."""
        old = self._conns.get(conn.runner_id)
        if old is not None:
            self._forget(old)
        self._conns[conn.runner_id] = conn
        conn._registry = self
        conn._note_free()
        return old

    def remove(self, conn: AgentConnection) -> bool:
        if self._conns.get(conn.runner_id) is conn:
            del self._conns[conn.runner_id]
            self._forget(conn)
            return True
        return False

    def _forget(self, conn: AgentConnection) -> None:
        self._unfile(conn)
        self._uncount(conn)
        conn._registry = None

    def file(self, conn: AgentConnection) -> None:
        """Count ``conn`` under its class, and keep it among the class's free runners while it
        has a free slot (and only then), in the order of its warm models and load."""
        klass = conn.runner_class
        if conn._counted is not klass:
            self._uncount(conn)
            self._classes[klass] = self._classes.get(klass, 0) + 1
            conn._counted = klass
        where = klass if conn.free_slots > 0 else None
        load = conn.load()
        if where == conn._filed and (
            where is None or (load == conn._filed_load and conn.warm_models is conn._filed_warm)
        ):
            return
        self._unfile(conn)  # its class, slots, load or warm models changed
        if where is not None:
            self._free.setdefault(where, FreeRunners()).add(conn, conn.warm_models, load, next(self._seq))
            conn._filed, conn._filed_warm, conn._filed_load = where, conn.warm_models, load

    def _unfile(self, conn: AgentConnection) -> None:
        if conn._filed is None:
            return
        members = self._free.get(conn._filed)
        if members is not None:
            members.discard(conn, conn._filed_warm)
            if not members:
                del self._free[conn._filed]
        conn._filed = None

    def _uncount(self, conn: AgentConnection) -> None:
        klass, conn._counted = conn._counted, None
        if klass is None:
            return
        left = self._classes[klass] - 1
        if left:
            self._classes[klass] = left
        else:
            del self._classes[klass]

    def free_by_class(self) -> dict[RunnerClass, FreeRunners[AgentConnection]]:
        """The connected runners with a free slot, by class (live: dispatch's picks change it)."""
        return self._free

    def connected_classes(self) -> Collection[RunnerClass]:
        """The classes of the connected runners, each once however many runners it has."""
        return self._classes.keys()

    def get(self, runner_id: str) -> AgentConnection | None:
        return self._conns.get(runner_id)

    def all(self) -> list[AgentConnection]:
        return list(self._conns.values())
