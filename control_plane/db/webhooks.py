"""The webhooks' tables: endpoints and the account's secret, the outbox (``webhook_change``
rows the trigger writes), and the deliveries the sender makes of it. Like the store, one
method per unit of work and nothing but the database inside one."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func
from sqlalchemy.orm import defer
from sqlmodel import Session, col, select

from control_plane.db.database import Database
from control_plane.db.tables import (
    Account,
    Output,
    Runner,
    WebhookChange,
    WebhookDelivery,
    WebhookEndpoint,
    Workflow,
    as_utc,
    utcnow,
)
from control_plane.model.errors import NotFound
from control_plane.model.lifecycle import DeliveryStatus, WorkflowStatus

# Makes one change's deliveries from its workflow, that workflow's outputs and the account's
# active endpoints (``webhooks/events.py``).
Plan = Callable[[WebhookChange, Workflow, list[Output], list[WebhookEndpoint]], list[WebhookDelivery]]


@dataclass(frozen=True)
class Due:
    """A delivery claimed for one attempt, with what signs it (``None``: nothing can)."""

    delivery: WebhookDelivery
    secret: str | None
    # Why it cannot be sent any more (its endpoint disabled or deleted), if so.
    dropped: str | None = None


@dataclass(frozen=True)
class Outcome:
    """One attempt's answer."""

    at: datetime
    status_code: int | None
    error: str | None
    answer: str
    duration_ms: int

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300

    def logged(self) -> dict[str, Any]:
        return {
            "at": self.at.isoformat(),
            "status_code": self.status_code,
            "error": self.error,
            "answer": self.answer,
            "duration_ms": self.duration_ms,
        }


class WebhookStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._skip_locked = db.dialect == "postgresql"

    # -- endpoints and the account's secret -------------------------------------------

    async def add_endpoint(self, endpoint: WebhookEndpoint) -> WebhookEndpoint:
        def work(s: Session) -> WebhookEndpoint:
            s.add(endpoint)
            s.commit()
            s.refresh(endpoint)
            return endpoint

        return await self.db.run(work)

    async def endpoints(self, account_id: str, offset: int, limit: int) -> tuple[list[WebhookEndpoint], int]:
        def work(s: Session) -> tuple[list[WebhookEndpoint], int]:
            mine = WebhookEndpoint.account_id == account_id
            total = s.exec(select(func.count()).select_from(WebhookEndpoint).where(mine)).one()
            rows = s.exec(
                select(WebhookEndpoint)
                .where(mine)
                .order_by(col(WebhookEndpoint.created_at))
                .offset(offset)
                .limit(limit)
            )
            return list(rows), int(total)

        return await self.db.run(work)

    async def endpoint(self, account_id: str, endpoint_id: str) -> WebhookEndpoint:
        return await self.db.run(lambda s: _endpoint(s, account_id, endpoint_id))

    async def change_endpoint(
        self, account_id: str, endpoint_id: str, changes: dict[str, Any]
    ) -> WebhookEndpoint:
        def work(s: Session) -> WebhookEndpoint:
            endpoint = _endpoint(s, account_id, endpoint_id)
            for key, value in changes.items():
                setattr(endpoint, key, value)
            endpoint.updated_at = utcnow()
            s.add(endpoint)
            s.commit()
            s.refresh(endpoint)
            return endpoint

        return await self.db.run(work)

    async def delete_endpoint(self, account_id: str, endpoint_id: str) -> None:
        def work(s: Session) -> None:
            s.delete(_endpoint(s, account_id, endpoint_id))
            s.commit()

        await self.db.run(work)

    async def set_account_secret(self, account_id: str, secret: str) -> None:
        def work(s: Session) -> None:
            account = s.get(Account, account_id)
            if account is None:
                raise NotFound(f"account {account_id} not found")
            account.webhook_secret = secret
            s.add(account)
            s.commit()

        await self.db.run(work)

    async def account_secret(self, account_id: str) -> str | None:
        def work(s: Session) -> str | None:
            return s.exec(select(Account.webhook_secret).where(Account.id == account_id)).first()

        return await self.db.run(work)

    async def deliveries(
        self,
        account_id: str,
        offset: int,
        limit: int,
        *,
        endpoint_id: str | None = None,
        workflow_id: str | None = None,
    ) -> tuple[list[WebhookDelivery], int]:
        """The account's deliveries to an endpoint or about a workflow, newest first."""
        conds = [WebhookDelivery.account_id == account_id]
        if endpoint_id is not None:
            conds.append(WebhookDelivery.endpoint_id == endpoint_id)
        if workflow_id is not None:
            conds.append(WebhookDelivery.workflow_id == workflow_id)

        def work(s: Session) -> tuple[list[WebhookDelivery], int]:
            total = s.exec(select(func.count()).select_from(WebhookDelivery).where(*conds)).one()
            rows = s.exec(
                select(WebhookDelivery)
                .where(*conds)
                .order_by(col(WebhookDelivery.created_at).desc(), col(WebhookDelivery.id))
                .offset(offset)
                .limit(limit)
            )
            return list(rows), int(total)

        return await self.db.run(work)

    # -- the outbox --------------------------------------------------------------------

    async def expand(self, plan: Plan, limit: int) -> int:
        """Turn up to ``limit`` changes, oldest first, into their deliveries, in one
        transaction that also removes them; how many changes it took. Control planes on one
        PostgreSQL each take changes the others have not locked."""

        def work(s: Session) -> int:
            query = (
                select(WebhookChange)
                .order_by(col(WebhookChange.id))
                .limit(limit)
                .with_for_update(skip_locked=self._skip_locked)
            )
            changes = list(s.exec(query))
            endpoints: dict[str, list[WebhookEndpoint]] = {}
            for change in changes:
                # Its graph, which can be large, is no part of any payload.
                workflow = s.exec(
                    select(Workflow)
                    .where(Workflow.id == change.workflow_id)
                    .options(defer(Workflow.workflow_json))  # type: ignore[arg-type]
                ).first()
                if workflow is not None:  # a workflow deleted since has nothing to announce
                    if change.account_id not in endpoints:
                        endpoints[change.account_id] = _active(s, change.account_id)
                    outputs = (
                        list(s.exec(select(Output).where(Output.workflow_id == workflow.id)))
                        if change.status == WorkflowStatus.COMPLETED
                        else []
                    )
                    for delivery in plan(change, workflow, outputs, endpoints[change.account_id]):
                        s.add(delivery)
            if changes:
                s.connection().execute(
                    delete(WebhookChange).where(col(WebhookChange.id).in_([c.id for c in changes]))
                )
            s.commit()
            return len(changes)

        return await self.db.run(work)

    async def add_deliveries(self, deliveries: list[WebhookDelivery]) -> None:
        def work(s: Session) -> None:
            s.add_all(deliveries)
            s.commit()

        if deliveries:
            await self.db.run(work)

    async def runner_and_endpoints(self, runner_id: str) -> tuple[Runner, list[WebhookEndpoint]] | None:
        def work(s: Session) -> tuple[Runner, list[WebhookEndpoint]] | None:
            runner = s.get(Runner, runner_id)
            return (runner, _active(s, runner.account_id)) if runner is not None else None

        return await self.db.run(work)

    async def claim_due(self, now: datetime, limit: int, lease_s: float) -> list[Due]:
        """Up to ``limit`` pending deliveries whose time has come, each put off by
        ``lease_s`` so that no other sender takes it meanwhile (and so that it is tried again
        if this one dies with it); each with the secret that signs it."""

        def work(s: Session) -> list[Due]:
            query = (
                select(WebhookDelivery)
                .where(
                    WebhookDelivery.status == DeliveryStatus.PENDING,
                    col(WebhookDelivery.next_attempt_at) <= now,
                )
                .order_by(col(WebhookDelivery.next_attempt_at))
                .limit(limit)
                .with_for_update(skip_locked=self._skip_locked)
            )
            due: list[Due] = []
            for delivery in s.exec(query):
                secret, dropped = _signer(s, delivery)
                if dropped is not None:
                    delivery.status = DeliveryStatus.FAILED
                    delivery.attempt_log = [*delivery.attempt_log, {"at": now.isoformat(), "error": dropped}]
                else:
                    delivery.next_attempt_at = now + timedelta(seconds=lease_s)
                s.add(delivery)
                due.append(Due(delivery, secret, dropped))
            s.commit()
            return due

        return await self.db.run(work)

    async def record(
        self, delivery: WebhookDelivery, outcome: Outcome, retry_at: datetime | None, disable_after_s: float
    ) -> None:
        """One attempt's outcome: delivered, to be tried again at ``retry_at``, or (``None``)
        given up on. An endpoint that has failed every attempt for ``disable_after_s`` is
        disabled, with the last answer as the reason."""

        def work(s: Session) -> None:
            row = s.get(WebhookDelivery, delivery.id)
            if row is None:
                return
            row.attempts += 1
            row.attempt_log = [*row.attempt_log, outcome.logged()]
            if outcome.delivered:
                row.status, row.delivered_at = DeliveryStatus.DELIVERED, outcome.at
            elif retry_at is not None:
                row.next_attempt_at = retry_at
            else:
                row.status = DeliveryStatus.FAILED
            s.add(row)
            endpoint = s.get(WebhookEndpoint, row.endpoint_id) if row.endpoint_id is not None else None
            if endpoint is not None:
                _note_outcome(endpoint, outcome, disable_after_s)
                s.add(endpoint)
            s.commit()

        await self.db.run(work)


