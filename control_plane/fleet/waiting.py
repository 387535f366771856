"""The workflows waiting for a runner, held in memory by what dispatch needs to decide: no
workflow JSON, and what each needs from a ComfyUI worked out once when it starts waiting.

The database stays the truth: a workflow is given to a runner only by the store's conditional
claim, and one whose row moved on (cancelled, expired, claimed elsewhere) fails that claim and
leaves the index. The index is filled from the database when the control plane starts, and
then by whoever makes a workflow wait: a submission, a retry, a rerun, a job that never
reached its runner."""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

from control_plane.db.tables import Workflow, as_utc
from control_plane.fleet.capabilities import Needs, needs
from control_plane.model.lifecycle import WorkflowStatus
from control_plane.model.params import WorkflowParams

# The order of turns: highest priority first (so the negated priority), then oldest first,
# ties by id (never by chance).
_Key = tuple[int, datetime, str]


@dataclass(frozen=True)
class Waiting:
    """One waiting attempt of a workflow, as dispatch sees it."""

    id: str
    account_id: str
    tags: tuple[str, ...]
    tag_index: str
    attempt: int
    priority: int
    created_at: datetime
    updated_at: datetime
    not_before: datetime | None
    timeout_s: int
    queue_timeout_s: int
    need: Needs
    preferred_runner_id: str | None
    avoid_runner_ids: frozenset[str]
    min_gpu_free_bytes: int | None

    @classmethod
    def of(cls, wf: Workflow, need: Needs | None = None) -> Waiting:
        """``need`` spares reading the graph again (it must have been loaded otherwise)."""
        if need is None:
            need = needs(wf.workflow_json, WorkflowParams.of(wf.workflow_params).values)
        return cls(
            id=wf.id,
            account_id=wf.account_id,
            tags=tuple(wf.tags),
            tag_index=wf.tag_index,
            attempt=wf.attempt,
            priority=wf.priority,
            created_at=as_utc(wf.created_at),
            updated_at=as_utc(wf.updated_at),
            not_before=as_utc(wf.not_before) if wf.not_before is not None else None,
            timeout_s=wf.timeout_s,
            queue_timeout_s=wf.queue_timeout_s,
            need=need,
            preferred_runner_id=wf.preferred_runner_id,
            avoid_runner_ids=frozenset(wf.avoid_runner_ids),
            min_gpu_free_bytes=wf.min_gpu_free_bytes,
        )

    @property
    def key(self) -> _Key:
        return (-self.priority, self.created_at, self.id)

    @property
    def plain(self) -> bool:
        """Asks nothing of one runner in particular: any eligible free runner will do, so a
        round that found none for one such workflow need not look again for its like."""
        return (
            self.preferred_runner_id is None and self.min_gpu_free_bytes is None and not self.avoid_runner_ids
        )


def waits(wf: Workflow) -> bool:
    return wf.status == WorkflowStatus.ACCEPTED and wf.runner_id is None


class WaitingIndex:
    def __init__(self) -> None:
        self._by_id: dict[str, Waiting] = {}
        # Per account and tag set (the workflows that compete for the same runners).
        self._queues: dict[tuple[str, str], list[_Key]] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, workflow_id: str) -> bool:
        return workflow_id in self._by_id

    def add(self, entry: Waiting) -> None:
        self.discard(entry.id)
        self._by_id[entry.id] = entry
        bisect.insort(self._queues.setdefault((entry.account_id, entry.tag_index), []), entry.key)

    def discard(self, workflow_id: str) -> None:
        entry = self._by_id.pop(workflow_id, None)
        if entry is None:
            return
        queue_key = (entry.account_id, entry.tag_index)
        queue = self._queues[queue_key]
        _remove(queue, entry.key)
        if not queue:
            del self._queues[queue_key]

    def get(self, workflow_id: str) -> Waiting | None:
        return self._by_id.get(workflow_id)

    def queues(self) -> list[tuple[Waiting, list[_Key]]]:
        """Each queue (account and tag set) with its first workflow, which says whose it is
        and what tags it asks for, and a copy of its order: dispatch changes the index while
        it walks it."""
        return [(self._by_id[keys[0][2]], list(keys)) for keys in self._queues.values()]

    def in_turn(self, queues: list[list[_Key]]) -> Iterator[Waiting]:
        """The workflows of these queues in turn across them (priority, then age); any that
        left the index meanwhile (dispatched, cancelled) are passed over."""
        for key in heapq.merge(*queues):
            entry = self._by_id.get(key[2])
            if entry is not None and entry.key == key:
                yield entry

    def position(self, workflow_id: str) -> int | None:
        """From 1, among the waiting workflows of its account with the same tags, in the
        order they are dispatched."""
        entry = self._by_id.get(workflow_id)
        if entry is None:
            return None
        return bisect.bisect_left(self._queues[(entry.account_id, entry.tag_index)], entry.key) + 1


def _remove(keys: list[_Key], key: _Key) -> None:
    at = bisect.bisect_left(keys, key)
    if at < len(keys) and keys[at] == key:
        del keys[at]
