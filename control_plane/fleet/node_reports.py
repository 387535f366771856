"""Node and progress reports of running jobs, held in memory between writes.

A prompt's node events come in bursts (executing, progress, executed for every node), and
each one written as it came was a transaction in the runner's receive loop, delaying every
report behind it. Subscribers hear them at once; the store gets them later, in one write:
with the job's next report that is written anyway (a status change, its result), after
``delay_s`` (the ``node_report_write_s`` setting) when none comes (a long node), or before
anything else changes the workflow (a cancel, a retry, a new attempt, a deadline).

Only reports of a job whose last write went through are held: that write's fence says the
runner holds that attempt, and whatever changes that since goes through :meth:`flush`
first. Anything else is written at once, fenced as ever.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from control_plane.db.reports import NodeEvent


@dataclass
class Held:
    """What is held for one attempt of one workflow, in the order it came."""

    attempt: int
    runner_id: str
    events: list[NodeEvent] = field(default_factory=list)
    progress: float | None = None


Write = Callable[[str, Held], Coroutine[Any, Any, None]]


class NodeReports:
    def __init__(self, write: Write, delay_s: float) -> None:
        self._write = write
        self._delay_s = delay_s
        self._live: dict[str, tuple[int, str]] = {}  # workflow id -> (attempt, runner id)
        self._held: dict[str, Held] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._writing: dict[str, asyncio.Task[None]] = {}  # a write after the delay, under way
        # A report's write that carries what was held, under way: a flush waits for it, or a
        # rerun could commit in between and fence the carried reports out with it.
        self._carrying: dict[str, asyncio.Event] = {}

    def written(self, workflow_id: str, attempt: int, runner_id: str, *, finished: bool) -> None:
        """A report of this job went through its fence: the runner holds that attempt (or,
        ``finished``, nobody does any more)."""
        if finished:
            self._live.pop(workflow_id, None)
        else:
            self._live[workflow_id] = (attempt, runner_id)

    def hold(
        self, workflow_id: str, attempt: int, runner_id: str, event: NodeEvent, progress: float | None
    ) -> bool:
        """Keep a node report for later; false when it must be written now (the job's last
        write was not this runner's attempt, or there was none yet)."""
        if self._live.get(workflow_id) != (attempt, runner_id):
            return False
        held = self._held.get(workflow_id)
        if held is None or held.attempt != attempt or held.runner_id != runner_id:
            held = self._held[workflow_id] = Held(attempt, runner_id)
        held.events.append(event)
        if progress is not None:
            held.progress = progress
        if workflow_id not in self._timers:
            loop = asyncio.get_running_loop()
            self._timers[workflow_id] = loop.call_later(self._delay_s, self._due, workflow_id)
        return True

    @contextlib.asynccontextmanager
    async def carried(self, workflow_id: str, attempt: int, runner_id: str) -> AsyncIterator[Held | None]:
        """What is held for this attempt, for the write inside the block to carry along (once
        what an earlier write took has landed); a flush meanwhile waits for the block's end."""
        await self._settled(workflow_id)
        held = self._held.get(workflow_id)
        if held is None or held.attempt != attempt or held.runner_id != runner_id:
            yield None
            return
        self._drop(workflow_id)
        landed = self._carrying[workflow_id] = asyncio.Event()
        try:
            yield held
        finally:
            landed.set()
            if self._carrying.get(workflow_id) is landed:
                del self._carrying[workflow_id]

    def carrying(self, workflow_id: str) -> bool:
        """A write that carries the workflow's held reports is under way."""
        return workflow_id in self._carrying

    async def flush(self, workflow_id: str) -> None:
        """Write what is held for the workflow now, and hold nothing more for it until its
        next report goes through: something else is about to change it."""
        self._live.pop(workflow_id, None)
        await self._settled(workflow_id)
        held = self._held.get(workflow_id)
        if held is not None:
            self._drop(workflow_id)
            await self._write(workflow_id, held)

    async def flush_runner(self, runner_id: str) -> None:
        for workflow_id in [w for w, held in self._held.items() if held.runner_id == runner_id]:
            await self.flush(workflow_id)

    async def close(self) -> None:
        """Write everything held (the control plane stops)."""
        for workflow_id in list(self._held):
            await self.flush(workflow_id)
        await asyncio.gather(*self._writing.values(), return_exceptions=True)

    async def _settled(self, workflow_id: str) -> None:
        """Until a write after the delay that is under way has landed: what it writes came
        first and must be applied first."""
        writing = self._writing.get(workflow_id)
        if writing is not None:
            await asyncio.wait({writing})
        carrying = self._carrying.get(workflow_id)
        if carrying is not None:
            await carrying.wait()

    def _drop(self, workflow_id: str) -> None:
        self._held.pop(workflow_id, None)
        timer = self._timers.pop(workflow_id, None)
        if timer is not None:
            timer.cancel()

    def _due(self, workflow_id: str) -> None:
        self._timers.pop(workflow_id, None)
        held = self._held.pop(workflow_id, None)
        if held is None:
            return
        task = asyncio.create_task(self._write(workflow_id, held))
        self._writing[workflow_id] = task

        def done(_: asyncio.Task[None]) -> None:
            if self._writing.get(workflow_id) is task:
                del self._writing[workflow_id]

        task.add_done_callback(done)
