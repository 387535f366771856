"""The fleet: hands waiting workflows to connected runners and applies what runners report.

One Fleet per control-plane process. Dispatch runs in a single background task woken by
``kick()``, so two dispatches never race for the same free slot; the store's conditional
claim keeps a workflow from being given out twice all the same.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from control_plane.capabilities import missing, needs
from control_plane.events import EventHub
from control_plane.metrics import Metrics
from control_plane.registry import AgentConnection, Registry
from control_plane.settings import Settings
from control_plane.store import TERMINAL, Store
from control_plane.tables import Workflow, as_utc, utcnow
from control_plane.views import workflow_status_event
from protocol.messages import Cancel, HeldJob, Job, JobDone, JobFile, JobUpdate

log = logging.getLogger(__name__)


def agent_file_url(workflow_id: str, sha256: str) -> str:
    return f"/v1/agent/jobs/{workflow_id}/files/{sha256}"


def build_job(wf: Workflow) -> Job:
    params = wf.workflow_params
    files = [
        JobFile(
            name=name,
            filename=ref["filename"],
            url=agent_file_url(wf.id, ref["sha256"]),
            sha256=ref["sha256"],
            size_bytes=ref["size_bytes"],
        )
        for name, ref in params.get("files", {}).items()
    ]
    rerun = params.get("rerun") or {}
    return Job(
        workflow_id=wf.id,
        attempt=wf.attempt,
        workflow_json=wf.workflow_json,
        params=dict(params.get("values", {})),
        files=files,
        rerun_from=rerun.get("from"),
        fixed_random=rerun.get("fixed_random", {}),
        timestamp_ms=rerun.get("timestamp_ms"),
    )


def _gpu_busy(conn: AgentConnection) -> float:
    """Mean GPU utilisation the runner last reported (0 when it reported none)."""
    gpus = conn.capacity.get("gpus") or []
    used = [g["utilization_pct"] for g in gpus if g.get("utilization_pct") is not None]
    return sum(used) / len(used) if used else 0.0


class Fleet:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        registry: Registry,
        hub: EventHub,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.store = store
        self.registry = registry
        self.hub = hub
        self._wake = asyncio.Event()
        self._grace: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        # Set (and replaced) whenever a runner or a workflow changes: wakes ``wait_for`` and
        # anything else following the fleet live (the dashboard).
        self._changed = asyncio.Event()
        self.stopping = False  # set when the control plane shuts down

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """After a restart no runner is connected yet: every runner holding work gets its
        grace period to come back before that work is requeued."""
        held = await self.store.inflight_workflows()
        for runner_id in {wf.runner_id for wf in held if wf.runner_id}:
            self._start_grace(runner_id)
        self._spawn(self._dispatch_loop())
        self.kick()

    async def stop(self) -> None:
        for handle in self._grace.values():
            handle.cancel()
        self._grace.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def kick(self) -> None:
        self._wake.set()
        self.changed()

    def changed(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float) -> None:
        """Wait until ``predicate()`` holds, re-checking at every change of the fleet."""
        async with asyncio.timeout(timeout_s):
            while not predicate():
                await self._changed.wait()

    async def next_change(self) -> None:
        await self._changed.wait()

    # -- dispatch ------------------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self.dispatch_waiting()
            except Exception:  # a loop boundary: log and keep dispatching
                log.exception("dispatch round failed")

    async def dispatch_waiting(self) -> None:
        waiting = await self.store.waiting_workflows()
        for wf in waiting:
            conn = self._pick_runner(wf)
            if conn is None:
                continue
            try:
                job = build_job(wf)
            except (KeyError, TypeError, ValueError):
                log.exception("workflow %s: cannot build its job", wf.id)
                continue
            if not await self.store.claim_workflow(wf.id, wf.attempt, conn.runner_id):
                continue
            conn.free_slots -= 1
            conn.jobs.add(wf.id)
            models = needs(wf.workflow_json, wf.workflow_params.get("values", {})).model_files
            if models:
                conn.warm_models = models
            if await conn.send(job):
                if self.metrics is not None:
                    self.metrics.dispatch_latency.observe((utcnow() - as_utc(wf.updated_at)).total_seconds())
                log.info("workflow %s attempt %d -> runner %s", wf.id, wf.attempt, conn.runner_id)
            else:
                conn.jobs.discard(wf.id)
                await self.store.unclaim_workflow(wf.id, wf.attempt, conn.runner_id)

    def _pick_runner(self, wf: Workflow) -> AgentConnection | None:
        """DESIGN §6, in order: the runner a rerun-from-task names; runners whose ComfyUI
        has every node class and model; with a free slot; warm with the same models; the
        least loaded. Ties go to the longest connected: never random."""
        need = needs(wf.workflow_json, wf.workflow_params.get("values", {}))
        eligible = [
            c
            for c in self.registry.all()
            if c.account_id == wf.account_id and c.accepts(wf.tags) and not missing(need, c.offers)
        ]
        preferred = next((c for c in eligible if c.runner_id == wf.preferred_runner_id), None)
        if preferred is not None:
            if preferred.free_slots > 0:
                return preferred
            # Its ComfyUI cache holds the upstream nodes: worth waiting a while for a slot,
            # but not for a runner whose ComfyUI is down (its cache is gone) nor for ever.
            waited_s = (utcnow() - as_utc(wf.updated_at)).total_seconds()
            left_s = self.settings.rerun_affinity_wait_s - waited_s
            if preferred.healthy and left_s > 0:
                asyncio.get_running_loop().call_later(left_s, self.kick)
                return None
        free = [c for c in eligible if c.free_slots > 0]
        if not free:
            return None
        wanted = need.model_files

        def rank(c: AgentConnection) -> tuple[bool, int, float, float]:
            warm = bool(wanted) and wanted <= c.warm_models
            return (not warm, len(c.jobs), _gpu_busy(c), c.connected_at)

        return min(free, key=rank)

    # -- what runners report -------------------------------------------------------------

    async def runner_connected(self, conn: AgentConnection, held: list[HeldJob]) -> list[HeldJob]:
        """Reconcile what a (re)connecting runner holds with what we think it holds.
        Returns the held jobs it must drop."""
        handle = self._grace.pop(conn.runner_id, None)
        if handle is not None:
            handle.cancel()
        ours = {wf.id: wf for wf in await self.store.inflight_workflows(conn.runner_id)}
        held_current = {
            h.workflow_id for h in held if h.workflow_id in ours and ours[h.workflow_id].attempt == h.attempt
        }
        drop = [h for h in held if h.workflow_id not in held_current]
        for wf in ours.values():
            if wf.id in held_current:
                conn.jobs.add(wf.id)
            else:
                # We gave it this job but the runner no longer has it: run it again.
                await self._requeue(wf, f"runner {conn.name} lost the job")
        return drop

    async def runner_ready(self, conn: AgentConnection, free_slots: int) -> None:
        # The agent counts what it holds; jobs sent but not yet arrived it cannot count.
        total = int(conn.capacity.get("slots") or 1)
        conn.free_slots = max(0, min(free_slots, total - len(conn.jobs)))
        self.kick()

    async def runner_disconnected(self, conn: AgentConnection, *, left: bool = False) -> None:
        self.changed()
        if not conn.jobs:
            return
        if left:
            for wf in await self.store.inflight_workflows(conn.runner_id):
                await self._requeue(wf, f"runner {conn.name} left before running it")
        else:
            self._start_grace(conn.runner_id)

    async def runner_deleted(self, runner_id: str) -> None:
        """A deleted runner will not come back: its work goes elsewhere now, not after grace."""
        handle = self._grace.pop(runner_id, None)
        if handle is not None:
            handle.cancel()
        for wf in await self.store.inflight_workflows(runner_id):
            await self._requeue(wf, "its runner was deleted")

    def _start_grace(self, runner_id: str) -> None:
        if runner_id in self._grace:
            return
        loop = asyncio.get_running_loop()
        self._grace[runner_id] = loop.call_later(
            self.settings.runner_grace_s, lambda: self._spawn(self._grace_expired(runner_id))
        )

    async def _grace_expired(self, runner_id: str) -> None:
        self._grace.pop(runner_id, None)
        if self.registry.get(runner_id) is not None:
            return
        for wf in await self.store.inflight_workflows(runner_id):
            if self.registry.get(runner_id) is not None:
                return  # it came back while we were at it: its hello reconciles the rest
            await self._requeue(
                wf, f"runner {runner_id} did not come back within {self.settings.runner_grace_s:g} s"
            )

    async def _requeue(self, wf: Workflow, reason: str) -> None:
        updated = await self.store.requeue(
            wf.id, wf.attempt, wf.runner_id, self.settings.max_attempts, reason
        )
        if updated is None:
            return
        log.warning("workflow %s attempt %d requeued: %s", wf.id, wf.attempt, reason)
        if updated.status == "failed":
            self.hub.publish(wf.id, "cause", {"exception_message": updated.exception_message})
        self.hub.publish(wf.id, "status", workflow_status_event(updated))
        self.kick()

    async def job_update(self, conn: AgentConnection, msg: JobUpdate) -> None:
        changes: dict[str, Any] = {}
        if msg.prompt_id is not None:
            changes["prompt_id"] = msg.prompt_id
        if msg.queue_number is not None:
            changes["queue_number"] = msg.queue_number
        if msg.progress is not None:
            changes["progress"] = msg.progress
        if msg.status is not None and msg.status != "completed":
            changes["status"] = msg.status
            if msg.status == "running":
                changes["started_at"] = utcnow()
            if msg.status in TERMINAL:
                changes["completed_at"] = utcnow()
        if msg.error is not None:
            changes.update(
                error_node=msg.error.node_id,
                exception_type=msg.error.exception_type,
                exception_message=msg.error.message,
                node_errors=msg.error.node_errors,
            )
        node_event = None
        if msg.node is not None:
            node_event = (msg.node.node_id, msg.node.class_type, msg.node.event)
        wf = await self.store.update_current(
            msg.workflow_id,
            msg.attempt,
            conn.runner_id,
            changes,
            resolved_params=msg.resolved_params,
            node_event=node_event,
        )
        if wf is None:
            log.info("workflow %s: dropped stale update for attempt %d", msg.workflow_id, msg.attempt)
            await self._stale(conn, msg.workflow_id, msg.attempt)
            return
        if msg.node is not None:
            self.hub.publish(msg.workflow_id, "node", {**msg.node.model_dump(), "progress": msg.progress})
            self.changed()
        if msg.error is not None:
            self.hub.publish(
                wf.id,
                "cause",
                {
                    "error_node": wf.error_node,
                    "exception_type": wf.exception_type,
                    "exception_message": wf.exception_message,
                    "node_errors": wf.node_errors,
                },
            )
        if "status" in changes or "queue_number" in changes:
            self.hub.publish(wf.id, "status", workflow_status_event(wf))
            self.changed()
        if wf.status in TERMINAL:
            conn.jobs.discard(wf.id)

    async def job_done(self, conn: AgentConnection, msg: JobDone) -> None:
        now = utcnow()
        wf = await self.store.update_current(
            msg.workflow_id,
            msg.attempt,
            conn.runner_id,
            {"status": "completed", "completed_at": now, "progress": 1.0, "queue_number": None},
        )
        if wf is None:
            log.info("workflow %s: dropped stale completion of attempt %d", msg.workflow_id, msg.attempt)
            await self._stale(conn, msg.workflow_id, msg.attempt)
            return
        if msg.texts:
            await self.store.set_params(wf.id, {**wf.workflow_params, "texts": msg.texts})
        log.info("workflow %s completed on runner %s (%d outputs)", wf.id, conn.runner_id, len(msg.outputs))
        if self.metrics is not None and wf.started_at is not None:
            self.metrics.execution_duration.observe((now - as_utc(wf.started_at)).total_seconds())
        self.hub.publish(wf.id, "status", workflow_status_event(wf))
        self.changed()
        conn.jobs.discard(wf.id)

    async def _stale(self, conn: AgentConnection, workflow_id: str, attempt: int) -> None:
        """A runner reports on work that is no longer its own (cancelled, requeued, rerun):
        forget it on that runner and tell the agent to stop spending its GPU on it."""
        current = await self.store.get_workflow(None, workflow_id)
        holds_current = current.runner_id == conn.runner_id and current.status not in TERMINAL
        if not holds_current:
            conn.jobs.discard(workflow_id)
        if not (holds_current and current.attempt == attempt):
            await conn.send(Cancel(workflow_id=workflow_id, attempt=attempt))

    # -- what clients ask ----------------------------------------------------------------

    async def cancel(self, wf: Workflow) -> Workflow | None:
        """Cancel a workflow that has not finished; ``None`` if it already had."""
        cancelled = await self.store.cancel_workflow(wf.id)
        if cancelled is None:
            return None
        # The fresh row says who holds it now: the dispatcher may have sent it meanwhile.
        if cancelled.runner_id is not None:
            conn = self.registry.get(cancelled.runner_id)
            if conn is not None:
                conn.jobs.discard(wf.id)
                await conn.send(Cancel(workflow_id=wf.id, attempt=cancelled.attempt))
        log.info("workflow %s cancelled (was %s)", wf.id, wf.status)
        self.hub.publish(wf.id, "status", workflow_status_event(cancelled))
        self.changed()
        return cancelled

    async def start_new_attempt(
        self, wf: Workflow, changes: dict[str, Any], rerun_nodes: set[str] | None
    ) -> Workflow | None:
        """Seed 000: the next attempt of ``wf``. An ongoing attempt is interrupted on its
        runner; the new one waits for a runner like any other (the preferred one, if set)."""
        updated = await self.store.new_attempt(wf.id, wf.attempt, changes, rerun_nodes)
        if updated is None:
            return None
        if wf.runner_id is not None and wf.status not in TERMINAL:
            conn = self.registry.get(wf.runner_id)
            if conn is not None:
                conn.jobs.discard(wf.id)
                await conn.send(Cancel(workflow_id=wf.id, attempt=wf.attempt))
        log.info("workflow %s: attempt %d replaces attempt %d", wf.id, updated.attempt, wf.attempt)
        self.hub.publish(wf.id, "status", workflow_status_event(updated))
        self.kick()
        return updated
