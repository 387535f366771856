"""Turning ComfyUI's events about one prompt into job updates (node events and progress).

The same events can arrive twice: from the websocket while the prompt runs and again from
the history's status messages when the socket was lost. Start, cached nodes and the final
error are therefore reported once each.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from protocol.messages import JobStatus, NodeEvent

EventKind = Literal["executing", "cached", "executed", "progress", "error", "interrupted"]


@dataclass(frozen=True)
class Update:
    """The job-specific part of one JobUpdate."""

    status: JobStatus | None = None
    node: NodeEvent | None = None
    progress: float | None = None


def nodes_to_run(prompt: Mapping[str, Any], output_classes: Iterable[str] | None) -> set[str]:
    """The nodes ComfyUI will run: its output nodes and everything upstream of them. Without
    knowing which classes are outputs, every node counts."""
    outputs = set(output_classes or ())
    wanted = [
        node_id
        for node_id, node in prompt.items()
        if isinstance(node, dict) and node.get("class_type") in outputs
    ]
    if not wanted:
        return {str(node_id) for node_id in prompt}
    seen: set[str] = set()
    while wanted:
        node_id = wanted.pop()
        if node_id in seen or node_id not in prompt:
            continue
        seen.add(node_id)
        inputs = prompt[node_id].get("inputs") if isinstance(prompt[node_id], dict) else None
        for value in (inputs or {}).values():
            # A link is [source node id, output index].
            if isinstance(value, list) and len(value) == 2 and isinstance(value[1], int):
                wanted.append(str(value[0]))
    return seen


class EventTranslator:
    def __init__(self, prompt: Mapping[str, Any], to_run: set[str]) -> None:
        self._prompt = prompt
        self._total = max(1, len(to_run))
        self._finished: set[str] = set()
        self._current: str | None = None
        self._started = False
        self._cached: set[str] = set()
        self._ended = False

    def _class_type(self, node_id: str) -> str | None:
        node = self._prompt.get(node_id)
        class_type = node.get("class_type") if isinstance(node, dict) else None
        return class_type if isinstance(class_type, str) else None

    def _node(self, node_id: str, event: EventKind, data: Mapping[str, Any], **extra: float) -> NodeEvent:
        at_ms = data.get("timestamp")
        return NodeEvent(
            node_id=node_id,
            class_type=self._class_type(node_id),
            event=event,
            # executing/executed carry no time of their own: the time we heard of them.
            at_ms=at_ms if isinstance(at_ms, int) else int(time.time() * 1000),
            **extra,
        )

    def _progress(self, partial: float = 0.0) -> float:
        return min(1.0, (len(self._finished) + partial) / self._total)

    def _finish_current(self) -> None:
        if self._current is not None:
            self._finished.add(self._current)
            self._current = None

    @property
    def started(self) -> bool:
        return self._started

    def translate(self, kind: str, data: Mapping[str, Any]) -> list[Update]:
        if kind == "execution_start":
            if self._started:
                return []
            self._started = True
            return [Update(status="running", progress=0.0)]
        # Whatever arrives first, the prompt is running by now.
        updates = [] if self._started or self._ended else self.translate("execution_start", {})
        updates.extend(self._translate(kind, data))
        return updates

    def _translate(self, kind: str, data: Mapping[str, Any]) -> list[Update]:
        handler = _HANDLERS.get(kind)
        return handler(self, data) if handler is not None else []

    def _on_cached(self, data: Mapping[str, Any]) -> list[Update]:
        fresh = [str(n) for n in data.get("nodes") or [] if str(n) not in self._cached]
        self._cached.update(fresh)
        self._finished.update(fresh)
        return [Update(node=self._node(n, "cached", data), progress=self._progress()) for n in fresh]

    def _on_executing(self, data: Mapping[str, Any]) -> list[Update]:
        self._finish_current()
        node_id = data.get("node")
        if node_id is None:
            return []  # the prompt is done; its end comes from success or the history
        self._current = str(node_id)
        return [Update(node=self._node(str(node_id), "executing", data), progress=self._progress())]

    def _on_executed(self, data: Mapping[str, Any]) -> list[Update]:
        node_id = data.get("node")
        if node_id is None:
            return []
        self._finished.add(str(node_id))
        return [Update(node=self._node(str(node_id), "executed", data), progress=self._progress())]

    def _on_progress(self, data: Mapping[str, Any]) -> list[Update]:
        node_id = data.get("node")
        value, maximum = data.get("value"), data.get("max")
        if node_id is None or not isinstance(value, int | float) or not isinstance(maximum, int | float):
            return []
        partial = value / maximum if maximum > 0 else 0.0
        node = self._node(str(node_id), "progress", data, value=value, max=maximum)
        return [Update(node=node, progress=self._progress(min(partial, 1.0)))]

    def _on_success(self, data: Mapping[str, Any]) -> list[Update]:
        if self._ended:
            return []
        self._finish_current()
        self._ended = True
        return [Update(progress=1.0)]

    def _on_error(self, data: Mapping[str, Any]) -> list[Update]:
        return self._on_failure("error", data)

    def _on_interrupted(self, data: Mapping[str, Any]) -> list[Update]:
        return self._on_failure("interrupted", data)

    def _on_failure(self, event: EventKind, data: Mapping[str, Any]) -> list[Update]:
        if self._ended:
            return []
        self._ended = True
        failed = data.get("node_id")
        if failed is None:
            return []
        return [Update(node=self._node(str(failed), event, data))]


# By ComfyUI event type; other types (status, previews...) say nothing about the job.
_HANDLERS: dict[str, Callable[[EventTranslator, Mapping[str, Any]], list[Update]]] = {
    "execution_cached": EventTranslator._on_cached,
    "executing": EventTranslator._on_executing,
    "executed": EventTranslator._on_executed,
    "progress": EventTranslator._on_progress,
    "execution_success": EventTranslator._on_success,
    "execution_error": EventTranslator._on_error,
    "execution_interrupted": EventTranslator._on_interrupted,
}
