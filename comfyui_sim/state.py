"""Everything one running simulator holds, reachable from the aiohttp app."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import Any

from aiohttp import web

from .executor import Executor, PromptOutcome
from .paths import SimPaths
from .prompt_queue import PromptQueue
from .queue_worker import run_worker
from .settings import SimSettings
from .ws_hub import WsHub

LOG_SIZE = 100


class SimState:
    def __init__(self, settings: SimSettings) -> None:
        self.settings = settings
        self.paths = SimPaths(settings.data_dir)
        self.hub = WsHub()
        self.queue = PromptQueue(on_change=self.broadcast_status)
        self.executor = Executor(settings, self.paths, self.hub)
        # What /sim/log reports: which nodes really ran, per prompt; every prompt queued; and
        # the prompts an interrupt was aimed at while they ran.
        self.log: deque[dict[str, Any]] = deque(maxlen=LOG_SIZE)
        self.queued: deque[str] = deque(maxlen=LOG_SIZE)
        self.interrupted: deque[str] = deque(maxlen=LOG_SIZE)
        self._tasks: list[asyncio.Task[None]] = []

    def queue_info(self) -> dict[str, Any]:
        return {"exec_info": {"queue_remaining": self.queue.remaining()}}

    def broadcast_status(self) -> None:
        self.hub.send("status", {"status": self.queue_info()})

    def record(self, outcome: PromptOutcome) -> None:
        self.log.append(
            {
                "prompt_id": outcome.prompt_id,
                "executed": list(outcome.executed),
                "cached": list(outcome.cached),
                "success": outcome.success,
            }
        )

    def start_tasks(self) -> None:
        self._tasks = [
            asyncio.create_task(self.hub.run_publisher(), name="comfyui-sim-publisher"),
            asyncio.create_task(
                run_worker(self.queue, self.executor, self.hub, self.record),
                name="comfyui-sim-worker",
            ),
        ]

    async def stop_tasks(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


SIM_STATE = web.AppKey("comfyui_sim_state", SimState)
