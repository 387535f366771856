"""ComfyUI's default ("classic") output cache.

A node's cache key is its signature: class_type, the node's fingerprint (IS_CHANGED),
and its inputs, with every link replaced by the signature of the node it comes from. Node
ids take no part, so a renamed but otherwise identical graph is still cached. At the
start of each prompt every entry whose key the new prompt does not contain is dropped:
the cache holds the most recent prompt's nodes only (run A, then B, then A again, and A
recomputes everything).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .paths import SimPaths
from .registry import NODE_CLASSES


def is_link(value: Any) -> bool:
    """``["node id", output index]``: ComfyUI's test for a link."""
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], int | float)
        and not isinstance(value[1], bool)
    )


def _stable(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=repr)


def compute_signatures(prompt: dict[str, Any], paths: SimPaths) -> dict[str, str]:
    """node id -> signature digest, for every node of the prompt. Calls fingerprints
    (LoadImage hashes its file), so run it in a worker thread."""
    done: dict[str, str] = {}
    visiting: set[str] = set()

    def signature(node_id: str) -> str:
        if node_id in done:
            return done[node_id]
        node = prompt.get(node_id)
        if not isinstance(node, dict) or node_id in visiting:
            # A missing node or a cycle can never be served from the cache.
            return f"uncacheable:{uuid.uuid4()}"
        visiting.add(node_id)
        cls = NODE_CLASSES[node["class_type"]]
        inputs = node.get("inputs", {})
        parts: list[Any] = [node["class_type"], _stable(cls.fingerprint(paths, inputs))]
        for key in sorted(inputs):
            value = inputs[key]
            if is_link(value):
                parts.append([key, "link", signature(value[0]), value[1]])
            else:
                parts.append([key, "value", _stable(value)])
        visiting.discard(node_id)
        digest = hashlib.sha256(_stable(parts).encode()).hexdigest()
        done[node_id] = digest
        return digest

    return {node_id: signature(node_id) for node_id in prompt}


@dataclass
class CachedNode:
    values: tuple[Any, ...]
    # {"output": ..., "meta": ...} for nodes that showed something, else None.
    ui: dict[str, Any] | None


class OutputCache:
    def __init__(self) -> None:
        self._entries: dict[str, CachedNode] = {}

    def keep_only(self, signatures: Iterable[str]) -> None:
        wanted = set(signatures)
        for key in [k for k in self._entries if k not in wanted]:
            del self._entries[key]

    def get(self, signature: str) -> CachedNode | None:
        return self._entries.get(signature)

    def put(self, signature: str, entry: CachedNode) -> None:
        self._entries[signature] = entry

    def __len__(self) -> int:
        return len(self._entries)
