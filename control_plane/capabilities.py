"""What a workflow needs from a runner's ComfyUI (node classes, model files) and what a
runner lacks of it. The rule for model inputs mirrors ``protocol.comfy_types.model_files``:
an input whose name ends in ``_name`` on a class whose name contains "Loader"."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from protocol.placeholders import parse_value


@dataclass(frozen=True)
class Needs:
    node_classes: frozenset[str]
    # (loader input name, file), e.g. ("ckpt_name", "sdxl.safetensors")
    models: frozenset[tuple[str, str]] = field(default_factory=frozenset)

    @property
    def model_files(self) -> frozenset[str]:
        return frozenset(f for _, f in self.models)


def needs(workflow: dict[str, Any], values: dict[str, str]) -> Needs:
    """``values``: the text and choice values of this run (a model may be a parameter)."""
    classes: set[str] = set()
    models: set[tuple[str, str]] = set()
    for node in workflow.values():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
            continue
        class_type = node["class_type"]
        classes.add(class_type)
        if "Loader" not in class_type:
            continue
        for name, value in (node.get("inputs") or {}).items():
            if not name.endswith("_name") or not isinstance(value, str):
                continue
            parsed = parse_value(value)
            if parsed is not None:
                if parsed.name is None or parsed.name not in values:
                    continue
                value = values[parsed.name]
            models.add((name, value))
    return Needs(frozenset(classes), frozenset(models))


@dataclass(frozen=True)
class Offers:
    """What one runner's ComfyUI has, as sets: built once per connection, asked often."""

    node_classes: frozenset[str]
    models: dict[str, frozenset[str]]

    @classmethod
    def of(cls, comfyui: dict[str, Any] | None) -> Offers | None:
        """``None`` when the runner has never said what it has."""
        if not comfyui or not comfyui.get("node_classes"):
            return None
        models = {name: frozenset(files) for name, files in (comfyui.get("models") or {}).items()}
        return cls(frozenset(comfyui["node_classes"]), models)


def missing(need: Needs, offers: Offers | None) -> list[str] | None:
    """What the runner's ComfyUI lacks, as readable phrases; ``None`` when the runner has
    never said what it has (it may well have everything)."""
    if offers is None:
        return None
    lacks: list[str] = []
    absent_classes = sorted(need.node_classes - offers.node_classes)
    if absent_classes:
        lacks.append(f"node classes {', '.join(absent_classes)}")
    absent_models = sorted(
        f"{name}={file}" for name, file in need.models if file not in offers.models.get(name, frozenset())
    )
    if absent_models:
        lacks.append(f"models {', '.join(absent_models)}")
    return lacks
