"""``GET /object_info``, rendered from the node classes themselves.

Key order follows ComfyUI's: classic nodes and nodes of the newer node API differ in where
``output_tooltips`` sits and in three extra flags at the end.
"""

from __future__ import annotations

from typing import Any

from .node_base import Node
from .paths import SimPaths
from .registry import NODE_CLASSES


def node_info(cls: type[Node], paths: SimPaths) -> dict[str, Any]:
    sections = cls.input_types(paths)
    inputs: dict[str, Any] = {
        section: {name: spec.as_json() for name, spec in specs.items()} for section, specs in sections.items()
    }
    order: dict[str, list[str]] = {section: list(specs) for section, specs in sections.items()}
    if cls.hidden:
        inputs["hidden"] = dict(cls.hidden)
        order["hidden"] = list(cls.hidden)
    outputs = list(cls.return_types)
    info: dict[str, Any] = {
        "input": inputs,
        "input_order": order,
        "output": outputs,
        "output_is_list": [False] * len(outputs),
        "output_name": list(cls.return_names or cls.return_types),
    }
    tooltips = list(cls.output_tooltips) if cls.output_tooltips is not None else None
    if cls.v3_schema:
        info["output_tooltips"] = tooltips if tooltips is not None else [None] * len(outputs)
    info.update(
        {
            "name": cls.class_type,
            "display_name": cls.display_name,
            "description": cls.description,
            "python_module": cls.python_module,
            "category": cls.category,
            "output_node": cls.output_node,
        }
    )
    if cls.v3_schema:
        info.update({"deprecated": False, "experimental": False, "api_node": False})
    elif tooltips is not None:
        info["output_tooltips"] = tooltips
    return info


def all_node_info(paths: SimPaths) -> dict[str, Any]:
    """Every class; touches the disk (LoadImage lists input/), so call it in a thread."""
    return {name: node_info(cls, paths) for name, cls in NODE_CLASSES.items()}
