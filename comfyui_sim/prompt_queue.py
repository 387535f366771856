"""Pending prompts, the running one, and the in-memory history.

Items are ComfyUI's ``[number, prompt_id, prompt, extra_data, outputs_to_execute]``; the
lowest number runs first (``front`` submissions get negative numbers). Every change calls
``on_change``, which broadcasts ``status``; as in ComfyUI, deleting the last pending prompt
goes through a wipe and so announces itself twice.
"""

from __future__ import annotations

import asyncio
import copy
import heapq
import itertools
from collections.abc import Callable
from typing import Any

MAXIMUM_HISTORY_SIZE = 10000

QueueItem = list[Any]


class PromptQueue:
    def __init__(self, on_change: Callable[[], None]) -> None:
        self._on_change = on_change
        self._heap: list[tuple[float, int, QueueItem]] = []
        self._arrival = itertools.count()
        self._task_ids = itertools.count()
        self._not_empty = asyncio.Event()
        self.running: dict[int, QueueItem] = {}
        self.history: dict[str, dict[str, Any]] = {}
        self._next_number = 0

    def take_number(self) -> int:
        number = self._next_number
        self._next_number += 1
        return number

    def put(self, item: QueueItem) -> None:
        heapq.heappush(self._heap, (item[0], next(self._arrival), item))
        self._not_empty.set()
        self._on_change()

    async def get(self) -> tuple[int, QueueItem]:
        while not self._heap:
            self._not_empty.clear()
            await self._not_empty.wait()
        _, _, item = heapq.heappop(self._heap)
        task_id = next(self._task_ids)
        self.running[task_id] = copy.deepcopy(item)
        self._on_change()
        return task_id, item

    def task_done(self, task_id: int, result: dict[str, Any]) -> None:
        """Move the running item to history with ``result`` (outputs, status, meta)."""
        item = self.running.pop(task_id)
        if len(self.history) > MAXIMUM_HISTORY_SIZE:
            self.history.pop(next(iter(self.history)))
        entry: dict[str, Any] = {"prompt": item, "outputs": {}, "status": None}
        entry.update(result)
        self.history[item[1]] = entry
        self._on_change()

    def remaining(self) -> int:
        return len(self._heap) + len(self.running)

    def snapshot(self) -> dict[str, list[QueueItem]]:
        return {
            "queue_running": copy.deepcopy(list(self.running.values())),
            "queue_pending": copy.deepcopy([entry[2] for entry in sorted(self._heap)]),
        }

    def is_running(self, prompt_id: str) -> bool:
        return any(item[1] == prompt_id for item in self.running.values())

    def running_ids(self) -> list[str]:
        return [str(item[1]) for item in self.running.values()]

    def wipe(self) -> None:
        self._heap = []
        self._on_change()

    def delete(self, prompt_id: str) -> bool:
        """Remove one pending prompt; a running one is not touched."""
        for index, entry in enumerate(self._heap):
            if entry[2][1] != prompt_id:
                continue
            if len(self._heap) == 1:
                self.wipe()
            else:
                self._heap.pop(index)
                heapq.heapify(self._heap)
            self._on_change()
            return True
        return False

    def get_history(
        self, prompt_id: str | None = None, max_items: int | None = None, offset: int = -1
    ) -> dict[str, Any]:
        if prompt_id is not None:
            entry = self.history.get(prompt_id)
            return {prompt_id: copy.deepcopy(entry)} if entry is not None else {}
        if offset < 0 and max_items is not None:
            offset = len(self.history) - max_items
        out: dict[str, Any] = {}
        for index, (key, entry) in enumerate(self.history.items()):
            if index < offset:
                continue
            out[key] = copy.deepcopy(entry)
            if max_items is not None and len(out) >= max_items:
                break
        return out
