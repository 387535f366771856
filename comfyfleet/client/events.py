"""A workflow's event stream (``GET /v1/workflow/{id}/subscribe``, server-sent events): the
parsed events and the bookkeeping both clients share to resume a broken stream."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

# The states a workflow does not leave (but for a rerun, which starts a new attempt).
TERMINAL = frozenset({"completed", "failed", "cancelled", "invalid"})

# A stream is silent between changes but for a keepalive every 15 s: this long without a
# byte means the connection is gone.
STREAM_READ_TIMEOUT_S = 60.0
_MAX_RECONNECTS = 5


@dataclass(frozen=True)
class Event:
    """One event: ``status``, ``node`` (with ``progress``), ``output`` or ``cause``."""

    name: str
    data: dict[str, Any]
    id: str | None = None

    @property
    def status(self) -> str | None:
        return str(self.data["status"]) if self.name == "status" and "status" in self.data else None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


@dataclass
class SseParser:
    """Lines in, events out, as the EventSource standard reads a stream."""

    _name: str = ""
    _data: list[str] = field(default_factory=list)
    _id: str | None = None

    def feed(self, line: str) -> Event | None:
        """The event a blank line completes, if any."""
        if not line:
            return self._dispatch()
        if line.startswith(":"):  # a comment: the server's keepalive
            return None
        key, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if key == "event":
            self._name = value
        elif key == "data":
            self._data.append(value)
        elif key == "id":
            self._id = value
        return None

    def _dispatch(self) -> Event | None:
        name, lines, event_id = self._name or "message", self._data, self._id
        self._name, self._data, self._id = "", [], None
        if not lines:
            return None
        raw = "\n".join(lines)
        try:
            data = json.loads(raw)
        except ValueError:
            data = {"text": raw}
        return Event(name, data if isinstance(data, dict) else {"value": data}, event_id)


class Resume:
    """Where a followed stream is: the last event id it got (sent back as
    ``Last-Event-ID`` on a reconnect, so that nothing is missed or told twice), whether it
    has reached the end, and how many reconnects in a row have failed."""

    def __init__(self, last_event_id: str | None = None) -> None:
        self.last_event_id = last_event_id
        self.ended = False
        self._failures = 0

    def headers(self) -> dict[str, str]:
        headers = {"Accept": "text/event-stream"}
        if self.last_event_id:
            headers["Last-Event-ID"] = self.last_event_id
        return headers

    def seen(self, event: Event) -> None:
        if event.id is not None:
            self.last_event_id = event.id
        self._failures = 0
        if event.terminal:
            self.ended = True

    def again(self) -> float | None:
        """After a stream broke or ended early: the pause before reconnecting, or ``None``
        once too many attempts in a row have failed."""
        self._failures += 1
        if self._failures > _MAX_RECONNECTS:
            return None
        return min(0.2 * 2.0 ** (self._failures - 1), 3.0)
