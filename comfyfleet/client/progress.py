"""A workflow's progress as its events tell it, folded into one small state: what a progress
bar or a log line shows (status, queue position, current node, percent)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from comfyfleet.client.events import Event


@dataclass(frozen=True)
class Progress:
    workflow_id: str
    status: str = "accepted"
    attempt: int = 1
    queue_number: int | None = None
    node_id: str | None = None
    class_type: str | None = None
    fraction: float | None = None  # 0..1 over the whole prompt, as the runner reports it
    outputs: int = 0
    cause: dict[str, Any] | None = field(default=None, compare=False)

    @property
    def percent(self) -> int | None:
        return None if self.fraction is None else round(max(0.0, min(1.0, self.fraction)) * 100)

    @property
    def node(self) -> str | None:
        if self.node_id is None:
            return None
        return f"{self.node_id} ({self.class_type})" if self.class_type else self.node_id

    def after(self, event: Event) -> Progress:
        """This progress once ``event`` happened."""
        data = event.data
        if event.name == "status":
            return self._status(data)
        if event.name == "node":
            return self._node(data)
        if event.name == "output":
            return replace(self, outputs=self.outputs + 1)
        if event.name == "cause":
            return replace(self, cause=data)
        return self

    def _status(self, data: dict[str, Any]) -> Progress:
        status = str(data.get("status", self.status))
        attempt = int(data.get("attempt") or self.attempt)
        fraction = data.get("progress")
        changes: dict[str, Any] = {
            "status": status,
            "attempt": attempt,
            "queue_number": data.get("queue_number"),
        }
        if attempt != self.attempt:  # a new attempt starts over
            changes.update(node_id=None, class_type=None, fraction=None, outputs=0)
        if isinstance(fraction, int | float):
            changes["fraction"] = float(fraction)
        if status == "completed":
            changes.update(fraction=1.0, node_id=None, class_type=None)
        return replace(self, **changes)

    def _node(self, data: dict[str, Any]) -> Progress:
        changes: dict[str, Any] = {}
        if data.get("node_id") is not None:
            changes["node_id"] = str(data["node_id"])
            changes["class_type"] = data.get("class_type") or (
                self.class_type if changes["node_id"] == self.node_id else None
            )
        if isinstance(data.get("progress"), int | float):
            changes["fraction"] = float(data["progress"])
        return replace(self, **changes)

    def line(self) -> str:
        """One line of plain text: what changed shows as a new line."""
        parts = [self.status]
        if self.attempt > 1:
            parts.append(f"attempt {self.attempt}")
        if self.queue_number is not None and self.status in ("accepted", "uploaded", "queued"):
            parts.append(f"queue position {self.queue_number}")
        if self.node is not None and self.status == "running":
            parts.append(f"node {self.node}")
        if self.percent is not None:
            parts.append(f"{self.percent}%")
        return "  ".join(parts)
