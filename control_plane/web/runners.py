"""/v1/runner: create (the runner token is shown once), list, get, update, delete."""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from control_plane.db.tables import new_id
from control_plane.model.errors import BadRequest, Conflict, GatewayTimeout
from control_plane.model.names import check_tags
from control_plane.services import Services
from control_plane.web.http_util import json_body, paging
from control_plane.web.views import runner_view
from protocol.messages import Interrupt, Reply, StatsRequest

log = logging.getLogger(__name__)
routes = web.RouteTableDef()


def _name(value: Any) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > 100:
        raise BadRequest("name must be a non-empty string of at most 100 characters")
    return value.strip()


def _tags(value: Any) -> list[str]:
    if not isinstance(value, str | list) or (
        isinstance(value, list) and not all(isinstance(t, str) for t in value)
    ):
        raise BadRequest("tags must be a list of strings or a comma-separated string")
    return check_tags(value)


@routes.post("/v1/runner")
async def create_runner(request: web.Request) -> web.Response:
    svc: Services = request.app[Services.KEY]
    principal = await svc.auth.client(request)
    body = await json_body(request, required=True)
    unknown = set(body) - {"name", "tags"}
    if unknown:
        raise BadRequest(f"unknown fields: {', '.join(sorted(unknown))[:200]} (name, tags)")
    raw, runner = await svc.store.create_runner(
        principal.account.id, _name(body.get("name")), _tags(body.get("tags", []))
    )
    log.info("runner %s (%s) created for account %s", runner.id, runner.name, principal.account.name)
    return web.json_response(runner_view(runner, None) | {"token": raw}, status=201)


@routes.get("/v1/runner")
async def list_runners(request: web.Request) -> web.Response:
    svc: Services = request.app[Services.KEY]
    principal = await svc.auth.client(request)
    offset, limit = paging(request)
    rows, total = await svc.store.list_runners(principal.account.id, offset, limit)
    return web.json_response(
        {"runners": [runner_view(r, svc.live_runner(r.id)) for r in rows], "total": total}
    )


@routes.get("/v1/runner/{id}")
async def get_runner(request: web.Request) -> web.Response:
    svc: Services = request.app[Services.KEY]
    principal = await svc.auth.client(request)
    runner = await svc.store.get_runner(principal.account.id, request.match_info["id"])
    return web.json_response(runner_view(runner, svc.live_runner(runner.id)))


@routes.put("/v1/runner/{id}")
async def update_runner(request: web.Request) -> web.Response:
    svc: Services = request.app[Services.KEY]
    principal = await svc.auth.client(request)
    body = await json_body(request, required=True)
    unknown = set(body) - {"name", "tags", "status"}
    if unknown:
        raise BadRequest(f"unknown fields: {', '.join(sorted(unknown))} (name, tags, status)")
    changes: dict[str, Any] = {}
    if "name" in body:
        changes["name"] = _name(body["name"])
    if "tags" in body:
        changes["tags"] = _tags(body["tags"])
    if "status" in body:
        if body["status"] not in ("active", "disabled"):
            raise BadRequest("status must be 'active' or 'disabled'")
        changes["status"] = body["status"]
    runner = await svc.store.update_runner(principal.account.id, request.match_info["id"], changes)
    conn = svc.registry.get(runner.id)
    if conn is not None:
        # A disabled runner drains: what it runs finishes, nothing new is dispatched.
        conn.rename(runner.name, runner.tags, runner.status)
    elif svc.fleet.replicas is not None:
        svc.fleet.replicas.runner_changed(runner.id, runner.name, runner.tags, runner.status)
    svc.fleet.kick()
    return web.json_response(runner_view(runner, svc.live_runner(runner.id)))


@routes.delete("/v1/runner/{id}")
async def delete_runner(request: web.Request) -> web.Response:
    svc: Services = request.app[Services.KEY]
    principal = await svc.auth.client(request)
    runner_id = request.match_info["id"]
    await svc.store.delete_runner(principal.account.id, runner_id)
    conn = svc.registry.get(runner_id)
    if conn is not None:
        await svc.fleet.close_deleted(conn)
    elif svc.fleet.replicas is not None:
        svc.fleet.replicas.runner_deleted(runner_id)
    await svc.fleet.runner_deleted(runner_id)
    return web.json_response({"id": runner_id, "deleted": True})


RUNNER_REQUEST_TIMEOUT_S = 5.0


async def _ask_runner(
    svc: Services, account_id: str, runner_id: str, message: Interrupt | StatsRequest
) -> Reply:
    runner = await svc.store.get_runner(account_id, runner_id)
    conn = svc.registry.get(runner.id)
    replicas = svc.fleet.replicas
    if conn is None and (replicas is None or await replicas.holder(runner.id) is None):
        raise Conflict(f"runner {runner.name} is offline")
    try:
        if conn is not None:
            reply = await conn.request(message, RUNNER_REQUEST_TIMEOUT_S)
        else:
            assert replicas is not None
            # Its connection may be held by another control plane on the database.
            reply = await replicas.ask(runner.id, message, RUNNER_REQUEST_TIMEOUT_S)
    except TimeoutError as exc:
        where = "" if conn is not None else " (through the control plane that holds its connection)"
        raise GatewayTimeout(
            f"runner {runner.name} did not answer within {RUNNER_REQUEST_TIMEOUT_S:g} s{where}"
        ) from exc
    except ConnectionError as exc:
        raise Conflict(f"runner {runner.name} went offline: {exc}") from exc
    if not reply.ok:
        raise Conflict(f"runner {runner.name}: {reply.error or 'request failed'}")
    return reply


@routes.post("/v1/runner/{id}/interrupt")
async def interrupt_runner(request: web.Request) -> web.Response:
    """Interrupt what the runner's ComfyUI is running, through the agent's connection."""
    svc: Services = request.app[Services.KEY]
    principal = await svc.auth.client(request)
    reply = await _ask_runner(
        svc, principal.account.id, request.match_info["id"], Interrupt(request_id=new_id())
    )
    return web.json_response({"id": request.match_info["id"], **reply.data})


@routes.get("/v1/runner/{id}/stats")
async def runner_stats(request: web.Request) -> web.Response:
    """Live capacity and ComfyUI system stats, fetched through the agent's connection."""
    svc: Services = request.app[Services.KEY]
    principal = await svc.auth.client(request)
    reply = await _ask_runner(
        svc, principal.account.id, request.match_info["id"], StatsRequest(request_id=new_id())
    )
    return web.json_response({"id": request.match_info["id"], **reply.data})
