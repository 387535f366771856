"""Conductor's workflow API, so that Conductor's own clients (``conductor-python`` and the
others) drive comfyfleet unchanged. Under ``/api`` (a client's ``server_api_url``):

- ``GET /api/workflow/{id}?includeTasks=``: Conductor's ``Workflow`` (``conductor_views.py``).
- ``POST /api/workflow/{id}/rerun``: rerun from a task, in place (the next attempt); the id.
- ``DELETE /api/workflow/{id}?reason=``: terminate (cancel); 409 once it has ended.
- ``POST /api/workflow/{id}/retry``: the next attempt from the task that failed; 204.
- ``POST /api/workflow/{id}/restart``: the next attempt of the whole graph; 204.
- ``POST /api/token``: a key id and secret for a token, as Conductor's clients log in: the
  secret is a comfyfleet client token, and the answer is that token, sent from then on as
  ``X-Authorization``.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from control_plane.db.tables import Task, Workflow
from control_plane.fleet.reruns import TaskRerun, rerun_from_task
from control_plane.model.errors import BadRequest, Conflict, Unauthorized
from control_plane.model.lifecycle import RETRIED, TERMINAL, ConductorStatus, TaskStatus
from control_plane.services import Services
from control_plane.web import idempotency
from control_plane.web.conductor_views import conductor_status, conductor_workflow
from control_plane.web.http_util import json_body

routes = web.RouteTableDef()

_RERUN_FIELDS = {"reRunFromTaskId", "reRunFromWorkflowId", "correlationId", "taskInput", "workflowInput"}


def _flag(request: web.Request, name: str, default: bool) -> bool:
    raw = request.query.get(name)
    if raw is None:
        return default
    if raw.lower() in ("true", "1"):
        return True
    if raw.lower() in ("false", "0"):
        return False
    raise BadRequest(f"{name} must be true or false")


@routes.get("/api/workflow/{id}")
async def get_workflow(request: web.Request) -> web.Response:
    svc: Services = request.app[Services.KEY]
    principal = await svc.auth.client(request)
    include_tasks = _flag(request, "includeTasks", True)
    wf = await svc.store.get_workflow(principal.account.id, request.match_info["id"])
    outputs = await svc.store.outputs(wf.id)
    tasks = await svc.store.tasks(wf.id) if include_tasks else None
    return web.json_response(conductor_workflow(wf, outputs, tasks))


def _task_rerun(body: dict[str, Any]) -> TaskRerun:
    unknown = set(body) - _RERUN_FIELDS
    if unknown:
        raise BadRequest(
            f"unknown fields: {', '.join(sorted(unknown))}; expected {', '.join(sorted(_RERUN_FIELDS))}"
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


@routes.delete("/api/workflow/{id}")
async def terminate(request: web.Request) -> web.Response:
    svc: Services = request.app[Services.KEY]
    principal = await svc.auth.client(request)
    wf = await svc.store.get_workflow(principal.account.id, request.match_info["id"])
    if wf.status in TERMINAL or await svc.fleet.cancel(wf) is None:
        current = await svc.store.get_workflow(principal.account.id, wf.id)
        raise Conflict(f"workflow {wf.id} is already {conductor_status(current)}: nothing to terminate")
    return web.Response(status=200)


def _failed_task(wf: Workflow, tasks: list[Task]) -> str | None:
    """Where a retry starts: the node that failed, else the first of the last attempt that did
    not complete; ``None`` (the whole graph) when none is known."""
    if wf.error_node and wf.error_node in wf.workflow_json:
        return wf.error_node
    unfinished = [t for t in tasks if t.status != TaskStatus.COMPLETED and t.node_id in wf.workflow_json]
    return unfinished[0].node_id if unfinished else None


@routes.post("/api/workflow/{id}/retry")
async def retry(request: web.Request) -> web.Response:
    svc: Services = request.app[Services.KEY]
    principal = await svc.auth.client(request)
    svc.submissions.check_submit_rate(principal.account, principal.token_id)
    wf = await svc.store.get_workflow(principal.account.id, request.match_info["id"])
    status = conductor_status(wf)
    if status not in RETRIED:
        raise Conflict(f"workflow {wf.id} is {status}: only a failed, timed-out or terminated one is retried")
    tasks = sorted(await svc.store.tasks(wf.id, wf.attempt), key=lambda t: t.started_at is None)
    asked = TaskRerun(task_ref=_failed_task(wf, tasks))
    await rerun_from_task(svc.submissions, principal.account, wf.id, asked)
    return web.Response(status=204)


@routes.post("/api/workflow/{id}/restart")
async def restart(request: web.Request) -> web.Response:
    svc: Services = request.app[Services.KEY]
    principal = await svc.auth.client(request)
    svc.submissions.check_submit_rate(principal.account, principal.token_id)
    wf = await svc.store.get_workflow(principal.account.id, request.match_info["id"])
    if wf.status not in TERMINAL:
        raise Conflict(f"workflow {wf.id} is {ConductorStatus.RUNNING}: only one that has ended is restarted")
    await rerun_from_task(svc.submissions, principal.account, wf.id, TaskRerun())
    return web.Response(status=204)


@routes.post("/api/token")
async def token(request: web.Request) -> web.Response:
    svc: Services = request.app[Services.KEY]
    body = await json_body(request, required=True)
    secret = body.get("keySecret")
    if not isinstance(secret, str) or not secret:
        raise BadRequest("keySecret must be a comfyfleet client token (and keyId any name)")
    if not (secret.isascii() and secret.isprintable()):
        raise Unauthorized("invalid token: a token is printable ASCII")
    await svc.auth.token(secret)
    return web.json_response({"token": secret})
