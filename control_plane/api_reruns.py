"""Reruns, both ways.

``POST /v1/workflow/{id}/rerun``, the rerun with new parameters: multipart, a new workflow.
``POST /api/workflow/{id}/rerun``, the Conductor-compatible rerun from a task: JSON, the same
workflow, a new attempt; answers the workflow id as text/plain. ``GET /api/workflow/{id}``:
the workflow with the tasks of every attempt, newest first.
"""

from __future__ import annotations

import copy
from typing import Any

from aiohttp import web

from control_plane import idempotency
from control_plane.api_workflows import created_receipt
from control_plane.errors import BadRequest, Conflict
from control_plane.graph import downstream
from control_plane.http_util import json_body
from control_plane.json_limits import check_depth
from control_plane.services import Services
from control_plane.store import TERMINAL
from control_plane.submissions import (
    check_parameter_count,
    check_runner_available,
    check_submit_rate,
    rerun_with_parameters,
)
from control_plane.tables import Task, Workflow
from control_plane.views import workflow_view
from protocol.placeholders import ParameterError, PlaceholderError, declared_parameters, merge_values

routes = web.RouteTableDef()

_BODY_FIELDS = {"reRunFromTaskId", "reRunFromWorkflowId", "correlationId", "taskInput", "workflowInput"}


@routes.post("/v1/workflow/{id}/rerun")
async def rerun_with_new_parameters(request: web.Request) -> web.Response:
    svc: Services = request.app[Services.KEY]
    principal = await svc.auth.client(request)
    check_submit_rate(svc, principal.account, principal.token_id)
    original = await svc.store.get_workflow(principal.account.id, request.match_info["id"])
    async with svc.read_form(request, principal.account) as form:

        async def produce(claim: idempotency.Claim | None) -> web.Response:
            wf = await rerun_with_parameters(svc, principal.account, original, form, created_receipt(claim))
            return web.json_response(workflow_view(wf), status=201)

        return await idempotency.once(request, principal.account.id, form.fingerprint(), produce)


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


@routes.post("/api/workflow/{id}/rerun")
async def rerun_from_task(request: web.Request) -> web.Response:
    svc: Services = request.app[Services.KEY]
    principal = await svc.auth.client(request)
    check_submit_rate(svc, principal.account, principal.token_id)
    body = await json_body(request)
    wf = await svc.store.get_workflow(principal.account.id, request.match_info["id"])
    unknown = set(body) - _BODY_FIELDS
    if unknown:
        raise BadRequest(
            f"unknown fields: {', '.join(sorted(unknown))}; expected {', '.join(sorted(_BODY_FIELDS))}"
        )
    for key in ("reRunFromTaskId", "reRunFromWorkflowId", "correlationId"):
        if body.get(key) is not None and not isinstance(body[key], str):
            raise BadRequest(f"{key} must be a string")
    for key in ("taskInput", "workflowInput"):
        if body.get(key) is not None and not isinstance(body[key], dict):
            raise BadRequest(f"{key} must be an object")

    async def produce(claim: idempotency.Claim | None) -> web.Response:
        current = await svc.store.get_workflow(principal.account.id, wf.id)
        from_workflow = body.get("reRunFromWorkflowId")
        if from_workflow and from_workflow not in await svc.store.lineage_ids(current.id):
            raise BadRequest(
                f"reRunFromWorkflowId {from_workflow!r} is not this workflow or one of its reruns"
            )
        task_ref = body.get("reRunFromTaskId")
        task_input = body.get("taskInput") or {}
        if task_input and not task_ref:
            raise BadRequest("taskInput needs reRunFromTaskId: it is merged into that task's inputs")
        changes: dict[str, Any] = {}
        workflow_json = current.workflow_json
        rerun_nodes: set[str] | None = None
        params = dict(current.workflow_params)
        params.pop("resolved", None)
        params.pop("texts", None)
        params.pop("rerun", None)
        if task_ref:
            node_id = _find_task(await svc.store.tasks(current.id, current.attempt), task_ref, workflow_json)
            if task_input:
                check_depth(task_input, "taskInput")
                workflow_json = _merge_task_input(workflow_json, node_id, task_input)
                changes["workflow_json"] = workflow_json
            rerun_nodes = downstream(workflow_json, node_id)
            resolved = current.workflow_params.get("resolved") or {}
            # Upstream nodes keep their seeds and timestamp, so ComfyUI's cache serves them;
            # the nodes that rerun draw new seeds (rerunning a sampler means a new sample).
            params["rerun"] = {
                "from": node_id,
                "fixed_random": {
                    key: seed
                    for key, seed in resolved.get("random", {}).items()
                    if key.rsplit(".", 1)[0] not in rerun_nodes
                },
                "timestamp_ms": resolved.get("timestamp_ms"),
            }
            changes["preferred_runner_id"] = current.runner_id
        elif current.status not in TERMINAL:
            raise Conflict(
                f"workflow {current.id} is {current.status}: a rerun from the start needs a finished "
                "workflow; name reRunFromTaskId to rerun an ongoing one"
            )
        else:
            changes["preferred_runner_id"] = None
        if body.get("workflowInput"):
            texts, choices = _split_workflow_input(body["workflowInput"], current)
            try:
                parameters = declared_parameters(workflow_json)
                params["values"] = merge_values(parameters, params.get("values", {}), texts, choices)
            except (PlaceholderError, ParameterError) as exc:
                raise BadRequest(str(exc)) from exc
            # The same workflow runs again: the daily workflow count does not move.
            check_parameter_count(svc, principal.account, len(texts) + len(choices))
        # New values and merged task inputs are checked as a submission's are.
        await check_runner_available(
            svc, principal.account, current.tags, workflow_json, params.get("values", {})
        )
        changes["workflow_params"] = params
        if body.get("correlationId"):
            changes["correlation_id"] = body["correlationId"]
        receipt = claim.receipt(200, current.id, "text/plain") if claim is not None else None
        updated = await svc.fleet.start_new_attempt(current, changes, rerun_nodes, receipt)
        if updated is None:
            raise Conflict(f"workflow {current.id} changed while the rerun was prepared; try again")
        return web.Response(text=updated.id, content_type="text/plain")

    return await idempotency.once(
        request, principal.account.id, idempotency.fingerprint(request.path, body), produce
    )


@routes.get("/api/workflow/{id}")
async def workflow_with_tasks(request: web.Request) -> web.Response:
    svc: Services = request.app[Services.KEY]
    principal = await svc.auth.client(request)
    wf = await svc.store.get_workflow(principal.account.id, request.match_info["id"])
    tasks = await svc.store.tasks(wf.id)
    view = workflow_view(wf, children=await svc.store.child_ids(wf.id), tasks=tasks)
    view["workflowId"] = wf.id
    view["correlationId"] = wf.correlation_id
    return web.json_response(view)
