"""The control plane's aiohttp application: ``create_app(settings)``, no side effects at import."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import timedelta

from aiohttp import web

from control_plane import failpoints
from control_plane.agents import endpoint as agent_ws
from control_plane.agents import files as agent_http
from control_plane.auth import Authenticator
from control_plane.collector import Collector
from control_plane.db.blobs import open_blob_store
from control_plane.db.engine import make_engine
from control_plane.db.schema import create_schema
from control_plane.db.sole_server import sole_server
from control_plane.db.store import Store
from control_plane.db.tables import utcnow
from control_plane.db.webhooks import WebhookStore
from control_plane.failpoints import FailPoints
from control_plane.fleet.dispatch import Fleet
from control_plane.fleet.events import EventHub
from control_plane.fleet.journal import EventJournal
from control_plane.fleet.metrics import METRICS_KEY, Metrics
from control_plane.fleet.registry import Registry
from control_plane.fleet.retention import Retention
from control_plane.services import Services
from control_plane.settings import Settings
from control_plane.web import conductor, dashboard, idempotency, openapi, uploads
from control_plane.web import metrics as api_metrics
from control_plane.web import misc as api_misc
from control_plane.web import reruns as api_reruns
from control_plane.web import runners as api_runners
from control_plane.web import sweeps as api_sweeps
from control_plane.web import templates as api_templates
from control_plane.web import webhooks as api_webhooks
from control_plane.web import workflows as api_workflows
from control_plane.web.forms import FORM_GATES, FormGates
from control_plane.web.middleware import error_middleware, url_middleware
from control_plane.webhooks.sender import WebhookSender
from protocol.closing import Close

log = logging.getLogger(__name__)
# How long a published event waits for the event log: the events of that long go in one write.
EVENT_LOG_WRITE_S = 0.1


def create_app(settings: Settings) -> web.Application:
    # The 50 MB cap is enforced while streaming (forms.py); this only bounds aiohttp's own
    # buffered reads, which we do not use for uploads.
    app = web.Application(
        middlewares=[error_middleware, url_middleware], client_max_size=settings.max_request_bytes
    )
    for module in (
        api_workflows,
        api_reruns,
        api_sweeps,
        api_webhooks,
        api_templates,
        api_runners,
        conductor,
        uploads,
        api_misc,
        agent_ws,
        agent_http,
        api_metrics,
        dashboard,
        openapi,
    ):
        app.router.add_routes(module.routes)
    app[METRICS_KEY] = figures = Metrics()

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await asyncio.to_thread(settings.data_dir.mkdir, parents=True, exist_ok=True)
        async with sole_server(settings.resolved_database_url):
            engine = make_engine(settings.resolved_database_url)
            await create_schema(engine)
            store = Store(engine, FailPoints(failpoints.parse(settings.failpoints)))
            await store.forget_idempotent_before(utcnow() - timedelta(seconds=idempotency.KEEP_S))
            blobs = open_blob_store(settings.blob_url, settings.blob_dir, presign_s=settings.blob_presign_s)
            await blobs.setup()
            hub, registry = EventHub(), Registry()
            hub.journal = journal = EventJournal(store, EVENT_LOG_WRITE_S)
            fleet = Fleet(settings, store, registry, hub, blobs, figures)
            app[FORM_GATES] = FormGates()
            webhooks = WebhookStore(store.db)
            sender = WebhookSender(settings, webhooks)
            retention = Retention(settings, store, blobs)
            hub.on_status, fleet.on_runner_offline = sender.wake, sender.runner_offline
            app[Services.KEY] = Services(
                settings, store, blobs, hub, registry, fleet, Authenticator(store), webhooks, retention
            )
            await fleet.start()
            sender.start()
            retention.start()
            log.info(
                "control plane ready (database %s, blobs %s)",
                engine.url.render_as_string(hide_password=True),
                blobs.describe(),
            )
            collector = Collector()
            collector.install()
            yield
            await retention.stop()
            await sender.stop()
            await fleet.stop()
            await journal.close()
            await store.close()
            await blobs.close()
            collector.remove()

    async def close_agents(app: web.Application) -> None:
        # Agents see GOING_AWAY and reconnect to whoever serves next.
        svc = app.get(Services.KEY)
        if svc is not None:
            svc.fleet.stopping = True
            svc.hub.close()  # open SSE streams end, or they would hold the shutdown up
            for conn in svc.registry.all():
                await conn.ws.close(code=Close.GOING_AWAY, message=b"control plane shutting down")

    app.cleanup_ctx.append(lifecycle)
    app.on_shutdown.append(close_agents)
    return app
