"""The free runners of one class, kept in the order dispatch prefers them.

Within a class (see ``registry.RunnerClass``) runners differ only in load and in which models
their last job left warm. Dispatch wants the one warm with the models a workflow names, then
the least loaded, then the longest connected. Walking ten thousand free runners for that on
every dispatch cost ~10 ms a workflow on a 2-core machine; here the members warm with the
same models share a heap ordered by load, so a pick looks at one entry per set of warm
models.

A member's load changes with its heartbeats and jobs; the heap is not re-sorted then: the
member gets a new entry with a new sequence number and the old one goes stale, dropped when it
reaches the top or when stale entries outnumber the live ones.
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable
from typing import Generic, TypeVar

C = TypeVar("C", bound=Hashable)
# What orders runners of one class: jobs held, GPU use in %, connected at (wall clock).
LoadKey = tuple[int, float, float]


class _Warm(Generic[C]):
    """The members warm with the same models; ``members`` maps each to its live entry's seq."""

    __slots__ = ("heap", "members")

    def __init__(self) -> None:
        self.members: dict[C, int] = {}
        self.heap: list[tuple[LoadKey, int, C]] = []

    def push(self, member: C, key: LoadKey, seq: int) -> None:
        self.members[member] = seq
        heapq.heappush(self.heap, (key, seq, member))
        if len(self.heap) > 2 * len(self.members) + 32:
            self.heap = [entry for entry in self.heap if self.members.get(entry[2]) == entry[1]]
            heapq.heapify(self.heap)

    def top(self) -> tuple[LoadKey, int, C] | None:
        heap, members = self.heap, self.members
        while heap and members.get(heap[0][2]) != heap[0][1]:
            heapq.heappop(heap)
        return heap[0] if heap else None


class FreeRunners(Generic[C]):
    """Members by the models they have warm, each group least loaded first. The caller says
    which group a member is in (its warm models when it was added) and its load, and adds it
    again whenever either changes."""

    def __init__(self) -> None:
        self._by_warm: dict[frozenset[str], _Warm[C]] = {}
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def add(self, member: C, warm: frozenset[str], key: LoadKey, seq: int) -> None:
        """File ``member`` under ``warm`` with load ``key``; ``seq`` grows with every call."""
        group = self._by_warm.get(warm)
        if group is None:
            group = self._by_warm[warm] = _Warm()
        if member not in group.members:
            self._size += 1
        group.push(member, key, seq)

    def discard(self, member: C, warm: frozenset[str]) -> None:
        group = self._by_warm.get(warm)
        if group is None or group.members.pop(member, None) is None:
            return
        self._size -= 1
        if not group.members:
            del self._by_warm[warm]

    def best(self, wanted: frozenset[str]) -> C | None:
        """The member warm with every model in ``wanted`` (if any is), least loaded, longest
        connected; ties go to the one filed first."""
        best: tuple[tuple[bool, LoadKey, int], C] | None = None
        for warm, group in self._by_warm.items():
            top = group.top()
            if top is None:
                continue
            rank = (bool(wanted) and not wanted <= warm, top[0], top[1])
            if best is None or rank < best[0]:
                best = (rank, top[2])
        return None if best is None else best[1]
