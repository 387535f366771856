"""What a finished prompt produced, read from its ``/history`` entry.

ComfyUI keys each output node's results by kind: ``images``, ``gifs``, ``video``/``videos``,
``audio``, ``3d``, ``latents`` ... and custom nodes invent more. Any list of objects with a
``filename`` is a file to collect; ``text`` lists are text outputs. Nothing is left out
because its kind is unfamiliar.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class OutputFile:
    node_id: str
    kind: str
    filename: str
    subfolder: str
    folder_type: str  # ComfyUI's "type": output, temp or input


def collect_outputs(outputs: dict[str, Any]) -> tuple[list[OutputFile], dict[str, list[str]]]:
    """``(files, texts)`` from a history entry's ``outputs``; files in node order, each once."""
    files: list[OutputFile] = []
    texts: dict[str, list[str]] = {}
    seen: set[tuple[str, str, str, str]] = set()
    for node_id, results in outputs.items():
        if not isinstance(results, dict):
            continue
        for kind, items in results.items():
            if not isinstance(items, list):
                continue
            if kind == "text":
                texts.setdefault(str(node_id), []).extend(
                    item if isinstance(item, str) else str(item) for item in items
                )
                continue
            for item in items:
                if not isinstance(item, dict) or not isinstance(item.get("filename"), str):
                    continue
                found = OutputFile(
                    node_id=str(node_id),
                    kind=kind,
                    filename=item["filename"],
                    subfolder=str(item.get("subfolder") or ""),
                    folder_type=str(item.get("type") or "output"),
                )
                key = (found.node_id, found.folder_type, found.subfolder, found.filename)
                if key not in seen:
                    seen.add(key)
                    files.append(found)
    return files, texts
