"""/v1/webhook: an account's endpoints (the secret shown once, at creation), their deliveries
with every attempt's answer, and the account's secret that signs the URLs workflows name
themselves (``webhook_url``)."""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from control_plane.db.tables import WebhookDelivery, WebhookEndpoint, utcnow
from control_plane.fleet.events import iso
from control_plane.model.errors import BadRequest
from control_plane.model.lifecycle import DeliveryStatus
from control_plane.public_addresses import check_target
from control_plane.services import Services
from control_plane.web.http_util import json_body, paging
from control_plane.webhooks.events import EVENT_TYPES
from control_plane.webhooks.signing import new_secret

log = logging.getLogger(__name__)
routes = web.RouteTableDef()
_FIELDS = ("url", "events", "description")


@routes.post("/v1/webhook")
async def create_webhook(request: web.Request) -> web.Response:
    svc: Services = request.app[Services.KEY]
    principal = await svc.auth.client(request)
    body = await json_body(request, required=True)
    _only(body, _FIELDS)
    if "url" not in body or "events" not in body:
        raise BadRequest('a webhook takes url and events (and description): {"url": …, "events": [...]}')
    secret = new_secret()
    endpoint = WebhookEndpoint(
        account_id=principal.account.id,
        url=await _url(svc, body["url"]),
        events=_events(body["events"]),
        description=_description(body.get("description", "")),
        secret=secret,
    )
    endpoint = await svc.webhooks.add_endpoint(endpoint)
    log.info("webhook %s to %s for account %s", endpoint.id, endpoint.url, principal.account.name)
    return web.json_response(endpoint_view(endpoint) | {"secret": secret}, status=201)


@routes.get("/v1/webhook")
async def list_webhooks(request: web.Request) -> web.Response:
    svc: Services = request.app[Services.KEY]
    principal = await svc.auth.client(request)
    offset, limit = paging(request)
    rows, total = await svc.webhooks.endpoints(principal.account.id, offset, limit)
    return web.json_response({"webhooks": [endpoint_view(e) for e in rows], "total": total})


@routes.get("/v1/webhook/{id}")
async def get_webhook(request: web.Request) -> web.Response:
    svc: Services = request.app[Services.KEY]
    principal = await svc.auth.client(request)
    return web.json_response(
        endpoint_view(await svc.webhooks.endpoint(principal.account.id, request.match_info["id"]))
    )


@routes.put("/v1/webhook/{id}")
async def change_webhook(request: web.Request) -> web.Response:
    """url, events, description; ``status: "active"`` turns a disabled one on again (and
    forgets its failures), ``"disabled"`` off."""
    svc: Services = request.app[Services.KEY]
    principal = await svc.auth.client(request)
    body = await json_body(request, required=True)
    _only(body, (*_FIELDS, "status"))
    changes: dict[str, Any] = {}
    if "url" in body:
        changes["url"] = await _url(svc, body["url"])
    if "events" in body:
        changes["events"] = _events(body["events"])
    if "description" in body:
        changes["description"] = _description(body["description"])
    if "status" in body:
        if body["status"] not in ("active", "disabled"):
            raise BadRequest('status is "active" or "disabled"')
        changes |= {"status": body["status"], "failing_since": None}
        changes["disabled_reason"] = None if body["status"] == "active" else "disabled by its account"
    endpoint = await svc.webhooks.change_endpoint(principal.account.id, request.match_info["id"], changes)
    return web.json_response(endpoint_view(endpoint))


@routes.delete("/v1/webhook/{id}")
async def delete_webhook(request: web.Request) -> web.Response:
    svc: Services = request.app[Services.KEY]
    principal = await svc.auth.client(request)
    await svc.webhooks.delete_endpoint(principal.account.id, request.match_info["id"])
    return web.Response(status=204)


@routes.get("/v1/webhook/{id}/deliveries")
async def webhook_deliveries(request: web.Request) -> web.Response:
    svc: Services = request.app[Services.KEY]
    principal = await svc.auth.client(request)
    endpoint = await svc.webhooks.endpoint(principal.account.id, request.match_info["id"])
    offset, limit = paging(request)
    rows, total = await svc.webhooks.deliveries(principal.account.id, offset, limit, endpoint_id=endpoint.id)
    return web.json_response({"deliveries": [delivery_view(d) for d in rows], "total": total})


@routes.get("/v1/workflow/{id}/deliveries")
async def workflow_deliveries(request: web.Request) -> web.Response:
    """Every delivery about one workflow: to the account's endpoints and to its webhook_url."""
    svc: Services = request.app[Services.KEY]
    principal = await svc.auth.client(request)
    wf = await svc.store.get_workflow(principal.account.id, request.match_info["id"])
    offset, limit = paging(request)
    rows, total = await svc.webhooks.deliveries(principal.account.id, offset, limit, workflow_id=wf.id)
    return web.json_response({"deliveries": [delivery_view(d) for d in rows], "total": total})


@routes.post("/v1/webhook-secret")
async def new_account_secret(request: web.Request) -> web.Response:
    """Make (or replace) the secret that signs deliveries to workflows' own webhook_url; shown
    this once. Deliveries not yet sent are signed with the new one."""
    svc: Services = request.app[Services.KEY]
    principal = await svc.auth.client(request)
    secret = new_secret()
    await svc.webhooks.set_account_secret(principal.account.id, secret)
    log.info("account %s has a new webhook secret", principal.account.name)
    return web.json_response({"secret": secret, "created_at": iso(utcnow())}, status=201)


def endpoint_view(endpoint: WebhookEndpoint) -> dict[str, Any]:
    return {
        "id": endpoint.id,
        "url": endpoint.url,
        "events": endpoint.events,
        "description": endpoint.description,
        "status": endpoint.status,
        "disabled_reason": endpoint.disabled_reason,
        "failing_since": iso(endpoint.failing_since),
        "created_at": iso(endpoint.created_at),
        "updated_at": iso(endpoint.updated_at),
    }


def delivery_view(delivery: WebhookDelivery) -> dict[str, Any]:
    return {
        "id": delivery.id,
        "webhook_id": delivery.endpoint_id,
        "url": delivery.url,
        "event_type": delivery.event_type,
        "workflow_id": delivery.workflow_id,
        "status": delivery.status,
        "attempts": delivery.attempt_log,
        "next_attempt_at": iso(delivery.next_attempt_at)
        if delivery.status == DeliveryStatus.PENDING
        else None,
        "created_at": iso(delivery.created_at),
        "delivered_at": iso(delivery.delivered_at),
    }


def _only(body: dict[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise BadRequest(
            f"unknown field {', '.join(repr(u[:64]) for u in unknown[:5])}; this takes {', '.join(allowed)}"
        )


async def _url(svc: Services, value: Any) -> str:
    if not isinstance(value, str):
        raise BadRequest("url must be a string")
    try:
        return await check_target(value, "url", svc.settings.webhook_private_urls, "webhook_private_urls")
    except ValueError as exc:
        raise BadRequest(str(exc)) from None


def _events(value: Any) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise BadRequest(f"events is a non-empty list of {', '.join(EVENT_TYPES)}")
    unknown = sorted(set(value) - set(EVENT_TYPES))
    if unknown:
        raise BadRequest(f"unknown event {unknown[0][:64]!r}; the events are {', '.join(EVENT_TYPES)}")
    return sorted(set(value), key=EVENT_TYPES.index)


def _description(value: Any) -> str:
    if not isinstance(value, str) or len(value) > 200 or "\x00" in value:
        raise BadRequest("description is text of at most 200 characters")
    return value
