"""In-process publish/subscribe of workflow events, feeding the SSE streams."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

# A subscriber that stops reading loses its oldest events rather than growing without bound.
_QUEUE_LIMIT = 1000


@dataclass(frozen=True)
class Event:
    name: str  # status | node | output | cause
    data: dict[str, Any]


class EventHub:
    def __init__(self) -> None:
        self._subs: dict[str, set[asyncio.Queue[Event]]] = defaultdict(set)

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
            self.publish(workflow_id, "shutdown", {})

    def publish(self, workflow_id: str, name: str, data: dict[str, Any]) -> None:
        event = Event(name, data)
        for queue in self._subs.get(workflow_id, ()):
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(event)
