"""GET /metrics in Prometheus' text format: gauges filled from the registry and the
database at scrape time, histograms as observed by the fleet."""

from __future__ import annotations

from collections import Counter

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import func
from sqlmodel import col, select

from control_plane.metrics import METRICS_KEY, Metrics
from control_plane.services import Services
from control_plane.tables import Workflow, as_utc, utcnow

routes = web.RouteTableDef()


async def _refresh(svc: Services, metrics: Metrics) -> None:
    online: Counter[str] = Counter()
    for gauge in (
        metrics.runners_online,
        metrics.gpu_utilization,
        metrics.gpu_memory_used,
        metrics.gpu_memory_total,
    ):
        gauge.clear()
    for conn in svc.registry.all():
        for tag in conn.tags or [""]:
            online[tag] += 1
        for gpu in conn.capacity.get("gpus") or []:
            labels = (conn.runner_id, str(gpu.get("index")))
            for gauge, key in (
                (metrics.gpu_utilization, "utilization_pct"),
                (metrics.gpu_memory_used, "memory_used_bytes"),
                (metrics.gpu_memory_total, "memory_total_bytes"),
            ):
                if gpu.get(key) is not None:
                    gauge.labels(*labels).set(gpu[key])
    for tag, count in online.items():
        metrics.runners_online.labels(tag).set(count)

    async with svc.store.session() as s:
        by_status = await s.exec(select(Workflow.status, func.count()).group_by(Workflow.status))
        waiting = (
            await s.exec(
                select(func.count(), func.min(Workflow.created_at)).where(
                    Workflow.status == "accepted", col(Workflow.runner_id).is_(None)
                )
            )
        ).one()
    metrics.workflows.clear()
    for status, count in by_status:
        metrics.workflows.labels(status).set(count)
    metrics.queue_length.set(waiting[0])
    oldest = waiting[1]
    metrics.queue_oldest_age.set((utcnow() - as_utc(oldest)).total_seconds() if oldest is not None else 0)


@routes.get("/metrics")
async def metrics_endpoint(request: web.Request) -> web.Response:
    svc: Services = request.app[Services.KEY]
    metrics = request.app[METRICS_KEY]
    await _refresh(svc, metrics)
    body = generate_latest(metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
