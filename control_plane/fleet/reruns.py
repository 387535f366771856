"""The Conductor-compatible rerun from a task: the same workflow runs again as its next
attempt, from a node (its upstream served from ComfyUI's cache) or from the start, with new
values and task inputs merged in. The rerun with new parameters, which makes a new workflow,
is :meth:`Submissions.rerun_with_parameters`."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from control_plane.db.tables import Account, Task, Workflow
from control_plane.fleet.graph import downstream
from control_plane.fleet.submissions import Receipt, Submissions
from control_plane.model.errors import BadRequest, Conflict
from control_plane.model.json_limits import check_depth
from control_plane.model.lifecycle import is_terminal
from control_plane.model.params import RerunFrom, WorkflowParams
from protocol.placeholders import ParameterError, PlaceholderError, declared_parameters, merge_values


@dataclass(frozen=True)
class TaskRerun:
    """What a ``POST /api/workflow/{id}/rerun`` body asks for."""

    from_workflow_id: str | None = None
    task_ref: str | None = None  # a task id of the latest attempt, or a node id
    task_input: dict[str, Any] = field(default_factory=dict)
    workflow_input: dict[str, Any] = field(default_factory=dict)
    correlation_id: str | None = None


async def rerun_from_task(
    subs: Submissions,
    account: Account,
    workflow_id: str,
    asked: TaskRerun,
    receipt: Receipt | None = None,
) -> Workflow:
    store = subs.store
    current = await store.get_workflow(account.id, workflow_id)
    if asked.from_workflow_id and asked.from_workflow_id not in await store.lineage_ids(current.id):
        raise BadRequest(
            f"reRunFromWorkflowId {asked.from_workflow_id!r} is not this workflow or one of its reruns"
        )
    if asked.task_input and not asked.task_ref:
        raise BadRequest("taskInput needs reRunFromTaskId: it is merged into that task's inputs")
    before = WorkflowParams.of(current.workflow_params)
    params = before.for_new_attempt()
    changes: dict[str, Any] = {}
    workflow_json = current.workflow_json
    if asked.task_ref:
        node_id = _find_task(await store.tasks(current.id, current.attempt), asked.task_ref, workflow_json)
        if asked.task_input:
            check_depth(asked.task_input, "taskInput")
            workflow_json = _merge_task_input(workflow_json, node_id, asked.task_input)
            changes["workflow_json"] = workflow_json
        params.rerun = _keeping_upstream(node_id, downstream(workflow_json, node_id), before)
        changes["preferred_runner_id"] = current.runner_id
    elif not is_terminal(current.status):
        raise Conflict(
            f"workflow {current.id} is {current.status}: a rerun from the start needs a finished "
            "workflow; name reRunFromTaskId to rerun an ongoing one"
        )
    else:
        changes["preferred_runner_id"] = None
    if asked.workflow_input:
        texts, choices = _split_workflow_input(asked.workflow_input, current)
        try:
            params.values = merge_values(declared_parameters(workflow_json), params.values, texts, choices)
        except (PlaceholderError, ParameterError) as exc:
            raise BadRequest(str(exc)) from exc
        # The same workflow runs again: the daily workflow count does not move.
        subs.check_parameter_count(account, len(texts) + len(choices))
    # New values and merged task inputs are checked as a submission's are.
    await subs.check_runner_available(account, current.tags, workflow_json, params.values)
    changes["workflow_params"] = params.stored()
    if asked.correlation_id:
        changes["correlation_id"] = asked.correlation_id
    record = receipt(current) if receipt is not None else None
    updated = await subs.fleet.start_new_attempt(current, changes, record)
    if updated is None:
        raise Conflict(f"workflow {current.id} changed while the rerun was prepared; try again")
    return updated


def _keeping_upstream(node_id: str, rerun_nodes: set[str], before: WorkflowParams) -> RerunFrom:
    """Upstream nodes keep their seeds and timestamp, so ComfyUI's cache serves them; the
    nodes that rerun draw new seeds (rerunning a sampler means a new sample)."""
    resolved = before.resolved
    if resolved is None:
        return RerunFrom(node_id=node_id)
    return RerunFrom(
        node_id=node_id,
        fixed_random={
            key: seed for key, seed in resolved.random.items() if key.rsplit(".", 1)[0] not in rerun_nodes
        },
        timestamp_ms=resolved.timestamp_ms,
    )


def _find_task(tasks: list[Task], wanted: str, workflow_json: dict[str, Any]) -> str:
    """The node a ``reRunFromTaskId`` names: a task id of the latest attempt, or a node id."""
    for task in tasks:
        if task.task_id == wanted:
            return task.node_id
    if wanted in workflow_json:
        return wanted
    raise BadRequest(f"task {wanted!r} not found in the latest attempt of this workflow")


def _split_workflow_input(
    workflow_input: dict[str, Any], wf: Workflow
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``workflowInput`` names parameters as ``$name``, ``#name`` or plain ``name``; the
    plain form goes to whichever kind the workflow declares."""
    try:
        parameters = declared_parameters(wf.workflow_json)
    except PlaceholderError as exc:
        raise BadRequest(str(exc)) from exc
    texts: dict[str, Any] = {}
    choices: dict[str, Any] = {}
    for key, value in workflow_input.items():
        if key.startswith("$"):
            texts[key[1:]] = value
        elif key.startswith("#"):
            choices[key[1:]] = value
        elif key in parameters and parameters[key].kind == "choice":
            choices[key] = value
        else:
            texts[key] = value
    return texts, choices


def _merge_task_input(
    workflow_json: dict[str, Any], node_id: str, task_input: dict[str, Any]
) -> dict[str, Any]:
    updated = copy.deepcopy(workflow_json)
    inputs = updated[node_id].setdefault("inputs", {})
    if not isinstance(inputs, dict):
        raise BadRequest(f"node {node_id} has no inputs object to merge taskInput into")
    inputs.update(task_input)
    return updated
