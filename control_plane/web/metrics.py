"""GET /metrics in Prometheus' text format, for operators: an account's operator token sees
its own account, an ``admin`` token every account (metrics.py says what is shown)."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from control_plane.db.tables import utcnow
from control_plane.fleet.metrics import METRICS_KEY, render
from control_plane.services import Services

routes = web.RouteTableDef()


@routes.get("/metrics")
async def metrics_endpoint(request: web.Request) -> web.Response:
    svc: Services = request.app[Services.KEY]
    principal = await svc.auth.client(request, scope="operator")
    only = None if principal.sees_every_account else principal.account.id
    figures = await svc.store.fleet_figures(only)
    conns = [c for c in svc.registry.all() if c.account_id in figures.account_names]
    body = render(request.app[METRICS_KEY], figures, conns, utcnow())
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