def _endpoint(s: Session, account_id: str, endpoint_id: str) -> WebhookEndpoint:
    found = s.get(WebhookEndpoint, endpoint_id)
    if found is None or found.account_id != account_id:
        raise NotFound(f"webhook {endpoint_id[:64]} not found")
    return found


def _active(s: Session, account_id: str) -> list[WebhookEndpoint]:
    return list(
        s.exec(
            select(WebhookEndpoint).where(
                WebhookEndpoint.account_id == account_id, WebhookEndpoint.status == "active"
            )
        )
    )


def _signer(s: Session, delivery: WebhookDelivery) -> tuple[str | None, str | None]:
    """The secret that signs a delivery, or why it can no longer be sent."""
    if delivery.endpoint_id is None:
        secret = s.exec(select(Account.webhook_secret).where(Account.id == delivery.account_id)).first()
        return (secret, None) if secret else (None, "the account has no webhook secret")
    endpoint = s.get(WebhookEndpoint, delivery.endpoint_id)
    if endpoint is None:
        return None, "its webhook was deleted"
    if endpoint.status != "active":
        return None, f"its webhook is disabled: {endpoint.disabled_reason or 'by its account'}"
    return endpoint.secret, None


def _note_outcome(endpoint: WebhookEndpoint, outcome: Outcome, disable_after_s: float) -> None:
    if outcome.delivered:
        endpoint.failing_since = None
        return
    since = as_utc(endpoint.failing_since) if endpoint.failing_since is not None else outcome.at
    endpoint.failing_since = since
    if endpoint.status == "active" and (outcome.at - since).total_seconds() >= disable_after_s:
        endpoint.status = "disabled"
        answer = f"HTTP {outcome.status_code}" if outcome.status_code is not None else outcome.error
        endpoint.disabled_reason = (
            f"every attempt failed for {disable_after_s:g} s since {since.isoformat()} (last: {answer})"
        )
        endpoint.updated_at = outcome.at
