"""The agent: one control-plane connection, one ComfyUI, and the jobs running between them."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from typing import Any

from websockets.asyncio.client import connect

from protocol.messages import (
    Cancel,
    CapacityUpdate,
    Hello,
    Job,
    Message,
    Ready,
    Welcome,
)
from runner_agent.capacity import NvmlProbe, probe_capacity
from runner_agent.comfy_info import ComfyUIInfoCache
from runner_agent.comfyui import ComfyUIClient, ComfyUIError
from runner_agent.config import AgentSettings
from runner_agent.connection import (
    Connect,
    ControlPlaneConnection,
    GiveUp,
    JobKey,
    Sleep,
    held,
)
from runner_agent.control_files import ControlPlaneFiles
from runner_agent.executor import ExecutorDeps, JobExecution

log = logging.getLogger(__name__)

# After an abandon, how long jobs get to take their prompts off ComfyUI before being cut.
_ABANDON_WAIT_S = 5.0

__all__ = ["Agent", "GiveUp"]


class Agent:
    """``await Agent(settings).run()`` until :meth:`stop` (returns) or a give-up close code
    from the control plane (raises :class:`GiveUp`)."""

    def __init__(
        self,
        settings: AgentSettings,
        *,
        connect_fn: Connect = connect,
        sleep: Sleep = asyncio.sleep,
        rand: Callable[[], float] = random.random,
        nvml: NvmlProbe | None = None,
    ) -> None:
        self.settings = settings
        self.comfy = ComfyUIClient(
            settings.comfyui_url,
            headers=settings.comfyui_headers,
            read_timeout_s=settings.http_read_timeout_s,
        )
        self.files = ControlPlaneFiles(
            settings.http_base_url, settings.token, read_timeout_s=settings.http_read_timeout_s
        )
        self.comfy_info = ComfyUIInfoCache(self.comfy)
        self.deps = ExecutorDeps(settings, self.comfy, self.comfy_info, self.files)
        self.nvml = nvml if nvml is not None else NvmlProbe()
        self.connection = ControlPlaneConnection(
            settings, self, connect_fn=connect_fn, sleep=sleep, rand=rand
        )
        self.jobs: dict[JobKey, JobExecution] = {}
        self._tasks: dict[JobKey, asyncio.Task[None]] = {}
        self._side_tasks: set[asyncio.Task[Any]] = set()
        self._stopping = False
        self._hurry = asyncio.Event()
        self._comfyui_down = False

    @property
    def active_jobs(self) -> set[JobKey]:
        """Jobs that still hold a slot: not yet ended, nor abandoned."""
        return {key for key, execution in self.jobs.items() if not execution.ended}

    @property
    def free_slots(self) -> int:
        return max(0, self.settings.slots - len(self.active_jobs))

    # -- life cycle -------------------------------------------------------------------------

    async def run(self) -> None:
        log.info(
            "agent %s starting: control plane %s, ComfyUI %s, %d slot(s)",
            self.settings.agent_version,
            self.settings.server_url,
            self.settings.comfyui_url,
            self.settings.slots,
        )
        await asyncio.to_thread(self.settings.data_dir.mkdir, parents=True, exist_ok=True)
        try:
            await self.connection.run()
        except GiveUp:
            await self._abandon_all()
            raise
        finally:
            await self._close()

    async def stop(self) -> None:
        """Stop taking work, give running jobs ``shutdown_grace_s`` to finish, abandon the
        rest, then close the connection with 1001. A second call cuts the grace short."""
        if self._stopping:
            self._hurry.set()
            return
        self._stopping = True
        if self._tasks:
            log.info(
                "stopping: waiting up to %.0f s for %d running job(s)",
                self.settings.shutdown_grace_s,
                len(self._tasks),
            )
            await self._wait_for_jobs(self.settings.shutdown_grace_s)
        await self._abandon_all()
        await self.connection.stop()

    async def _wait_for_jobs(self, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        hurry = asyncio.create_task(self._hurry.wait())
        try:
            while self._tasks and not self._hurry.is_set():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                await asyncio.wait(
                    {hurry, *self._tasks.values()},
                    timeout=remaining,
                    return_when=asyncio.FIRST_COMPLETED,
                )
        finally:
            hurry.cancel()

    async def _abandon_all(self) -> None:
        if not self._tasks:
            return
        log.info("abandoning %d job(s)", len(self._tasks))
        for execution in list(self.jobs.values()):
            execution.abandon()
        tasks = list(self._tasks.values())
        _, pending = await asyncio.wait(tasks, timeout=_ABANDON_WAIT_S)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _close(self) -> None:
        for task in list(self._side_tasks):
            task.cancel()
        await asyncio.gather(*self._side_tasks, return_exceptions=True)
        await self.comfy.close()
        await self.files.close()
        await asyncio.to_thread(self.nvml.close)

    # -- the connection's questions (ConnectionHandler) -------------------------------------

    async def hello(self, buffered: set[JobKey]) -> Hello:
        info, devices = await self.comfy_info.describe()
        self._comfyui_down = devices is None
        capacity = await probe_capacity(
            self.nvml,
            disk_path=str(self.settings.data_dir),
            comfyui_devices=devices,
            slots=self.settings.slots,
        )
        return Hello(
            agent_version=self.settings.agent_version,
            capacity=capacity,
            comfyui=info,
            jobs=held(self.active_jobs | buffered),
        )

    async def on_welcome(self, welcome: Welcome) -> None:
        if welcome.status != "active":
            log.warning(
                "runner %s is %s on the control plane: it will get no work", welcome.runner_id, welcome.status
            )
        for dropped in welcome.drop_jobs:
            execution = self.jobs.get((dropped.workflow_id, dropped.attempt))
            if execution is not None:
                log.info(
                    "workflow %s attempt %d: the control plane dropped it",
                    dropped.workflow_id,
                    dropped.attempt,
                )
                execution.abandon()

    async def on_connected(self) -> None:
        await self._ready()

    async def on_message(self, message: Message) -> None:
        if isinstance(message, Job):
            self._start(message)
        elif isinstance(message, Cancel):
            execution = self.jobs.get((message.workflow_id, message.attempt))
            if execution is None:
                log.info(
                    "workflow %s attempt %d: cancel for a job not held here; ignored",
                    message.workflow_id,
                    message.attempt,
                )
            else:
                execution.cancel()

    async def capacity(self) -> CapacityUpdate:
        try:
            stats = await self.comfy.system_stats()
        except ComfyUIError as exc:
            if not self._comfyui_down:
                log.warning("ComfyUI at %s stopped answering: %s", self.settings.comfyui_url, exc)
            self._comfyui_down = True
            self.comfy_info.invalidate()
            devices = None
        else:
            devices = [d for d in stats.get("devices") or [] if isinstance(d, dict)]
            if self._comfyui_down:
                # It may have restarted with other nodes or models: tell the control plane.
                self._comfyui_down = False
                self._spawn(self.connection.reconnect("ComfyUI answers again"))
        capacity = await probe_capacity(
            self.nvml,
            disk_path=str(self.settings.data_dir),
            comfyui_devices=devices,
            slots=self.settings.slots,
        )
        return CapacityUpdate(capacity=capacity)

    # -- jobs -------------------------------------------------------------------------------

    def _start(self, job: Job) -> None:
        key = (job.workflow_id, job.attempt)
        tag = f"workflow {job.workflow_id} attempt {job.attempt}"
        if key in self.jobs:
            log.info("%s: already running here; duplicate ignored", tag)
            return
        for other_key, other in list(self.jobs.items()):
            if other_key[0] != job.workflow_id:
                continue
            if other_key[1] > job.attempt:
                log.warning("%s: attempt %d already runs here; stale job ignored", tag, other_key[1])
                return
            other.abandon()  # a newer attempt replaces it
        if self._stopping:
            log.warning("%s: arrived while stopping; running it within the grace period", tag)
        if self.free_slots == 0:
            log.warning("%s: no free slot (%d running); ComfyUI will queue it", tag, len(self.active_jobs))
        execution = JobExecution(job, self.deps, self.connection.send)
        self.jobs[key] = execution
        log.info("%s: received (%d nodes, %d files)", tag, len(job.workflow_json), len(job.files))
        self._tasks[key] = asyncio.create_task(self._run_job(execution), name=f"job {tag}")

    async def _run_job(self, execution: JobExecution) -> None:
        try:
            await execution.run()
        finally:
            self.jobs.pop(execution.key, None)
            self._tasks.pop(execution.key, None)
        await self._ready()

    async def _ready(self) -> None:
        if not self._stopping and self.free_slots > 0:
            await self.connection.send(Ready(free_slots=self.free_slots))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)
