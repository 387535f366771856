"""A workflow's lifecycle: its states and the order it moves through them, which states are
final, what its tasks become when it ends, the one reset for a new attempt and the one fence
that keeps a stale report out. Every other module names states through this one.

    accepted -> uploaded -> queued -> running -> completed
        \\___________\\__________\\_________\\__> failed | cancelled | invalid

A new attempt (a retry, a runner lost, a Conductor-compatible rerun) goes back to
``accepted`` with ``attempt + 1``; reports about any other attempt are dropped.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from enum import StrEnum
from typing import Literal, Protocol


class WorkflowStatus(StrEnum):
    ACCEPTED = "accepted"  # stored; waiting for a runner
    UPLOADED = "uploaded"  # its runner has the inputs
    QUEUED = "queued"  # in its ComfyUI's queue
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INVALID = "invalid"  # ComfyUI refused the prompt


class DeliveryStatus(StrEnum):
    """A webhook delivery: sent until answered with a 2xx, or given up on."""

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


class TaskStatus(StrEnum):
    """A node's task, in Conductor's words."""

    SCHEDULED = "SCHEDULED"
    IN_PROGRESS = "IN_PROGRESS"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELED = "CANCELED"


class ConductorStatus(StrEnum):
    """A workflow's status as Conductor's clients know it (``web/conductor.py``)."""

    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    TIMED_OUT = "TIMED_OUT"
    TERMINATED = "TERMINATED"


# Failure reasons (``Workflow.failure_reason``) that Conductor calls a timeout.
_TIMEOUTS = frozenset({"timeout", "queue_timeout"})


def conductor_status(status: str, failure_reason: str | None) -> ConductorStatus:
    if status == WorkflowStatus.COMPLETED:
        return ConductorStatus.COMPLETED
    if status == WorkflowStatus.CANCELLED:
        return ConductorStatus.TERMINATED
    if status in (WorkflowStatus.FAILED, WorkflowStatus.INVALID):
        return ConductorStatus.TIMED_OUT if failure_reason in _TIMEOUTS else ConductorStatus.FAILED
    return ConductorStatus.RUNNING  # accepted, uploaded, queued, running: all under way


# What Conductor retries: a workflow that ended without its result.
RETRIED: frozenset[str] = frozenset(
    {ConductorStatus.FAILED, ConductorStatus.TIMED_OUT, ConductorStatus.TERMINATED}
)


TERMINAL: frozenset[str] = frozenset(
    {WorkflowStatus.COMPLETED, WorkflowStatus.FAILED, WorkflowStatus.CANCELLED, WorkflowStatus.INVALID}
)
OPEN_TASK: frozenset[str] = frozenset({TaskStatus.SCHEDULED, TaskStatus.IN_PROGRESS})
# The order an attempt moves through; a report never moves a workflow back (a report said
# again after a reconnect can arrive after a later one).
_PROGRESS = {
    WorkflowStatus.ACCEPTED: 0,
    WorkflowStatus.UPLOADED: 1,
    WorkflowStatus.QUEUED: 2,
    WorkflowStatus.RUNNING: 3,
}
# What a task still open becomes when its workflow ends this way.
_TASK_END = {
    WorkflowStatus.COMPLETED: TaskStatus.COMPLETED,
    WorkflowStatus.FAILED: TaskStatus.FAILED,
    WorkflowStatus.INVALID: TaskStatus.FAILED,
    WorkflowStatus.CANCELLED: TaskStatus.CANCELED,
}

# Whose failure ended a workflow.
FailureReason = Literal["workflow", "infrastructure", "timeout", "queue_timeout"]
FAILURE_REASONS: tuple[FailureReason, ...] = ("workflow", "infrastructure", "timeout", "queue_timeout")


def is_terminal(status: str) -> bool:
    return status in TERMINAL


def moves_back(current: str, reported: str) -> bool:
    """A report of an earlier state than the workflow is in (it is ignored)."""
    if reported not in _PROGRESS:
        return False
    return _PROGRESS[WorkflowStatus(reported)] < _PROGRESS.get(WorkflowStatus(current), len(_PROGRESS))


def task_end(status: str) -> TaskStatus:
    """What the open tasks of a workflow that ended with ``status`` become."""
    return _TASK_END[WorkflowStatus(status)]


class Held(Protocol):
    """What the fence reads of a workflow."""

    status: str
    attempt: int
    runner_id: str | None


class Attempted(Held, Protocol):
    """What the lifecycle reads and writes of a workflow (the table row)."""

    dispatched_at: datetime | None
    prompt_id: str | None
    queue_number: int | None
    progress: float | None
    not_before: datetime | None
    deadline_at: datetime | None
    queue_timeout_s: int


def runs_on(wf: Held | None, runner_id: str | None) -> bool:
    """The workflow is unfinished and held by that runner (whatever its attempt)."""
    return wf is not None and wf.runner_id == runner_id and not is_terminal(wf.status)


def holds_current(wf: Held | None, attempt: int, runner_id: str | None) -> bool:
    """The fence: a report is about the attempt the workflow is on, from the runner that holds
    it, and the workflow has not finished."""
    return runs_on(wf, runner_id) and wf is not None and wf.attempt == attempt


def start_next_attempt(wf: Attempted, now: datetime) -> None:
    """The one reset for a new attempt: waiting for a runner again, nothing of the last
    attempt's run left on the workflow, and a fresh queue deadline."""
    wf.attempt += 1
    wf.status = WorkflowStatus.ACCEPTED
    wf.runner_id = None
    wf.dispatched_at = None
    wf.prompt_id = wf.queue_number = wf.progress = None
    wf.not_before = None
    wf.deadline_at = now + timedelta(seconds=wf.queue_timeout_s)
