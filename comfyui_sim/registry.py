"""Every node class the simulator knows, by class_type, in ``/object_info`` order."""

from __future__ import annotations

from .node_base import Node
from .nodes_image import IMAGE_NODES
from .nodes_models import MODEL_NODES
from .nodes_output import OUTPUT_NODES
from .nodes_text import TEXT_NODES

NODE_CLASSES: dict[str, type[Node]] = {
    cls.class_type: cls for cls in (*IMAGE_NODES, *OUTPUT_NODES, *TEXT_NODES, *MODEL_NODES)
}
