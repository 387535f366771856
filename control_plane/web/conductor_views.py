"""A workflow and its tasks as Conductor's clients read them (Conductor's ``Workflow`` and
``Task``): camelCase fields, times in epoch milliseconds (0 when not yet), Conductor's status
values. Each node's work is listed once per time it ran: a later attempt that ComfyUI served
from its cache lists nothing new, and the task that did the work says it was reused.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from typing import Any

from control_plane.db.tables import Output, Task, Workflow, as_utc
from control_plane.fleet.events import output_event
from control_plane.model import lifecycle
from control_plane.model.lifecycle import TaskStatus, WorkflowStatus

_NEVER = 2**63


def conductor_status(wf: Workflow) -> str:
    return lifecycle.conductor_status(wf.status, wf.failure_reason).value


def epoch_ms(at: datetime | None) -> int:
    return 0 if at is None else int(as_utc(at).timestamp() * 1000)


def conductor_workflow(wf: Workflow, outputs: list[Output], tasks: list[Task] | None) -> dict[str, Any]:
    """``tasks``: every attempt's (``None``: the caller asked for none)."""
    listed = conductor_tasks(wf, tasks, outputs) if tasks is not None else []
    return {
        "workflowId": wf.id,
        "workflowName": wf.name,
        "workflowVersion": 1,
        "status": conductor_status(wf),
        "createTime": epoch_ms(wf.created_at),
        "updateTime": epoch_ms(wf.updated_at),
        "startTime": epoch_ms(wf.started_at),
        "endTime": epoch_ms(wf.completed_at),
        "correlationId": wf.correlation_id,
        "input": workflow_input(wf),
        "output": {"outputs": [output_event(o) for o in outputs if o.attempt == wf.attempt]},
        "reasonForIncompletion": _reason(wf),
        "failedReferenceTaskNames": [wf.error_node] if wf.error_node else [],
        "priority": wf.priority,
        "tasks": listed,
    }


def workflow_input(wf: Workflow) -> dict[str, Any]:
    """The parameters it ran with: values by name, files by name as what was uploaded."""
    params = wf.workflow_params
    files = {
        name: {"filename": f.get("filename"), "sha256": f.get("sha256"), "size": f.get("size_bytes")}
        for name, f in (params.get("files") or {}).items()
    }
    return dict(params.get("values") or {}) | files


def _reason(wf: Workflow) -> str | None:
    if wf.status == WorkflowStatus.CANCELLED:
        return "terminated"
    if wf.status not in (WorkflowStatus.FAILED, WorkflowStatus.INVALID):
        return None
    if wf.exception_message:
        where = f"node {wf.error_node}: " if wf.error_node else ""
        return where + wf.exception_message
    return wf.failure_reason or wf.status


def conductor_tasks(wf: Workflow, tasks: list[Task], outputs: list[Output]) -> list[dict[str, Any]]:
    """Oldest first, as Conductor lists them: each attempt's tasks in the order they ran."""
    by_node_attempt: dict[tuple[str, int], list[Output]] = defaultdict(list)
    for out in outputs:
        by_node_attempt[(out.node_id, out.attempt)].append(out)
    # Within an attempt, in the order they started; one that never started, last.
    ordered = sorted(tasks, key=lambda t: (t.attempt, _began(t), t.node_id))
    listed: list[dict[str, Any]] = []
    last_of_node: dict[str, dict[str, Any]] = {}
    for task in ordered:
        earlier = last_of_node.get(task.node_id)
        if task.cached and earlier is not None and earlier["status"] == TaskStatus.COMPLETED:
            earlier["reusedFromCache"] = True  # this attempt used what that task made
            continue
        if earlier is not None:
            earlier["retried"] = True
        view = _task(wf, task, by_node_attempt[(task.node_id, task.attempt)])
        view["seq"] = len(listed) + 1
        view["retryCount"] = 0 if earlier is None else earlier["retryCount"] + 1
        listed.append(view)
        last_of_node[task.node_id] = view
    return listed


def _began(task: Task) -> int:
    return epoch_ms(task.started_at or task.ended_at) or _NEVER


def _task(wf: Workflow, task: Task, outputs: list[Output]) -> dict[str, Any]:
    node = wf.workflow_json.get(task.node_id)
    inputs = node.get("inputs") if isinstance(node, dict) else None
    return {
        "taskId": task.task_id,
        "referenceTaskName": task.node_id,
        "taskType": task.class_type or "UNKNOWN",
        "taskDefName": task.class_type or "UNKNOWN",
        "status": task.status,
        "workflowInstanceId": wf.id,
        "workflowType": wf.name,
        "correlationId": wf.correlation_id,
        "startTime": epoch_ms(task.started_at),
        "endTime": epoch_ms(task.ended_at),
        "updateTime": epoch_ms(task.ended_at or task.started_at),
        "inputData": inputs if isinstance(inputs, dict) else {},
        "outputData": {"outputs": [output_event(o) for o in outputs]} if outputs else {},
        "reasonForIncompletion": task.reason,
        "retried": False,
        "executed": task.status == TaskStatus.COMPLETED and not task.cached,
        "reusedFromCache": False,
    }
