"""The agent: one control-plane connection, one or more ComfyUI instances (one per GPU), and
the jobs running between them.

Health: the agent is healthy while every instance answers and every supervised ComfyUI
process runs. Losing one is told to the control plane at once (``capacity`` with
``healthy: false``, then ``ready`` with the healthy instances' free slots only); getting it
back is told by a fresh ``hello``, since a restarted ComfyUI may offer other nodes and models.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections.abc import Callable, Coroutine
from typing import Any

from websockets.asyncio.client import connect

from protocol.capacity import Capacity
from protocol.messages import (
    Cancel,
    CapacityUpdate,
    HeldJob,
    Hello,
    Interrupt,
    Job,
    JobAck,
    Message,
    Proceed,
    Ready,
    Reply,
    StatsRequest,
    Welcome,
)
from runner_agent.capacity import NvmlProbe, devices_of_instances, probe_capacity
from runner_agent.comfyui_files import remove_job_files
from runner_agent.config import AgentSettings
from runner_agent.connection import (
    Connect,
    ControlPlaneConnection,
    GiveUp,
    JobKey,
    Sleep,
)
from runner_agent.control_files import ControlPlaneFiles
from runner_agent.executor import JobExecution
from runner_agent.instances import (
    ComfyUIInstance,
    build_instances,
    choose_instance,
    healthy_free_slots,
    probe_system_stats,
    unhealthy_reason,
)
from runner_agent.job_folder import JobFolder, load_saved_jobs
from runner_agent.runner_requests import interrupt_running, stats_data
from runner_agent.supervisor import ComfyUIProcess

log = logging.getLogger(__name__)

# After an abandon, how long jobs get to take their prompts off ComfyUI before being cut.
_ABANDON_WAIT_S = 5.0
# A heartbeat's probe of one instance; a ComfyUI that takes longer counts as not answering.
_HEARTBEAT_PROBE_S = 10.0

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
        self.files = ControlPlaneFiles(
            settings.http_base_url,
            settings.token,
            read_timeout_s=settings.http_read_timeout_s,
            retry_s=settings.transfer_retry_s,
        )
        self.instances = build_instances(settings, self.files, self._instance_unreachable)
        # One folder per job (job_folder.py): what a restart needs to lose nothing.
        self.jobs_root = settings.data_dir / "jobs"
        # The first instance, for callers that know of one ComfyUI only.
        self.comfy = self.instances[0].comfy
        self.comfy_info = self.instances[0].info
        self.processes: dict[int, ComfyUIProcess] = {}
        for instance, cmd in zip(self.instances, settings.comfyui_cmds, strict=False):
            self.processes[instance.number] = ComfyUIProcess(
                cmd,
                instance.comfy,
                on_state=functools.partial(self._process_state, instance),
                start_timeout_s=settings.comfyui_start_timeout_s,
                restart_max_s=settings.comfyui_restart_max_s,
                stop_grace_s=settings.comfyui_stop_grace_s,
            )
        self.nvml = nvml if nvml is not None else NvmlProbe()
        self.connection = ControlPlaneConnection(
            settings, self, connect_fn=connect_fn, sleep=sleep, rand=rand
        )
        self.jobs: dict[JobKey, JobExecution] = {}
        # Jobs that ended and whose last report waits for the control plane's job_ack.
        self.unacked: dict[JobKey, JobExecution] = {}
        self._resend: list[JobExecution] = []
        self._placed: dict[JobKey, ComfyUIInstance] = {}
        self._tasks: dict[JobKey, asyncio.Task[None]] = {}
        self._side_tasks: set[asyncio.Task[Any]] = set()
        self._stopping = False
        self._hurry = asyncio.Event()

    @property
    def active_jobs(self) -> set[JobKey]:
        """Jobs that still hold a slot: not yet ended, nor abandoned."""
        return {key for key, execution in self.jobs.items() if not execution.ended}

    @property
    def free_slots(self) -> int:
        """Free slots of the healthy instances: what the control plane may send now."""
        return healthy_free_slots(self.instances)

    # -- life cycle -------------------------------------------------------------------------

    async def run(self) -> None:
        log.info(
            "agent %s starting: control plane %s, ComfyUI %s, %d slot(s)",
            self.settings.agent_version,
            ", ".join(self.settings.server_urls),
            ", ".join(f"{i.url} (GPU {i.gpu_index})" for i in self.instances),
            self.settings.total_slots,
        )
        await asyncio.to_thread(self.settings.data_dir.mkdir, parents=True, exist_ok=True)
        await self._resume_saved_jobs()
        for process in self.processes.values():
            process.start()
        try:
            await self.connection.run()
        except GiveUp:
            await self._abandon_all()
            raise
        finally:
            await self._close()

    async def stop(self) -> None:
        """Drain: ask for no more work, give running jobs ``shutdown_grace_s`` to finish and
        report, abandon the rest, then close the connection with 1001. A second call cuts
        the grace short."""
        if self._stopping:
            self._hurry.set()
            return
        self._stopping = True
        # The control plane sends work only against free slots it was offered: take them back.
        await self.connection.send(Ready(free_slots=0))
        log.info(
            "draining: taking no new work; %d running job(s) get up to %.0f s to finish",
            len(self._tasks),
            self.settings.shutdown_grace_s,
        )
        if self._tasks:
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
        # After the jobs: abandoned prompts were taken off ComfyUI before it goes.
        await asyncio.gather(*(process.stop() for process in self.processes.values()))
        for instance in self.instances:
            await instance.comfy.close()
        await self.files.close()
        await asyncio.to_thread(self.nvml.close)

    # -- the connection's questions (ConnectionHandler) -------------------------------------

    async def hello(self, buffered: set[JobKey]) -> Hello:
        described = await asyncio.gather(*(i.info.describe() for i in self.instances))
        for instance, (_, devices) in zip(self.instances, described, strict=True):
            # describe() logged why; the heartbeat's probe keeps the reason from then on.
            instance.answer_error = None if devices is not None else "/system_stats or /object_info failed"
        # The instances are expected to be one install: the first healthy one speaks for all.
        infos = [
            info for instance, (info, _) in zip(self.instances, described, strict=True) if instance.healthy
        ]
        capacity = await self._capacity(
            [(i.gpu_index, devices) for i, (_, devices) in zip(self.instances, described, strict=True)]
        )
        reason = unhealthy_reason(self.instances)
        return Hello(
            agent_version=self.settings.agent_version,
            capacity=capacity,
            comfyui=infos[0] if infos else described[0][0],
            jobs=self._held(buffered),
            healthy=reason is None,
            unhealthy_reason=reason,
        )

    def _held(self, buffered: set[JobKey]) -> list[HeldJob]:
        """What hello names: jobs still running, and jobs whose last report is not yet
        acknowledged (``finished``), so the control plane keeps them rather than run them
        again."""
        finished = {key for key, e in self.jobs.items() if e.final is not None} | set(self.unacked)
        running = (self.active_jobs | buffered) - finished
        return [
            HeldJob(workflow_id=w, attempt=a, finished=(w, a) in finished)
            for w, a in sorted(running | finished)
        ]

    async def on_welcome(self, welcome: Welcome) -> None:
        # Files go to and come from the control plane that welcomed us (one of several).
        self.files.base_url = self.connection.http_base_url
        if welcome.status != "active":
            log.warning(
                "runner %s is %s on the control plane: it will get no work", welcome.runner_id, welcome.status
            )
        for dropped in welcome.drop_jobs:
            key = (dropped.workflow_id, dropped.attempt)
            execution = self.jobs.get(key)
            if execution is not None:
                log.info(
                    "workflow %s attempt %d: the control plane dropped it",
                    dropped.workflow_id,
                    dropped.attempt,
                )
                execution.abandon()
            self._forget(key)
        # What went out on an earlier connection just before it dropped may never have
        # arrived: last reports not yet acknowledged, and the "uploaded" that waits for its
        # go-ahead. Those still in the connection's buffer go out with it.
        buffered = self.connection.buffer.keys()
        self._resend = [
            e
            for e in (*self.jobs.values(), *self.unacked.values())
            if e.key not in buffered and ((e.final is not None and not e.acked) or e.awaiting_go is not None)
        ]

    async def on_connected(self) -> None:
        for execution in self._resend:
            message = execution.final if execution.final is not None else execution.awaiting_go
            if message is not None and not execution.acked:
                await self.connection.send(message)
        self._resend = []
        # Even when it is none (every ComfyUI down): the control plane learns where it stands.
        if not self._stopping:
            await self.connection.send(Ready(free_slots=self.free_slots))

    async def on_message(self, message: Message) -> None:
        if isinstance(message, Job):
            self._start(message)
        elif isinstance(message, Proceed):
            self._on_proceed(message)
        elif isinstance(message, JobAck):
            self._on_ack(message)
        elif isinstance(message, Cancel):
            self._on_cancel(message)
        elif isinstance(message, Interrupt):
            # Off the receive loop: a slow ComfyUI must not hold up jobs and cancels.
            self._spawn(self._answer(message.request_id, self._interrupt(message.request_id)))
        elif isinstance(message, StatsRequest):
            self._spawn(self._answer(message.request_id, self._stats(message.request_id)))

    def _on_proceed(self, message: Proceed) -> None:
        execution = self.jobs.get((message.workflow_id, message.attempt))
        if execution is not None:
            execution.proceed()

    def _on_ack(self, message: JobAck) -> None:
        key = (message.workflow_id, message.attempt)
        execution = self.jobs.get(key)
        if execution is not None:
            execution.acknowledge()  # its task removes the folder when it ends
        self._forget(key)

    def _on_cancel(self, message: Cancel) -> None:
        key = (message.workflow_id, message.attempt)
        execution = self.jobs.get(key)
        if execution is not None:
            execution.cancel()
        elif key in self.unacked:
            self._forget(key)  # finished, but the control plane does not want it any more
        else:
            log.info(
                "workflow %s attempt %d: cancel for a job not held here; ignored",
                message.workflow_id,
                message.attempt,
            )

    async def capacity(self) -> CapacityUpdate:
        answers = await asyncio.gather(*(probe_system_stats(i, _HEARTBEAT_PROBE_S) for i in self.instances))
        came_back = []
        went_down = False
        for instance, (_, error) in zip(self.instances, answers, strict=True):
            was_healthy = instance.healthy
            instance.answer_error = error
            if was_healthy and not instance.healthy:
                log.warning("ComfyUI at %s stopped answering: %s", instance.url, error)
                instance.info.invalidate()
                went_down = True
            elif instance.healthy and not was_healthy:
                came_back.append(instance.url)
        if went_down and not self._stopping:
            # Its slots are no longer on offer: say so before the next job arrives.
            self._spawn(self.connection.send(Ready(free_slots=self.free_slots)))
        if came_back:
            # It may have restarted with other nodes or models: tell the control plane.
            self._spawn(self.connection.reconnect(f"ComfyUI at {', '.join(came_back)} answers again"))
        capacity = await self._capacity(
            [(i.gpu_index, _devices(stats)) for i, (stats, _) in zip(self.instances, answers, strict=True)]
        )
        reason = unhealthy_reason(self.instances)
        return CapacityUpdate(capacity=capacity, healthy=reason is None, unhealthy_reason=reason)

    async def _capacity(self, answers: list[tuple[int, list[dict[str, Any]] | None]]) -> Capacity:
        return await probe_capacity(
            self.nvml,
            disk_path=str(self.settings.data_dir),
            comfyui_devices=devices_of_instances(answers),
            slots=self.settings.total_slots,
        )

    # -- health -----------------------------------------------------------------------------

    def _process_state(self, instance: ComfyUIInstance, down: str | None) -> None:
        """The supervisor's word on a ComfyUI process: ``None`` once it answers."""
        was_healthy = instance.healthy
        instance.process_down = down
        if down is None:
            instance.answer_error = None  # the supervisor just had an answer from it
        if instance.healthy == was_healthy:
            return
        if instance.healthy:
            log.info("ComfyUI at %s runs again", instance.url)
            self._spawn(self.connection.reconnect(f"ComfyUI at {instance.url} runs again"))
        else:
            log.warning("runner unhealthy: ComfyUI at %s is %s", instance.url, down)
            instance.info.invalidate()
            self._spawn(self._report_health())

    def _instance_unreachable(self, number: int, reason: str) -> None:
        """A job found an instance not answering: no more work goes there until the
        heartbeat's probe hears from it again (which then sends a fresh hello)."""
        instance = self.instances[number]
        if instance.answer_error is not None:
            return
        instance.answer_error = reason
        instance.info.invalidate()
        log.warning("ComfyUI at %s is out of service until it answers again: %s", instance.url, reason)
        self._spawn(self._report_health())

    async def _report_health(self) -> None:
        """Tell the control plane now, not at the next heartbeat."""
        await self.connection.send(await self.capacity())
        if not self._stopping:
            await self.connection.send(Ready(free_slots=self.free_slots))

    # -- runner-level requests --------------------------------------------------------------

    async def _answer(self, request_id: str, work: Coroutine[Any, Any, Reply]) -> None:
        try:
            reply = await work
        except Exception as exc:
            # A request's boundary: the control plane gets an answer whatever broke.
            log.exception("request %s failed", request_id)
            reply = Reply(
                request_id=request_id, ok=False, error=f"agent error: {exc.__class__.__name__}: {exc}"
            )
        await self.connection.send(reply)

    async def _interrupt(self, request_id: str) -> Reply:
        result = await interrupt_running(self.instances)
        log.info(
            "request %s: interrupted prompt(s) %s%s",
            request_id,
            result.interrupted or "none",
            f"; errors: {result.errors}" if result.errors else "",
        )
        return Reply(
            request_id=request_id,
            ok=not result.errors,
            error="; ".join(result.errors) or None,
            data={"interrupted": result.interrupted},
        )

    async def _stats(self, request_id: str) -> Reply:
        """Measured now, not the last heartbeat's figures; health is left to the heartbeat,
        since the short timeout here would make a busy ComfyUI flap."""
        timeout_s = self.settings.stats_timeout_s
        answers = await asyncio.gather(*(probe_system_stats(i, timeout_s) for i in self.instances))
        capacity = await self._capacity(
            [(i.gpu_index, _devices(stats)) for i, (stats, _) in zip(self.instances, answers, strict=True)]
        )
        log.info("request %s: stats sent", request_id)
        return Reply(request_id=request_id, data=stats_data(self.instances, capacity, answers))

    # -- jobs -------------------------------------------------------------------------------

    async def _resume_saved_jobs(self) -> None:
        """Jobs found in their folders at start: finished ones wait for their job_ack, those
        whose prompt was posted are followed to their end."""
        for saved in await asyncio.to_thread(load_saved_jobs, self.jobs_root, self.settings.state_keep_s):
            instance = next((i for i in self.instances if i.url == saved.prompt.instance_url), None)
            if instance is None:
                log.warning(
                    "%s: its ComfyUI %s is no longer configured; dropping it",
                    saved.folder.path.name,
                    saved.prompt.instance_url,
                )
                await saved.folder.remove()
                continue
            execution = JobExecution(saved.job, instance.deps, self.connection.send, saved.folder, saved)
            if saved.final is not None:
                execution.restore_final(saved.final)
                self.unacked[execution.key] = execution
                log.info(
                    "%s: finished before a restart; its report waits for the control plane", execution.tag
                )
            else:
                self._place(execution, instance)

    def _forget(self, key: JobKey) -> None:
        execution = self.unacked.pop(key, None)
        if execution is not None:
            self._spawn(self._clean_up(execution, done_with=True))

    async def _clean_up(self, execution: JobExecution, *, done_with: bool) -> None:
        """The job's folder; and once the control plane is done with the job (it has the last
        report, or cancelled it after that was sent), its files in ComfyUI's folders."""
        comfyui_dir = execution.deps.comfyui_dir
        if done_with and comfyui_dir is not None:
            workflow_id = execution.job.workflow_id
            # Another attempt of the workflow here uses the same input subfolder.
            others = any(k[0] == workflow_id and k != execution.key for k in (*self.jobs, *self.unacked))
            removed = await remove_job_files(
                comfyui_dir, workflow_id, await execution.folder.saved_outputs(), inputs=not others
            )
            log.info("%s: %d files removed from ComfyUI's folders", execution.tag, removed)
        await execution.folder.remove()

    def _start(self, job: Job) -> None:
        key = (job.workflow_id, job.attempt)
        tag = f"workflow {job.workflow_id} attempt {job.attempt}"
        if key in self.jobs or key in self.unacked:
            log.info("%s: already running here; duplicate ignored", tag)
            return
        if self._stopping:
            # Not held, so the control plane runs it elsewhere (it requeues what a
            # reconnecting or vanished runner does not hold).
            log.warning("%s: arrived while draining; not taken", tag)
            return
        for other_key, other in list(self.jobs.items()):
            if other_key[0] != job.workflow_id:
                continue
            if other_key[1] > job.attempt:
                log.warning("%s: attempt %d already runs here; stale job ignored", tag, other_key[1])
                return
            other.abandon()  # a newer attempt replaces it
        if self.free_slots == 0:
            log.warning("%s: no free slot (%d running); ComfyUI will queue it", tag, len(self.active_jobs))
        instance = choose_instance(self.instances)
        execution = JobExecution(
            job, instance.deps, self.connection.send, JobFolder(self.jobs_root, job.workflow_id, job.attempt)
        )
        log.info(
            "%s: received (%d nodes, %d files); runs on ComfyUI %s",
            tag,
            len(job.workflow_json),
            len(job.files),
            instance.url,
        )
        self._place(execution, instance)

    def _place(self, execution: JobExecution, instance: ComfyUIInstance) -> None:
        key = execution.key
        self.jobs[key] = execution
        self._placed[key] = instance
        instance.jobs[key] = execution
        self._tasks[key] = asyncio.create_task(self._run_job(execution), name=f"job {execution.tag}")

    async def _run_job(self, execution: JobExecution) -> None:
        try:
            await execution.run()
        finally:
            self.jobs.pop(execution.key, None)
            self._tasks.pop(execution.key, None)
            instance = self._placed.pop(execution.key, None)
            if instance is not None:
                instance.jobs.pop(execution.key, None)
            if execution.final is not None and not execution.acked:
                self.unacked[execution.key] = execution
            else:
                await self._clean_up(execution, done_with=execution.acked)
        await self._ready()

    async def _ready(self) -> None:
        if not self._stopping and self.free_slots > 0:
            await self.connection.send(Ready(free_slots=self.free_slots))

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coro)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)


def _devices(stats: dict[str, Any] | None) -> list[dict[str, Any]] | None:
    if stats is None:
        return None
    return [d for d in stats.get("devices") or [] if isinstance(d, dict)]
