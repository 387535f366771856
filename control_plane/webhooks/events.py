"""What a webhook announces, and to whom: the event types, which of them a status change is,
and the payload each delivery carries.

Every payload is ``{"type", "timestamp", "data"}``. A workflow event's data is the workflow
as it was at the change (its status and attempt then; the rest as stored) and, once it has
completed, its outputs with absolute URLs to fetch them (with a client token)::

    {"type": "workflow.completed", "timestamp": "2026-12-03T07:50:12.345678Z",
     "data": {"workflow": {"id": "…", "status": …, "attempt": 1, …, "url": "…"},
              "outputs": [{"id": "…", "node_id": "9", "filename": "fox_00001_.png", …,
                           "url": "https://fleet.example/v1/output/…"}]}}

``runner.offline``'s data is the runner and the workflows it held that were requeued.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

from control_plane.db.tables import Output, WebhookChange, WebhookDelivery, WebhookEndpoint, Workflow, utcnow
from control_plane.fleet.events import iso, output_event
from control_plane.model.lifecycle import WorkflowStatus

COMPLETED, FAILED, CANCELLED = "workflow.completed", "workflow.failed", "workflow.cancelled"
STATUS, RUNNER_OFFLINE = "workflow.status", "runner.offline"
EVENT_TYPES = (COMPLETED, FAILED, CANCELLED, STATUS, RUNNER_OFFLINE)
# A workflow's own webhook_url hears of its end, not of every step on the way.
_ENDINGS = {
    WorkflowStatus.COMPLETED: COMPLETED,
    WorkflowStatus.FAILED: FAILED,
    WorkflowStatus.INVALID: FAILED,
    WorkflowStatus.CANCELLED: CANCELLED,
}


@dataclass(frozen=True)
class Target:
    url: str
    endpoint_id: str | None  # None: the workflow's own webhook_url, signed with the account's secret


def message_id() -> str:
    return "msg_" + secrets.token_hex(16)


def event_types(status: str) -> list[str]:
    """The events a status change is: always a status event; an ending also its own."""
    ending = _ENDINGS.get(WorkflowStatus(status))
    return [STATUS, ending] if ending is not None else [STATUS]


def deliveries_of(
    change: WebhookChange,
    workflow: Workflow,
    outputs: list[Output],
    endpoints: list[WebhookEndpoint],
    base_url: str,
) -> list[WebhookDelivery]:
    """The deliveries one status change makes: one per endpoint for each event type it wants,
    and one to the workflow's own URL when the change ends it."""
    types = event_types(change.status)
    targets = [(t, Target(e.url, e.id)) for e in endpoints for t in types if t in e.events]
    ending = types[-1] if len(types) > 1 else None
    if ending is not None and workflow.webhook_url:
        targets.append((ending, Target(workflow.webhook_url, None)))
    made = []
    for event_type, target in targets:
        data: dict[str, Any] = {"workflow": _workflow(change, workflow, base_url)}
        if change.status == WorkflowStatus.COMPLETED:
            data["outputs"] = [_output(o, base_url) for o in outputs if o.attempt == change.attempt]
        made.append(
            _delivery(change.account_id, event_type, target, iso(change.changed_at), data, workflow.id)
        )
    return made


def runner_offline(
    account_id: str, runner: dict[str, Any], requeued: list[str], endpoints: list[WebhookEndpoint]
) -> list[WebhookDelivery]:
    stamp = iso(utcnow())
    data = {"runner": runner, "requeued": requeued}
    return [
        _delivery(account_id, RUNNER_OFFLINE, Target(e.url, e.id), stamp, data, None)
        for e in endpoints
        if RUNNER_OFFLINE in e.events
    ]


def _delivery(
    account_id: str, event_type: str, target: Target, stamp: str | None, data: Any, workflow_id: str | None
) -> WebhookDelivery:
    body = json.dumps({"type": event_type, "timestamp": stamp, "data": data}, separators=(",", ":"))
    now = utcnow()
    return WebhookDelivery(
        id=message_id(),
        account_id=account_id,
        endpoint_id=target.endpoint_id,
        url=target.url,
        event_type=event_type,
        workflow_id=workflow_id,
        payload=body,
        next_attempt_at=now,
        attempt_log=[],
        created_at=now,
    )


def _workflow(change: WebhookChange, wf: Workflow, base_url: str) -> dict[str, Any]:
    return {
        "id": wf.id,
        "name": wf.name,
        "status": change.status,
        "attempt": change.attempt,
        "tags": wf.tags,
        "correlation_id": wf.correlation_id,
        "parent_id": wf.parent_id,
        "sweep_id": wf.sweep_id,
        "priority": wf.priority,
        "failure_reason": wf.failure_reason,
        "error_node": wf.error_node,
        "exception_type": wf.exception_type,
        "exception_message": wf.exception_message,
        "created_at": iso(wf.created_at),
        "started_at": iso(wf.started_at),
        "completed_at": iso(wf.completed_at),
        "url": f"{base_url}/v1/workflow/{wf.id}",
    }


def _output(out: Output, base_url: str) -> dict[str, Any]:
    view = output_event(out)
    return {**{k: v for k, v in view.items() if k != "src"}, "url": base_url + view["src"]}
