"""REST representations of the tables: small named functions, one per shape."""

from __future__ import annotations

from typing import Any

from control_plane.db.tables import Runner, Task, Workflow, lease_live
from control_plane.fleet.events import iso


def workflow_summary(wf: Workflow) -> dict[str, Any]:
    """The fields of the rerun response with new parameters."""
    return {
        "id": wf.id,
        "name": wf.name,
        "status": wf.status,
        "tags": wf.tags,
        "created_at": iso(wf.created_at),
        "updated_at": iso(wf.updated_at),
        "started_at": iso(wf.started_at),
        "completed_at": iso(wf.completed_at),
    }


def workflow_view(
    wf: Workflow,
    *,
    queue_number: int | None = None,
    children: list[str] | None = None,
    tasks: list[Task] | None = None,
) -> dict[str, Any]:
    view = workflow_summary(wf)
    view.update(
        workflow_json=wf.workflow_json,
        workflow_params=wf.workflow_params,
        attempt=wf.attempt,
        prompt_id=wf.prompt_id,
        queue_number=queue_number if queue_number is not None else wf.queue_number,
        progress=wf.progress,
        runner_id=wf.runner_id,
        correlation_id=wf.correlation_id,
        parent_id=wf.parent_id,
        sweep_id=wf.sweep_id,
        webhook_url=wf.webhook_url,
        priority=wf.priority,
        error_node=wf.error_node,
        exception_type=wf.exception_type,
        exception_message=wf.exception_message,
        node_errors=wf.node_errors,
        failure_reason=wf.failure_reason,
        # Every attempt that ended without a result, and why.
        attempts=wf.attempt_log,
        timeout_s=wf.timeout_s,
        queue_timeout_s=wf.queue_timeout_s,
        files_removed_at=iso(wf.files_removed_at),
    )
    if children is not None:
        view["reruns"] = children
    if tasks is not None:
        view["tasks"] = [task_view(t) for t in tasks]
    return view


def task_view(task: Task) -> dict[str, Any]:
    return {
        "task_id": task.task_id,
        "workflow_id": task.workflow_id,
        "attempt": task.attempt,
        "node_id": task.node_id,
        "class_type": task.class_type,
        "status": task.status,
        "cached": task.cached,
        "started_at": iso(task.started_at),
        "ended_at": iso(task.ended_at),
        "reason": task.reason,
        "failure_kind": task.failure_kind,
    }


def runner_view(runner: Runner, live: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "id": runner.id,
        "name": runner.name,
        "tags": runner.tags,
        "status": runner.status,
        "created_at": iso(runner.created_at),
        "updated_at": iso(runner.updated_at),
        # Connected here, or to another control plane on the database (which holds its lease).
        "connected": live is not None or lease_live(runner.lease_expires_at),
        "last_seen": iso((live or {}).get("last_seen_at", runner.last_seen_at)),
        "capacity": (live or {}).get("capacity", runner.capacity),
        "comfyui": (live or {}).get("comfyui", runner.comfyui),
        # As its last hello said: during a rolling upgrade, which agents are still old.
        "agent_version": runner.agent_version,
        "protocol_version": runner.protocol_version,
        "current_jobs": (live or {}).get("jobs", []),
    }
