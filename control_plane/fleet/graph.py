"""The node graph of a ComfyUI API-format workflow: its shape, and which nodes feed which."""

from __future__ import annotations

from typing import Any

from control_plane.model.errors import BadRequest

# Far more than any real workflow has; what the checks at submit cost stays small.
MAX_NODES = 5000


def check_graph(workflow: dict[str, Any]) -> None:
    """400 unless every node is ``{"class_type": str, "inputs": {...}}`` and every list among
    the inputs is a link ``[node id, output index]`` to a node of the workflow (ComfyUI reads
    any list input as a link), before anything else looks at the graph."""
    if len(workflow) > MAX_NODES:
        raise BadRequest(f"a workflow has at most {MAX_NODES} nodes; this one has {len(workflow)}")
    for node_id, node in workflow.items():
        if not isinstance(node, dict):
            raise BadRequest(f"node {node_id} must be an object with class_type and inputs")
        class_type = node.get("class_type")
        if not isinstance(class_type, str) or not class_type:
            raise BadRequest(f"node {node_id}: class_type must be a non-empty string")
        inputs = node.get("inputs", {})
        if not isinstance(inputs, dict):
            raise BadRequest(f"node {node_id}: inputs must be an object")
        for name, value in inputs.items():
            if isinstance(value, list):
                _check_link(workflow, node_id, name, value)


def _check_link(workflow: dict[str, Any], node_id: str, name: str, link: list[Any]) -> None:
    well_formed = (
        len(link) == 2
        and isinstance(link[0], str | int)
        and not isinstance(link[0], bool)
        and isinstance(link[1], int)
        and not isinstance(link[1], bool)
        and link[1] >= 0
    )
    if not well_formed:
        raise BadRequest(
            f"node {node_id} input {name!r}: a link is [node id, output index], not {link!r}"[:300]
        )
    if str(link[0]) not in workflow:
        raise BadRequest(f"node {node_id} input {name!r} links to node {link[0]}, which the workflow lacks")


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
