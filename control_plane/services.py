"""Everything a request handler needs, built once per app and kept under one AppKey."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import ClassVar

from aiohttp import web
from sqlalchemy import func
from sqlmodel import col, select

from control_plane.auth import Authenticator
from control_plane.blobs import BlobStore
from control_plane.events import EventHub
from control_plane.fleet import Fleet
from control_plane.forms import PLAIN_PARTS, FormGates, FormLimits, SubmittedForm, uploaded_form
from control_plane.rate_limits import RateLimiter
from control_plane.registry import Registry
from control_plane.settings import Settings
from control_plane.store import Store
from control_plane.tables import Account, Workflow


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
    rate_limits: RateLimiter = field(default_factory=RateLimiter)
    form_gates: FormGates = field(default_factory=FormGates)

    def read_form(self, request: web.Request, account: Account) -> AbstractAsyncContextManager[SubmittedForm]:
        """The request's multipart (or url-encoded) form, within the account's tier's limits
        and read in the account's turn (forms.py)."""
        tier = self.settings.tiers.get(account.tier) or self.settings.tiers["free"]
        limits = FormLimits(self.settings.max_request_bytes, tier.max_parameters + PLAIN_PARTS)
        gate = self.form_gates.turn(account.id)
        return uploaded_form(request, self.blobs, limits, self.store.blob_referenced, gate)

    def live_runner(self, runner_id: str) -> dict[str, object] | None:
        conn = self.registry.get(runner_id)
        if conn is None:
            return None
        return {
            "capacity": conn.capacity,
            "comfyui": conn.comfyui,
            "jobs": sorted(conn.jobs),
            "last_seen_at": datetime.fromtimestamp(conn.last_seen_at, UTC),
        }

    async def queue_position(self, wf: Workflow) -> int | None:
        """A waiting workflow's place (from 1) among its account's waiting workflows with the
        same tags (those that compete for the same runners); in a runner's ComfyUI queue,
        what the runner reported."""
        if wf.status != "accepted" or wf.runner_id is not None:
            return wf.queue_number
        async with self.store.session() as s:
            ahead = await s.exec(
                select(func.count())
                .select_from(Workflow)
                .where(
                    Workflow.account_id == wf.account_id,
                    Workflow.tag_index == wf.tag_index,
                    Workflow.status == "accepted",
                    col(Workflow.runner_id).is_(None),
                    col(Workflow.created_at) < wf.created_at,
                )
            )
            return int(ahead.one()) + 1


Services.KEY = web.AppKey("services", Services)
