"""Which node runs next: ComfyUI's topological order and its "UX friendly" choice.

Only the requested output nodes and what they need are scheduled; a cached node's
ancestors are not. Among the nodes that are ready, an output node goes first, then a node
feeding an output node, then one two steps away, else the first ready one.
"""

from __future__ import annotations

from collections.abc import Callable


class DependencyCycleError(Exception):
    pass


class ExecutionList:
    def __init__(
        self,
        links: dict[str, list[tuple[str, int]]],
        is_cached: Callable[[str], bool],
        is_output: Callable[[str], bool],
    ) -> None:
        # links: node id -> (source node id, socket) of each of its linked inputs.
        self._links = links
        self._is_cached = is_cached
        self._is_output = is_output
        self._pending: dict[str, None] = {}
        self._block_count: dict[str, int] = {}
        # Insertion-ordered like ComfyUI's dicts, so the choice among ready nodes is stable.
        self._blocking: dict[str, dict[str, None]] = {}

    def add_node(self, node_id: str) -> None:
        stack = [node_id]
        edges: list[tuple[str, str]] = []
        while stack:
            current = stack.pop()
            if current in self._pending:
                continue
            self._pending[current] = None
            self._block_count[current] = 0
            self._blocking[current] = {}
            for source, _socket in self._links.get(current, []):
                if not self._is_cached(source):
                    stack.append(source)
                edges.append((source, current))
        for source, target in edges:
            # A cached source is available already: it blocks nothing.
            if self._is_cached(source):
                continue
            if source not in self._pending:
                self.add_node(source)
            if target not in self._blocking[source]:
                self._blocking[source][target] = None
                self._block_count[target] += 1

    def is_empty(self) -> bool:
        return not self._pending

    def next_node(self) -> str:
        ready = [n for n in self._pending if self._block_count[n] == 0]
        if not ready:
            raise DependencyCycleError("Dependency cycle detected")
        for node_id in ready:
            if self._is_output(node_id):
                return node_id
        for node_id in ready:
            if any(self._is_output(b) for b in self._blocking[node_id]):
                return node_id
        for node_id in ready:
            for blocked in self._blocking[node_id]:
                if any(self._is_output(b) for b in self._blocking[blocked]):
                    return node_id
        return ready[0]

    def blocked_node(self) -> str | None:
        """Some pending node, for reporting a cycle."""
        return next(iter(self._pending), None)

    def complete(self, node_id: str) -> None:
        del self._pending[node_id]
        for blocked in self._blocking.pop(node_id, {}):
            self._block_count[blocked] -= 1
        self._block_count.pop(node_id, None)
