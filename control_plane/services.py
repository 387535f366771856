"""Everything a request handler (HTTP or agent websocket) needs, built once per app and kept
under one AppKey: the composition of the layers below."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import ClassVar

from aiohttp import web

from control_plane.auth import Authenticator
from control_plane.db.blobs import BlobStore
from control_plane.db.rows import WorkflowState
from control_plane.db.store import Store
from control_plane.db.tables import Workflow
from control_plane.db.webhooks import WebhookStore
from control_plane.fleet.admission import Admission
from control_plane.fleet.dispatch import Fleet
from control_plane.fleet.events import EventHub
from control_plane.fleet.rate_limits import RateLimiter
from control_plane.fleet.registry import Registry
from control_plane.fleet.retention import Retention
from control_plane.fleet.submissions import Submissions
from control_plane.model.lifecycle import WorkflowStatus
from control_plane.settings import Settings


@dataclass
class Services:
    KEY: ClassVar[web.AppKey[Services]]

    settings: Settings
    store: Store
    blobs: BlobStore
    hub: EventHub
    registry: Registry
    fleet: Fleet
    auth: Authenticator
    webhooks: WebhookStore
    retention: Retention
    rate_limits: RateLimiter = field(default_factory=RateLimiter)
    admission: Admission = field(init=False)
    submissions: Submissions = field(init=False)

    def __post_init__(self) -> None:
        self.admission = Admission(self.settings.max_handshakes, self.settings.handshake_queue)
        self.submissions = Submissions(
            self.settings, self.store, self.registry, self.fleet, self.rate_limits, self.webhooks
        )

    def live_runner(self, runner_id: str) -> dict[str, object] | None:
        conn = self.registry.get(runner_id)
        if conn is None:
            return None
        return {
            "capacity": conn.capacity.model_dump(),
            "comfyui": conn.comfyui,
            "jobs": sorted(conn.jobs),
            "last_seen_at": datetime.fromtimestamp(conn.last_seen_at, UTC),
        }

    def queue_position(self, wf: Workflow | WorkflowState) -> int | None:
        """A waiting workflow's place (from 1) among its account's waiting workflows with the
        same tags (those that compete for the same runners); in a runner's ComfyUI queue,
        what the runner reported."""
        if wf.status != WorkflowStatus.ACCEPTED or wf.runner_id is not None:
            return wf.queue_number
        position = self.fleet.waiting.position(wf.id)
        return position if position is not None else wf.queue_number


Services.KEY = web.AppKey("services", Services)
