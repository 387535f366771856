"""Reading ComfyUI's ``GET /object_info``: input types, combo options, model files.

Each node class declares its inputs under ``input.required`` and ``input.optional`` as
``name: spec``. A spec is ``[TYPE, {...}]`` or ``[TYPE]`` where TYPE is a string ("INT",
"FLOAT", "BOOLEAN", "STRING", a link type such as "IMAGE"), or a combo: the options list
itself (``[[options], {...}]``) or, in newer ComfyUI, ``["COMBO", {"options": [...]}]``.
``input.hidden`` holds values ComfyUI fills in itself (prompt, unique_id): never a workflow
input, so it is left out here. Malformed entries are skipped rather than fatal: one odd
custom node must not hide what every other class offers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

__all__ = ["combo_options", "input_types", "model_files"]

_SECTIONS = ("required", "optional")


def _specs(object_info: dict[str, Any]) -> Iterator[tuple[str, str, list[Any]]]:
    """(class_type, input name, spec) for every well-formed workflow input."""
    for class_type, info in object_info.items():
        if not isinstance(info, dict) or not isinstance(info.get("input"), dict):
            continue
        for section in _SECTIONS:
            inputs = info["input"].get(section)
            if not isinstance(inputs, dict):
                continue
            for name, spec in inputs.items():
                if isinstance(spec, list | tuple) and spec:
                    yield class_type, name, list(spec)


def _type_of(spec: list[Any]) -> str | None:
    head = spec[0]
    if isinstance(head, list):
        return "COMBO"
    return head if isinstance(head, str) else None


def _options_of(spec: list[Any]) -> list[str] | None:
    """A combo's options as strings (a few API nodes offer numbers), else None."""
    head = spec[0]
    if isinstance(head, list):
        raw = head
    elif head == "COMBO":
        extra = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        # A combo filled at run time by the frontend (LoadImageOutput) lists no options.
        options = extra.get("options")
        raw = options if isinstance(options, list) else []
    else:
        return None
    return [str(option) for option in raw]


def input_types(object_info: dict[str, Any]) -> dict[str, dict[str, str]]:
    """class_type -> input name -> "INT" | "FLOAT" | "BOOLEAN" | "STRING" | "COMBO" | link
    type, the shape :func:`protocol.placeholders.substitute` takes."""
    types: dict[str, dict[str, str]] = {}
    for class_type, name, spec in _specs(object_info):
        kind = _type_of(spec)
        if kind is not None:
            types.setdefault(class_type, {})[name] = kind
    return types


def combo_options(object_info: dict[str, Any]) -> dict[str, dict[str, list[str]]]:
    """class_type -> combo input name -> its options, in ComfyUI's order, as strings."""
    combos: dict[str, dict[str, list[str]]] = {}
    for class_type, name, spec in _specs(object_info):
        options = _options_of(spec)
        if options is not None:
            combos.setdefault(class_type, {})[name] = options
    return combos


def model_files(object_info: dict[str, Any]) -> dict[str, list[str]]:
    """Loader input name (``ckpt_name``, ``lora_name``, ``vae_name`` ...) -> the files offered.

    Taken from every combo input whose name ends in ``_name`` on a class whose name contains
    "Loader"; files offered under the same input name by several loaders are merged, sorted
    and unique. An input the runner has no file for still appears, with an empty list, so
    that "no such model" and "no such loader" stay distinguishable."""
    files: dict[str, set[str]] = {}
    for class_type, name, spec in _specs(object_info):
        if "Loader" not in class_type or not name.endswith("_name"):
            continue
        options = _options_of(spec)
        if options is not None:
            files.setdefault(name, set()).update(options)
    return {name: sorted(found) for name, found in files.items()}
