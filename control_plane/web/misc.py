"""/v1/user, /healthz, and / (a browser that comes to the bare address wants the dashboard)."""

from __future__ import annotations

from aiohttp import web

from control_plane.fleet.events import iso
from control_plane.services import Services

routes = web.RouteTableDef()


@routes.get("/v1/user")
async def user(request: web.Request) -> web.Response:
    svc: Services = request.app[Services.KEY]
    principal = await svc.auth.client(request)
    account = principal.account
    tier = svc.settings.tiers.get(account.tier) or svc.settings.tiers["free"]
    runners = await svc.store.account_runners(account.id)
    return web.json_response(
        {
            "account": {"id": account.id, "name": account.name, "created_at": iso(account.created_at)},
            "tier": tier.name,
            "scope": principal.scope,
            "limits": {
                "max_parameters": tier.max_parameters,
                "max_workflows_per_day": tier.max_workflows_per_day,
                "max_request_bytes": svc.settings.max_request_bytes,
            },
            "usage": {
                "workflows_last_24h": await svc.store.workflows_last_day(account.id),
                "runners": len(runners),
                "runners_connected": sum(1 for r in runners if svc.registry.get(r.id)),
            },
        }
    )


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    svc: Services = request.app[Services.KEY]
    await svc.store.ping()
    return web.json_response(
        {
            "status": "ok",
            "database": svc.store.engine.dialect.name,
            "runners_connected": len(svc.registry.all()),
        }
    )


@routes.get("/")
async def root(request: web.Request) -> web.Response:
    raise web.HTTPFound("/dashboard")
