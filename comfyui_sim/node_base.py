"""What a simulated node is: its declared inputs and outputs, and how it runs.

A node class describes itself the way ComfyUI's ``/object_info`` does (the description is
rendered by :mod:`comfyui_sim.object_info`, checked by :mod:`comfyui_sim.validation`) and
implements :meth:`Node.run`, which gets resolved input values as keyword arguments.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .paths import SimPaths

# Hidden inputs SaveImage-like nodes declare; ComfyUI fills them from the prompt itself.
HIDDEN_PROMPT_INFO: dict[str, str] = {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}


@dataclass(frozen=True)
class InputSpec:
    """One declared input: ``[kind]`` or ``[kind, extra]`` in ``/object_info``.

    ``kind`` is a type name ("INT", "IMAGE", "*", "COMBO") or, for the classic combo
    style, the list of options itself.
    """

    kind: str | list[str]
    extra: dict[str, Any] | None = None

    def as_json(self) -> list[Any]:
        return [self.kind] if self.extra is None else [self.kind, self.extra]

    @property
    def options(self) -> dict[str, Any]:
        return self.extra or {}

    def config(self) -> list[Any]:
        """The ``input_config`` ComfyUI puts in validation errors: always ``[kind, {...}]``."""
        return [self.kind, self.options]

    def combo_options(self) -> list[Any] | None:
        if isinstance(self.kind, list):
            return self.kind
        if self.kind == "COMBO":
            return list(self.options.get("options", []))
        return None


InputSections = dict[str, dict[str, InputSpec]]


@dataclass
class NodeOutput:
    """Output values by socket index, and what the UI (and history) gets, if anything."""

    values: tuple[Any, ...] = ()
    ui: dict[str, list[Any]] | None = None


ProgressFn = Callable[[int, int, bytes | None], Awaitable[None]]


@dataclass
class NodeContext:
    """What a running node may know about the prompt and the server."""

    node_id: str
    prompt: dict[str, Any]
    extra_data: dict[str, Any]
    paths: SimPaths
    # progress(value, total, preview_png): ComfyUI's progress-bar hook.
    progress: ProgressFn
    hidden: dict[str, Any] = field(default_factory=dict)


class Node(ABC):
    """Base of every simulated node class. Class attributes mirror ComfyUI's."""

    class_type: ClassVar[str]
    display_name: ClassVar[str | None]
    category: ClassVar[str]
    python_module: ClassVar[str]
    description: ClassVar[str] = ""
    output_node: ClassVar[bool] = False
    return_types: ClassVar[tuple[str, ...]] = ()
    # Defaults to return_types, as in ComfyUI.
    return_names: ClassVar[tuple[str, ...] | None] = None
    # None: the class does not publish output_tooltips at all (most classic nodes).
    output_tooltips: ClassVar[tuple[str | None, ...] | None] = None
    # Nodes written against ComfyUI's newer node API publish a few extra keys.
    v3_schema: ClassVar[bool] = False
    hidden: ClassVar[dict[str, str]] = {}
    # Inputs a node checks itself (ComfyUI's VALIDATE_INPUTS): no combo/min/max check.
    self_validated: ClassVar[tuple[str, ...]] = ()

    @classmethod
    @abstractmethod
    def input_types(cls, paths: SimPaths) -> InputSections:
        """{"required": {...}, "optional": {...}}; may look at the disk (LoadImage)."""

    @classmethod
    def check_inputs(cls, paths: SimPaths, values: dict[str, Any]) -> bool | str:
        """ComfyUI's VALIDATE_INPUTS: True, or False / a reason."""
        return True

    @classmethod
    def fingerprint(cls, paths: SimPaths, inputs: dict[str, Any]) -> Any:
        """ComfyUI's IS_CHANGED: a value that changes when the node must rerun although
        its inputs did not (a file's contents, the clock). Runs in a worker thread."""
        return None

    # ``*args: Any, **inputs: Any`` is mypy's spelling of "any parameters": each node
    # declares its own inputs as keyword-only parameters, which a plain ``**inputs``
    # here would reject as an incompatible override. The executor only passes keywords.
    @abstractmethod
    async def run(self, ctx: NodeContext, *args: Any, **inputs: Any) -> NodeOutput:
        """Execute the node on its inputs (the names of its INPUT_TYPES)."""
