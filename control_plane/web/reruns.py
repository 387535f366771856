"""Reruns, both ways.

``POST /v1/workflow/{id}/rerun``, the rerun with new parameters: multipart, a new workflow.
``POST /api/workflow/{id}/rerun``, the Conductor-compatible rerun from a task: JSON, the same
workflow, a new attempt; answers the workflow id as text/plain. ``GET /api/workflow/{id}``:
the workflow with the tasks of every attempt, newest first.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from control_plane.fleet.reruns import TaskRerun, rerun_from_task
from control_plane.model.errors import BadRequest
from control_plane.services import Services
from control_plane.web import idempotency
from control_plane.web.forms import read_form
from control_plane.web.http_util import json_body
from control_plane.web.views import workflow_view
from control_plane.web.workflows import created_receipt

routes = web.RouteTableDef()

_BODY_FIELDS = {"reRunFromTaskId", "reRunFromWorkflowId", "correlationId", "taskInput", "workflowInput"}
# A rerun copies everything but the dynamic parameters: these fields would change the rest.
_FIXED_ON_RERUN = ("workflow_json", "name", "tags")


@routes.post("/v1/workflow/{id}/rerun")
async def rerun_with_new_parameters(request: web.Request) -> web.Response:
    svc: Services = request.app[Services.KEY]
    principal = await svc.auth.client(request)
    svc.submissions.check_submit_rate(principal.account, principal.token_id)
    original = await svc.store.get_workflow(principal.account.id, request.match_info["id"])
    async with read_form(request, svc, principal.account) as form:
        sent = set(form.fields) | ({"workflow_json"} if form.workflow_json else set())
        fixed = [f for f in _FIXED_ON_RERUN if f in sent]
        if fixed:
            raise BadRequest(
                f"a rerun copies {', '.join(fixed)} from the original; "
                "send only $text, $file and #choice parameters (and timeout_s, correlation_id)"
            )
        form.only("timeout_s", "correlation_id")

        async def produce(claim: idempotency.Claim | None) -> web.Response:
            wf = await svc.submissions.rerun_with_parameters(
                principal.account, original, form.sent(), created_receipt(claim)
            )
            return web.json_response(workflow_view(wf), status=201)

        return await idempotency.once(request, principal.account.id, form.fingerprint(), produce)


def _task_rerun(body: dict[str, Any]) -> TaskRerun:
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
    return TaskRerun(
        from_workflow_id=body.get("reRunFromWorkflowId"),
        task_ref=body.get("reRunFromTaskId"),
        task_input=body.get("taskInput") or {},
        workflow_input=body.get("workflowInput") or {},
        correlation_id=body.get("correlationId"),
    )


@routes.post("/api/workflow/{id}/rerun")
async def rerun_from_a_task(request: web.Request) -> web.Response:
    svc: Services = request.app[Services.KEY]
    principal = await svc.auth.client(request)
    svc.submissions.check_submit_rate(principal.account, principal.token_id)
    body = await json_body(request)
    wf = await svc.store.get_workflow(principal.account.id, request.match_info["id"])
    asked = _task_rerun(body)

    async def produce(claim: idempotency.Claim | None) -> web.Response:
        receipt = None if claim is None else (lambda wf: claim.receipt(200, wf.id, "text/plain"))
        updated = await rerun_from_task(svc.submissions, principal.account, wf.id, asked, receipt)
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
