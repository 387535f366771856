"""The fleet: hands waiting workflows to connected runners and applies what runners report.

One Fleet per control-plane process. Dispatch runs in a single background task woken by
``kick()``, so two dispatches never race for the same free slot; the store's conditional
claim keeps a workflow from being given out twice all the same.

Failures are kept apart by whose they are. The workflow's own (ComfyUI rejected the prompt,
a node raised) end it at once. The fleet's (a runner lost, its ComfyUI down, a prompt lost, a
transfer that could not get through) start the next attempt after a short backoff, on
another runner where one can run it, until ``max_attempts``. A node out of GPU memory gets
one more try on a runner with more free GPU memory, when the fleet has one. Deadlines
(``timeout_s`` per attempt, ``queue_timeout_s`` waiting for a runner) are swept every
``deadline_sweep_s``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection
from datetime import datetime
from typing import Any

from control_plane.db.blobs import BlobStore
from control_plane.db.reports import NodeEvent
from control_plane.db.rows import WorkflowState
from control_plane.db.store import Fault, Store
from control_plane.db.tables import IdempotencyRecord, Output, Workflow, as_utc, utcnow
from control_plane.fleet.capabilities import Needs, can_run, needs
from control_plane.fleet.events import EventHub, cause_event, output_event, status_event
from control_plane.fleet.metrics import Metrics
from control_plane.fleet.node_reports import Held, NodeReports
from control_plane.fleet.registry import AgentConnection, Registry
from control_plane.fleet.replica_bus import ReplicaBus
from control_plane.fleet.replicas import Replicas
from control_plane.fleet.runner_states import RunnerStates
from control_plane.fleet.waiting import Waiting, WaitingIndex, waits
from control_plane.model.errors import NotFound
from control_plane.model.lifecycle import TERMINAL, WorkflowStatus, holds_current, runs_on
from control_plane.model.params import WorkflowParams
from control_plane.settings import Settings
from protocol.agent_http import file_path
from protocol.closing import Close
from protocol.messages import (
    Cancel,
    HeldJob,
    Job,
    JobAck,
    JobDone,
    JobError,
    JobFile,
    JobUpdate,
    Proceed,
    dump_message,
)
from protocol.messages import NodeEvent as NodeReport

log = logging.getLogger(__name__)
# A text output is small (a caption, a number); one past this is refused like a file past its cap.
MAX_TEXT_OUTPUT_BYTES = 1024 * 1024
RUNNER_STATE_WRITE_S = 30.0
# How often a control plane sharing its database compares the waiting workflows there with
# its index, for an announcement it missed (replica_bus.py).
WAITING_SWEEP_S = 5.0


def _ranking(wanted: frozenset[str]) -> Callable[[AgentConnection], tuple[bool, int, float, float]]:
    """Among runners that may take a workflow: warm with the models it wants, the least
    loaded (jobs, then GPU use), the longest connected."""

    def rank(c: AgentConnection) -> tuple[bool, int, float, float]:
        return (bool(wanted) and not wanted <= c.warm_models, *c.load())

    return rank


def build_job(
    workflow_id: str, attempt: int, workflow_json: dict[str, Any], workflow_params: dict[str, Any]
) -> Job:
    params = WorkflowParams.of(workflow_params)
    files = [
        JobFile(
            name=name,
            filename=ref.filename,
            url=file_path(workflow_id, ref.sha256),
            sha256=ref.sha256,
            size_bytes=ref.size_bytes,
        )
        for name, ref in params.files.items()
    ]
    rerun = params.rerun
    return Job(
        workflow_id=workflow_id,
        attempt=attempt,
        workflow_json=workflow_json,
        params=dict(params.values),
        files=files,
        rerun_from=rerun.node_id if rerun else None,
        fixed_random=rerun.fixed_random if rerun else {},
        timestamp_ms=rerun.timestamp_ms if rerun else None,
    )


class Fleet:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        registry: Registry,
        hub: EventHub,
        blobs: BlobStore,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.blobs = blobs
        self.metrics = metrics
        self.store = store
        self.registry = registry
        self.hub = hub
        self._wake = asyncio.Event()
        self.waiting = WaitingIndex()
        self.node_reports = NodeReports(self._write_held, settings.node_report_write_s)
        # Live capacity stays in memory; the store gets it this often, for while a runner is
        # away, so that a large fleet's heartbeats do not turn into a write storm.
        self.runner_states = RunnerStates(store, RUNNER_STATE_WRITE_S)
        self._wake_later: asyncio.TimerHandle | None = None
        self._grace: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        # Set (and replaced) whenever a runner or a workflow changes: wakes ``wait_for`` and
        # anything else following the fleet live (the dashboard).
        self._changed = asyncio.Event()
        self.stopping = False  # set when the control plane shuts down
        # The other control planes on a shared database, once started (replicas.py).
        self.replicas: Replicas | None = None
        # Told of a runner that did not come back in time, with the workflows it held that
        # went back to waiting (the webhook sender's runner.offline).
        self.on_runner_offline: Callable[[str, list[str]], Awaitable[None]] | None = None

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """After a restart no runner is connected yet: every runner holding work gets its
        grace period to come back before that work is requeued."""
        held = await self.store.inflight_workflows()
        for runner_id in {wf.runner_id for wf in held if wf.runner_id}:
            self._start_grace(runner_id)
        await self._load_waiting()
        if self.store.shared:
            bus = ReplicaBus(self.store.listen_dsn(), self.settings.replica_id)
            self.replicas = Replicas(self, bus, self._spawn)
            self._spawn(bus.run())
            self._spawn(self._sweep_loop())
            self._spawn(self.replicas.lease_loop())
        self._spawn(self._dispatch_loop())
        self._spawn(self._deadline_loop())
        self._spawn(self.runner_states.run())
        self.kick()

    async def stop(self) -> None:
        await self.node_reports.close()
        for handle in self._grace.values():
            handle.cancel()
        self._grace.clear()
        if self._wake_later is not None:
            self._wake_later.cancel()
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

    def _kick_in(self, delay_s: float) -> None:
        """Dispatch again in ``delay_s`` (a retry's backoff ends then); one timer, the earliest."""
        loop = asyncio.get_running_loop()
        when = loop.time() + delay_s
        if self._wake_later is not None and self._wake_later.when() <= when:
            return
        if self._wake_later is not None:
            self._wake_later.cancel()
        self._wake_later = loop.call_at(when, self._kick_due)

    def _kick_due(self) -> None:
        self._wake_later = None
        self.kick()

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

    def publish_status(self, wf: Workflow | WorkflowState) -> None:
        if wf.status == WorkflowStatus.FAILED:
            self.hub.publish(wf.id, "cause", cause_event(wf))
        self.hub.publish(wf.id, "status", status_event(wf))
        self.changed()

    # -- dispatch ------------------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self.dispatch_waiting()
            except Exception:  # a loop boundary: log and keep dispatching
                log.exception("dispatch round failed")

    def enqueue(self, wf: Workflow, need: Needs | None = None, *, announce: bool = True) -> None:
        """``wf`` (loaded with its graph, unless ``need`` is given) waits for a runner now;
        other control planes on the database hear of it unless ``announce`` is false."""
        if waits(wf):
            self.waiting.add(Waiting.of(wf, need))
            if announce and self.replicas is not None:
                self.replicas.announce_waiting(wf.id)
        else:
            self.waiting.discard(wf.id)
        self.kick()

    def heard_waiting(self, workflow_id: str) -> None:
        """Another control plane (or this one) announced a waiting workflow."""
        if workflow_id not in self.waiting:
            self._spawn(self._take_in(workflow_id))

    async def _take_in(self, workflow_id: str) -> None:
        wf = await self.store.waiting_workflow(workflow_id)
        if wf is not None and workflow_id not in self.waiting:
            self.enqueue(wf, announce=False)

    async def sweep_waiting(self) -> None:
        """Take in every workflow the database has waiting that the index lacks."""
        for workflow_id in await self.store.waiting_ids():
            if workflow_id not in self.waiting:
                await self._take_in(workflow_id)

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(WAITING_SWEEP_S)  # a periodic safety net, not a wait for an event
            try:
                await self.sweep_waiting()
            except Exception:  # a loop boundary: the next sweep tries again
                log.exception("sweeping for waiting workflows failed")

    async def _load_waiting(self) -> None:
        for wf in await self.store.waiting_workflows():
            self.waiting.add(Waiting.of(wf))

    async def dispatch_waiting(self) -> None:
        """Hand the waiting workflows, highest priority then oldest first, to free runners. A
        round costs nothing while every runner is busy, and looks no further once they all
        are; the database is asked only to claim what was chosen."""
        now = utcnow()
        backoff_ends: list[float] = []
        free = self.registry.free_by_class()  # live: empties as runners fill up
        # Only the queues some free runner could serve (its account, tags it accepts) are
        # walked: ten thousand workflows waiting for other runners cost nothing here.
        live = [
            keys
            for head, keys in (self.waiting.queues() if free else ())
            if any(k.account_id == head.account_id and k.accepts(head.tags) for k in free)
        ]
        # (account, tags, needs) of plain workflows no free runner can take this round.
        nowhere: set[tuple[str, str, Needs]] = set()
        for entry in self.waiting.in_turn(live):
            if entry.not_before is not None and entry.not_before > now:
                backoff_ends.append((entry.not_before - now).total_seconds())
                continue
            kind = (entry.account_id, entry.tag_index, entry.need)
            if entry.plain and kind in nowhere:
                continue
            conn = self._pick_runner(entry, now)
            if conn is None:
                if entry.plain:
                    nowhere.add(kind)
                continue
            await self._send_job(entry, conn)
            if not free:
                break
        if backoff_ends:
            self._kick_in(min(backoff_ends))

    async def _send_job(self, entry: Waiting, conn: AgentConnection) -> None:
        self.waiting.discard(entry.id)
        claimed = await self.store.claim_workflow(entry.id, entry.attempt, conn.runner_id, entry.timeout_s)
        if claimed is None:
            return  # it moved on (cancelled, expired, rerun): the index forgets it
        try:
            frame = dump_message(build_job(entry.id, entry.attempt, *claimed))
        except Exception as exc:  # a boundary: this workflow only, whatever broke
            log.warning("workflow %s: its job cannot be built: %s", entry.id, exc)
            await self._fail_claimed(entry, conn.runner_id, f"its job cannot be built for a runner: {exc}")
            return
        conn.took(entry.id, entry.need.model_files)
        if await conn.send_frame(frame):
            if self.metrics is not None:
                waited_s = (utcnow() - entry.updated_at).total_seconds()
                self.metrics.dispatch_latency.labels(entry.account_id).observe(waited_s)
            log.info("workflow %s attempt %d -> runner %s", entry.id, entry.attempt, conn.runner_id)
        else:
            conn.unsent(entry.id)
            await self.store.unclaim_workflow(entry.id, entry.attempt, conn.runner_id, entry.queue_timeout_s)
            self.waiting.add(entry)

    async def _fail_claimed(self, entry: Waiting, runner_id: str, message: str) -> None:
        """Fail a workflow just claimed whose job cannot be built: no runner ever had it."""
        failed = await self.store.update_current(
            entry.id,
            entry.attempt,
            runner_id,
            {
                "runner_id": None,
                "dispatched_at": None,
                "status": WorkflowStatus.FAILED,
                "completed_at": utcnow(),
                "failure_reason": "workflow",
                "exception_type": "UnsendableJob",
                "exception_message": message,
            },
        )
        if failed is not None:
            self.publish_status(failed)

    def _eligible(self, account_id: str, tags: Collection[str], need: Needs) -> list[AgentConnection]:
        return [
            c
            for c in self.registry.all()
            if c.account_id == account_id and c.accepts(tags) and can_run(need, c.offers)
        ]

    def _worth_waiting(self, entry: Waiting, now: datetime) -> bool:
        """A rerun's preferred runner (or one with the GPU memory it needs) is busy: wait for
        it a while, but not for ever."""
        left_s = self.settings.rerun_affinity_wait_s - (now - entry.updated_at).total_seconds()
        if left_s <= 0:
            return False
        asyncio.get_running_loop().call_later(left_s, self.kick)
        return True

    def _pick_runner(self, wf: Waiting, now: datetime) -> AgentConnection | None:
        """In order: the runner a rerun from a task names; runners whose ComfyUI has every
        node class and model; after an out-of-memory failure, those with more free GPU memory;
        with a free slot; not where an earlier attempt met a fault; warm with the same models;
        the least loaded. Ties go to the longest connected: never random."""
        if wf.plain:
            return self._pick_free(wf)
        need = wf.need
        eligible = self._eligible(wf.account_id, wf.tags, need)
        preferred = next((c for c in eligible if c.runner_id == wf.preferred_runner_id), None)
        if preferred is not None:
            if preferred.free_slots > 0:
                return preferred
            # Its ComfyUI cache holds the upstream nodes: worth waiting a while for a slot,
            # but not for a runner whose ComfyUI is down (its cache is gone).
            if preferred.healthy and self._worth_waiting(wf, now):
                return None
        if wf.min_gpu_free_bytes is not None:
            roomy = [c for c in eligible if c.gpu_free_bytes >= wf.min_gpu_free_bytes]
            if roomy and not any(c.free_slots > 0 for c in roomy) and self._worth_waiting(wf, now):
                return None
            eligible = roomy or eligible
        free = [c for c in eligible if c.free_slots > 0]
        avoid = wf.avoid_runner_ids
        rank = _ranking(wf.need.model_files)
        return min(free, key=lambda c: (c.runner_id in avoid, rank(c)), default=None)

    def _pick_free(self, wf: Waiting) -> AgentConnection | None:
        """:meth:`_pick_runner` for a workflow that asks for no runner in particular: only
        free runners count, and which may take it is decided once per class of runners."""
        wanted = wf.need.model_files
        picks = [
            members.best(wanted)
            for klass, members in self.registry.free_by_class().items()
            if klass.account_id == wf.account_id and klass.accepts(wf.tags) and can_run(wf.need, klass.offers)
        ]
        return min((c for c in picks if c is not None), key=_ranking(wanted), default=None)

    # -- what runners report -------------------------------------------------------------

    async def runner_connected(self, conn: AgentConnection, held: list[HeldJob]) -> list[HeldJob]:
        """Reconcile what a (re)connecting runner holds with what we think it holds.
        Returns the held jobs it must drop (finished ones included: their result is
        applied already, or no longer wanted)."""
        handle = self._grace.pop(conn.runner_id, None)
        if handle is not None:
            handle.cancel()
        ours = await self.store.held_by(conn.runner_id)
        held_current = {h.workflow_id for h in held if ours.get(h.workflow_id) == h.attempt}
        drop = [h for h in held if h.workflow_id not in held_current]
        for workflow_id, attempt in ours.items():
            if workflow_id in held_current:
                conn.holds(workflow_id)
            else:
                # We gave it this job but the runner no longer has it: run it again.
                await self._requeue(workflow_id, attempt, conn.runner_id, f"runner {conn.name} lost the job")
        return drop

    async def runner_ready(self, conn: AgentConnection, free_slots: int) -> None:
        # The agent counts what it holds; jobs sent but not yet arrived it cannot count.
        conn.ready(free_slots)
        self.kick()

    async def runner_disconnected(self, conn: AgentConnection, *, left: bool = False) -> None:
        """A runner that left on purpose is offline now, and its jobs go elsewhere; one that
        dropped gets its grace period to come back (and keep its jobs) before it is."""
        self.changed()
        await self.node_reports.flush_runner(conn.runner_id)
        if not left:
            self._start_grace(conn.runner_id)
            return
        requeued = []
        if conn.jobs:
            for workflow_id, attempt in (await self.store.held_by(conn.runner_id)).items():
                await self._requeue(
                    workflow_id, attempt, conn.runner_id, f"runner {conn.name} left before running it"
                )
                requeued.append(workflow_id)
        if self.on_runner_offline is not None:
            await self.on_runner_offline(conn.runner_id, requeued)

    async def runner_deleted(self, runner_id: str) -> None:
        """A deleted runner will not come back: its work goes elsewhere now, not after grace."""
        handle = self._grace.pop(runner_id, None)
        if handle is not None:
            handle.cancel()
        for workflow_id, attempt in (await self.store.held_by(runner_id)).items():
            await self._requeue(workflow_id, attempt, runner_id, "its runner was deleted")

    def _start_grace(self, runner_id: str) -> None:
        # Shutting down, the runners are sent away on purpose: whoever serves next gives them
        # (and their jobs) a grace period when it starts.
        if runner_id in self._grace or self.stopping:
            return
        loop = asyncio.get_running_loop()
        self._grace[runner_id] = loop.call_later(
            self.settings.runner_grace_s, lambda: self._spawn(self._grace_expired(runner_id))
        )

    def keep_grace(self, runner_id: str) -> None:
        """The runner's grace period, taken over from a control plane that died with it."""
        if self.registry.get(runner_id) is None:
            self._start_grace(runner_id)

    async def _grace_expired(self, runner_id: str) -> None:
        self._grace.pop(runner_id, None)
        if self.registry.get(runner_id) is not None:
            return
        if self.replicas is not None and await self.replicas.holder(runner_id) is not None:
            return  # it came back to another control plane on the database
        reason = f"runner {runner_id} did not come back within {self.settings.runner_grace_s:g} s"
        requeued = []
        for workflow_id, attempt in (await self.store.held_by(runner_id)).items():
            if self.registry.get(runner_id) is not None:
                return  # it came back while we were at it: its hello reconciles the rest
            await self._requeue(workflow_id, attempt, runner_id, reason)
            requeued.append(workflow_id)
        if self.on_runner_offline is not None:
            await self.on_runner_offline(runner_id, requeued)

    def _fault(self, kind: str, reason: str, **extra: Any) -> Fault:
        return Fault(
            kind=kind,
            reason=reason,
            max_attempts=self.settings.max_attempts,
            backoff_s=self.settings.retry_backoff_s,
            **extra,
        )

    async def _requeue(self, workflow_id: str, attempt: int, runner_id: str, reason: str) -> None:
        await self._retry(workflow_id, attempt, runner_id, self._fault("infrastructure", reason))

    async def _retry(self, workflow_id: str, attempt: int, runner_id: str | None, fault: Fault) -> bool:
        await self.node_reports.flush(workflow_id)
        updated = await self.store.retry(workflow_id, attempt, runner_id, fault)
        if updated is None:
            return False
        if updated.status == WorkflowStatus.FAILED:
            log.warning("workflow %s failed after attempt %d: %s", workflow_id, attempt, fault.reason)
        else:
            log.warning(
                "workflow %s attempt %d runs again (%s): %s", workflow_id, attempt, fault.kind, fault.reason
            )
        self.publish_status(updated)
        self.enqueue(updated)
        return True

    async def job_update(self, conn: AgentConnection, msg: JobUpdate) -> None:
        if self._held_back(conn, msg):
            return
        status = WorkflowStatus(msg.status) if msg.status is not None else None
        error = msg.error
        if status == WorkflowStatus.FAILED and error is not None and error.kind != "workflow":
            fault = await self._fault_of(conn, msg.workflow_id, error)
            if fault is not None:
                await self._attempt_faulted(conn, msg, fault)
                return
            # Out of memory with nowhere roomier to go: the workflow's own failure after all.
        changes = self._changes_of(msg, status)
        node_events: list[NodeEvent] = (
            [(msg.node.node_id, msg.node.class_type, msg.node.event)] if msg.node else []
        )
        async with self.node_reports.carried(msg.workflow_id, msg.attempt, conn.runner_id) as held:
            if held is not None:
                node_events = [*held.events, *node_events]
                if held.progress is not None:
                    changes.setdefault("progress", held.progress)
            wf = await self.store.update_current(
                msg.workflow_id,
                msg.attempt,
                conn.runner_id,
                changes,
                resolved_params=msg.resolved_params,
                node_events=node_events,
                failed_node=(error.node_id, error.message, error.kind) if error and error.node_id else None,
            )
        if wf is None:
            log.info("workflow %s: dropped stale update for attempt %d", msg.workflow_id, msg.attempt)
            await self._stale(conn, msg.workflow_id, msg.attempt, final=status in TERMINAL)
            return
        self.node_reports.written(wf.id, wf.attempt, conn.runner_id, finished=wf.status in TERMINAL)
        self._announce(msg, wf, changes)
        if status == WorkflowStatus.UPLOADED:
            # The go-ahead, once ``uploaded`` is on record: a workflow cancelled before that
            # point was stale above and got ``cancel`` instead, so its prompt never runs.
            await conn.send(Proceed(workflow_id=wf.id, attempt=wf.attempt))
        if wf.status in TERMINAL:
            conn.let_go(wf.id)
            await conn.send(JobAck(workflow_id=wf.id, attempt=wf.attempt))

    def _held_back(self, conn: AgentConnection, msg: JobUpdate) -> bool:
        """A node or progress report of a job whose last write went through: subscribers
        hear it now, the store with the job's next write (node_reports.py)."""
        node = msg.node
        if node is None or msg.status is not None or msg.error is not None or msg.resolved_params is not None:
            return False
        if msg.prompt_id is not None or msg.queue_number is not None:
            return False
        event = (node.node_id, node.class_type, node.event)
        if not self.node_reports.hold(msg.workflow_id, msg.attempt, conn.runner_id, event, msg.progress):
            return False
        self._publish_node(msg.workflow_id, node, msg.progress)
        return True

    def _publish_node(self, workflow_id: str, node: NodeReport, progress: float | None) -> None:
        self.hub.publish(workflow_id, "node", {**node.model_dump(), "progress": progress})
        self.changed()

    async def _write_held(self, workflow_id: str, held: Held) -> None:
        changes = {} if held.progress is None else {"progress": held.progress}
        try:
            await self.store.update_current(
                workflow_id, held.attempt, held.runner_id, changes, node_events=held.events
            )
        except Exception:  # a loop boundary (a timer's write): the next report tries again
            log.exception("workflow %s: writing its node reports failed", workflow_id)

    def _changes_of(self, msg: JobUpdate, status: WorkflowStatus | None) -> dict[str, Any]:
        """The workflow's columns a report changes (``completed`` comes with ``job_done``)."""
        changes: dict[str, Any] = {
            key: value
            for key, value in (
                ("prompt_id", msg.prompt_id),
                ("queue_number", msg.queue_number),
                ("progress", msg.progress),
            )
            if value is not None
        }
        if status is not None and status != WorkflowStatus.COMPLETED:
            changes["status"] = status
            if status == WorkflowStatus.RUNNING:
                changes["started_at"] = utcnow()
            if status in TERMINAL:
                changes["completed_at"] = utcnow()
            if status in (WorkflowStatus.FAILED, WorkflowStatus.INVALID):
                changes["failure_reason"] = "workflow"
        if msg.error is not None:
            changes.update(
                error_node=msg.error.node_id,
                exception_type=msg.error.exception_type,
                exception_message=msg.error.message,
                node_errors=msg.error.node_errors,
            )
        return changes

    def _announce(self, msg: JobUpdate, wf: WorkflowState, changes: dict[str, Any]) -> None:
        """Tell the workflow's subscribers what the applied report changed."""
        if msg.node is not None:
            self._publish_node(msg.workflow_id, msg.node, msg.progress)
        if msg.error is not None and wf.status != WorkflowStatus.FAILED:
            self.hub.publish(wf.id, "cause", cause_event(wf))
        if "status" in changes or "queue_number" in changes:
            self.publish_status(wf)

    async def _fault_of(self, conn: AgentConnection, workflow_id: str, error: JobError) -> Fault | None:
        """The retry an attempt ended by the fleet's fault gets; for a node out of GPU memory,
        one more try on a runner with more free GPU memory, if the fleet has one and the
        workflow has not had that try already (``None`` otherwise)."""
        where = f"on runner {conn.name}: {error.message}"
        if error.kind != "out_of_memory":
            return self._fault("infrastructure", where, exception_type=error.exception_type)
        try:
            wf = await self.store.get_workflow(conn.account_id, workflow_id)
        except NotFound:
            return None  # not this runner's: the fenced update below drops it
        if any(entry.get("kind") == "out_of_memory" for entry in wf.attempt_log):
            return None
        had = conn.gpu_free_bytes
        need = needs(wf.workflow_json, WorkflowParams.of(wf.workflow_params).values)
        if not any(
            c.gpu_free_bytes > had for c in self._eligible(wf.account_id, wf.tags, need) if c is not conn
        ):
            return None
        return self._fault(
            "out_of_memory",
            f"out of GPU memory {where}; retried on a runner with more than {had} bytes free",
            exception_type=error.exception_type,
            node_id=error.node_id,
            min_gpu_free_bytes=had + 1,
        )

    async def _attempt_faulted(self, conn: AgentConnection, msg: JobUpdate, fault: Fault) -> None:
        if not await self._retry(msg.workflow_id, msg.attempt, conn.runner_id, fault):
            log.info("workflow %s: dropped stale failure of attempt %d", msg.workflow_id, msg.attempt)
        conn.let_go(msg.workflow_id)
        await conn.send(JobAck(workflow_id=msg.workflow_id, attempt=msg.attempt))

    async def job_done(self, conn: AgentConnection, msg: JobDone) -> None:
        now = utcnow()
        texts, new_blobs = await self._text_outputs(conn, msg)
        async with self.node_reports.carried(msg.workflow_id, msg.attempt, conn.runner_id) as held:
            wf = await self.store.update_current(
                msg.workflow_id,
                msg.attempt,
                conn.runner_id,
                {
                    "status": WorkflowStatus.COMPLETED,
                    "completed_at": now,
                    "progress": 1.0,
                    "queue_number": None,
                },
                outputs=texts,
                node_events=held.events if held is not None else (),
            )
        self.node_reports.written(msg.workflow_id, msg.attempt, conn.runner_id, finished=True)
        if wf is None:
            log.info("workflow %s: dropped stale completion of attempt %d", msg.workflow_id, msg.attempt)
            for sha256 in new_blobs:
                if not await self.store.blob_referenced(sha256):
                    await self.blobs.delete(sha256)
            await self._stale(conn, msg.workflow_id, msg.attempt, final=True)
            return
        for out in texts:
            self.hub.publish(wf.id, "output", output_event(out))
        log.info("workflow %s completed on runner %s (%d outputs)", wf.id, conn.runner_id, len(msg.outputs))
        if self.metrics is not None and wf.started_at is not None:
            self.metrics.execution_duration.labels(wf.account_id).observe(
                (now - as_utc(wf.started_at)).total_seconds()
            )
        self.publish_status(wf)
        conn.let_go(wf.id)
        await conn.send(JobAck(workflow_id=wf.id, attempt=wf.attempt))

    async def _text_outputs(self, conn: AgentConnection, msg: JobDone) -> tuple[list[Output], list[str]]:
        """A node's text outputs are outputs like its files: each text a ``text/plain`` blob and
        an Output row of kind ``text``, recorded with the completion. Also the blobs that are
        new, to remove if the completion turns out stale."""
        outputs: list[Output] = []
        new_blobs: list[str] = []
        for node_id, texts in msg.texts.items():
            for n, text in enumerate(texts):
                stored = await self.blobs.put(text.encode(), max_bytes=MAX_TEXT_OUTPUT_BYTES)
                if stored.created:
                    new_blobs.append(stored.sha256)
                outputs.append(
                    Output(
                        workflow_id=msg.workflow_id,
                        account_id=conn.account_id,
                        attempt=msg.attempt,
                        node_id=node_id,
                        filename=f"{node_id}_{n}.txt",
                        kind="text",
                        content_type="text/plain; charset=utf-8",
                        size_bytes=stored.size_bytes,
                        sha256=stored.sha256,
                    )
                )
        return outputs, new_blobs

    async def _stale(self, conn: AgentConnection, workflow_id: str, attempt: int, *, final: bool) -> None:
        """A runner reports on work that is no longer its own (cancelled, requeued, rerun,
        or already applied): forget it on that runner. A last report is acknowledged, so the
        agent lets it go; a job still running is told to stop spending its GPU on it. An id
        that does not exist and another account's get the same answer: nothing to learn."""
        try:
            current: Workflow | None = await self.store.get_workflow(conn.account_id, workflow_id)
        except NotFound:
            current = None
        if not runs_on(current, conn.runner_id):
            conn.let_go(workflow_id)
        if final:
            await conn.send(JobAck(workflow_id=workflow_id, attempt=attempt))
        elif not holds_current(current, attempt, conn.runner_id):
            await conn.send(Cancel(workflow_id=workflow_id, attempt=attempt))

    # -- deadlines -----------------------------------------------------------------------

    async def _deadline_loop(self) -> None:
        while True:
            # A periodic sweep, not a wait for an event: deadlines pass on their own.
            await asyncio.sleep(self.settings.deadline_sweep_s)
            try:
                await self.expire_deadlines()
            except Exception:  # a loop boundary: log and keep sweeping
                log.exception("deadline sweep failed")

    async def expire_deadlines(self) -> None:
        now = utcnow()
        for workflow_id in await self.store.expired(now):
            await self.node_reports.flush(workflow_id)
            expired = await self.store.expire(workflow_id, now)
            if expired is None:
                continue
            wf, held_by = expired
            self.waiting.discard(wf.id)
            log.warning("workflow %s failed: %s", wf.id, wf.exception_message)
            if held_by is not None:
                await self._tell_runner_to_stop(held_by, wf.id, wf.attempt)
            self.publish_status(wf)

    async def _tell_runner_to_stop(self, runner_id: str, workflow_id: str, attempt: int) -> None:
        conn = self.registry.get(runner_id)
        if conn is not None:
            conn.let_go(workflow_id)
            await conn.send(Cancel(workflow_id=workflow_id, attempt=attempt))
        elif self.replicas is not None:
            self.replicas.stop_job(runner_id, workflow_id, attempt)

    async def close_deleted(self, conn: AgentConnection) -> None:
        """The runner was deleted: its agent is told so and let go."""
        await conn.ws.close(code=Close.RUNNER_DELETED, message=b"runner deleted")

    # -- what clients ask ----------------------------------------------------------------

    async def cancel(self, wf: Workflow) -> Workflow | None:
        """Cancel a workflow that has not finished; ``None`` if it already had."""
        await self.node_reports.flush(wf.id)
        cancelled = await self.store.cancel_workflow(wf.id)
        if cancelled is None:
            return None
        # The fresh row says who holds it now: the dispatcher may have sent it meanwhile.
        if cancelled.runner_id is not None:
            await self._tell_runner_to_stop(cancelled.runner_id, wf.id, cancelled.attempt)
        self.waiting.discard(wf.id)
        log.info("workflow %s cancelled (was %s)", wf.id, wf.status)
        self.publish_status(cancelled)
        return cancelled

    async def start_new_attempt(
        self,
        wf: Workflow,
        changes: dict[str, Any],
        receipt: IdempotencyRecord | None = None,
    ) -> Workflow | None:
        """The Conductor-compatible rerun: the next attempt of ``wf``. An ongoing attempt is
        interrupted on its runner; the new one waits for a runner like any other (the
        preferred one, if set)."""
        await self.node_reports.flush(wf.id)
        updated = await self.store.new_attempt(wf.id, wf.attempt, changes, receipt)
        if updated is None:
            return None
        if wf.runner_id is not None and wf.status not in TERMINAL:
            await self._tell_runner_to_stop(wf.runner_id, wf.id, wf.attempt)
        log.info("workflow %s: attempt %d replaces attempt %d", wf.id, updated.attempt, wf.attempt)
        self.hub.publish(wf.id, "status", status_event(updated))
        self.enqueue(updated)
        return updated
