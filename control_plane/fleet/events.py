"""Workflow events: what each carries, and their in-process publish/subscribe, which feeds the
SSE streams (``GET /v1/workflow/{id}/subscribe``). The payloads here are the events' contract;
the REST views reuse the output's. Each published event gets its id from the event log
(``journal.py``), which keeps it for clients that reconnect."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from control_plane.db.rows import WorkflowState
from control_plane.db.tables import Output, Workflow, as_utc

if TYPE_CHECKING:
    from control_plane.fleet.journal import EventJournal

EventName = Literal["status", "node", "output", "cause", "shutdown"]

# A subscriber that stops reading loses its oldest events rather than growing without bound.
_QUEUE_LIMIT = 1000


@dataclass(frozen=True)
class Event:
    name: EventName
    data: dict[str, Any]
    id: str | None = None  # its SSE id: where a client that reconnects resumes from


Relay = Callable[[str, EventName, dict[str, Any], str | None], None]


class EventHub:
    def __init__(self) -> None:
        self._subs: dict[str, set[asyncio.Queue[Event]]] = defaultdict(set)
        # Passes what is published here on to the other control planes on the database (which
        # deliver it to their own subscribers); unset when there are none.
        self.relay: Relay | None = None
        # Logs what is published here, and numbers it (unset: events have no ids).
        self.journal: EventJournal | None = None
        # Told of every status published here (the webhook sender: the outbox may have grown).
        self.on_status: Callable[[], None] | None = None

    @contextmanager
    def subscribe(self, workflow_id: str) -> Iterator[asyncio.Queue[Event]]:
        queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=_QUEUE_LIMIT)
        self._subs[workflow_id].add(queue)
        try:
            yield queue
        finally:
            subs = self._subs.get(workflow_id)
            if subs is not None:
                subs.discard(queue)
                if not subs:
                    del self._subs[workflow_id]

    def close(self) -> None:
        """Shutting down: every subscriber gets a last ``shutdown`` event and should end."""
        for workflow_id in list(self._subs):
            self.deliver(workflow_id, "shutdown", {})

    def watched(self) -> list[str]:
        """The workflows someone here follows."""
        return list(self._subs)

    def watches(self, workflow_id: str) -> bool:
        return workflow_id in self._subs

    def publish(self, workflow_id: str, name: EventName, data: dict[str, Any]) -> None:
        """An event of the workflow, for its subscribers wherever they are, and the log."""
        event_id = None
        if self.journal is not None:
            event_id = self.journal.next_id()
            self.journal.record(workflow_id, event_id, name, data)
        self.deliver(workflow_id, name, data, event_id)
        if self.relay is not None:
            self.relay(workflow_id, name, data, event_id)
        if name == "status" and self.on_status is not None:
            self.on_status()

    def deliver(
        self, workflow_id: str, name: EventName, data: dict[str, Any], event_id: str | None = None
    ) -> None:
        """An event for this control plane's subscribers only."""
        event = Event(name, data, event_id)
        for queue in self._subs.get(workflow_id, ()):
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(event)


def iso(value: datetime | None) -> str | None:
    return None if value is None else as_utc(value).isoformat().replace("+00:00", "Z")


def status_event(wf: Workflow | WorkflowState) -> dict[str, Any]:
    return {
        "id": wf.id,
        "status": wf.status,
        "attempt": wf.attempt,
        "queue_number": wf.queue_number,
        "progress": wf.progress,
        "runner_id": wf.runner_id,
        "updated_at": iso(wf.updated_at),
    }


def cause_event(wf: Workflow | WorkflowState) -> dict[str, Any]:
    """Why the workflow failed or is invalid: its error, whose fault, every attempt's reason."""
    return {
        "error_node": wf.error_node,
        "exception_type": wf.exception_type,
        "exception_message": wf.exception_message,
        "node_errors": wf.node_errors,
        "failure_reason": wf.failure_reason,
        "attempts": wf.attempt_log,
    }


def output_event(out: Output) -> dict[str, Any]:
    return {
        "id": out.id,
        "workflow_id": out.workflow_id,
        "node_id": out.node_id,
        "filename": out.filename,
        "kind": out.kind,
        "content_type": out.content_type,
        "size": out.size_bytes,
        "sha256": out.sha256,
        "src": f"/v1/output/{out.id}",
    }
