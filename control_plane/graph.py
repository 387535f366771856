"""The node graph of a ComfyUI API-format workflow: which nodes feed which."""

from __future__ import annotations

from typing import Any


def links(workflow: dict[str, Any]) -> dict[str, set[str]]:
    """node id -> the ids of the nodes that consume its outputs."""
    consumers: dict[str, set[str]] = {node_id: set() for node_id in workflow}
    for node_id, node in workflow.items():
        inputs = node.get("inputs", {}) if isinstance(node, dict) else {}
        for value in inputs.values():
            # A link is [source_node_id, output_index]; anything else is a literal.
            if isinstance(value, list) and len(value) == 2 and isinstance(value[1], int):
                source = str(value[0])
                if source in consumers:
                    consumers[source].add(node_id)
    return consumers


def downstream(workflow: dict[str, Any], start: str) -> set[str]:
    """``start`` and every node that depends on it, directly or not."""
    consumers = links(workflow)
    seen = {start}
    stack = [start]
    while stack:
        for nxt in consumers.get(stack.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen
