"""What a workflow needs from a runner's ComfyUI (node classes, model files) and what a
runner lacks of it. The rule for model inputs mirrors ``protocol.comfy_types.model_files``:
an input whose name ends in ``_name`` on a class whose name contains "Loader"."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from protocol.placeholders import find_placeholders, parse_value, substitute


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
    input_types: dict[str, dict[str, str]] = field(default_factory=dict)
    combo_options: dict[str, dict[str, list[str]]] = field(default_factory=dict)

    @classmethod
    def of(cls, comfyui: dict[str, Any] | None) -> Offers | None:
        """``None`` when the runner has never said what it has."""
        if not comfyui or not comfyui.get("node_classes"):
            return None
        models = {name: frozenset(files) for name, files in (comfyui.get("models") or {}).items()}
        return cls(
            frozenset(comfyui["node_classes"]),
            models,
            comfyui.get("input_types") or {},
            comfyui.get("combo_options") or {},
        )

    @property
    def dispatch_key(self) -> tuple[frozenset[str], frozenset[tuple[str, frozenset[str]]]]:
        """What :func:`can_run` reads: runners equal in it run the same workflows."""
        return self.node_classes, frozenset(self.models.items())


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


def can_run(need: Needs, offers: Offers | None) -> bool:
    """``not missing(need, offers)`` without the phrases: dispatch asks it of every free
    runner, and a large fleet has thousands."""
    if offers is None:
        return True
    if not need.node_classes <= offers.node_classes:
        return False
    return all(file in offers.models.get(name, ()) for name, file in need.models)


def check_values(workflow: dict[str, Any], values: dict[str, str], offers: list[Offers]) -> None:
    """Convert the text and choice values to the types the runners' ComfyUI declares for
    their inputs (INT, FLOAT, BOOLEAN) and check values aimed at a COMBO input against its
    options, so that a bad value is a 400 now rather than an ``invalid`` workflow later.
    Raises ValueError with a message naming the node, the input and what it wanted."""
    types: dict[str, dict[str, str]] = {}
    options: dict[str, dict[str, list[str]]] = {}
    for offer in offers:  # the first runner that knows a class speaks for it
        for class_type, inputs in offer.input_types.items():
            types.setdefault(class_type, inputs)
        for class_type, combos in offer.combo_options.items():
            options.setdefault(class_type, combos)
    if not types:
        return
    seeds = itertools.count(1)
    # Conversion as the agent will do it; generated values and file names do not matter here.
    files = {o.name: o.name for o in find_placeholders(workflow) if o.kind == "file" and o.name}
    substitute(workflow, values, files, random_source=lambda: next(seeds), timestamp_ms=0, input_types=types)
    for occ in find_placeholders(workflow):
        if occ.kind not in ("text", "choice") or occ.name not in values:
            continue
        class_type = workflow[occ.node_id].get("class_type")
        allowed = options.get(class_type, {}).get(occ.input_name)
        is_combo = types.get(class_type, {}).get(occ.input_name) == "COMBO"
        if is_combo and allowed is not None and values[occ.name] not in allowed:
            shown = ", ".join(allowed[:20]) + (" …" if len(allowed) > 20 else "")
            raise ValueError(
                f"node {occ.node_id} input '{occ.input_name}': {values[occ.name]!r} is not one of {shown}"
            )
