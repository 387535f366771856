"""Primitive and string nodes (ComfyUI's newer node API, hence ``v3_schema``)."""

from __future__ import annotations

import asyncio
import re
from typing import Any

from .node_base import InputSections, InputSpec, Node, NodeContext, NodeOutput
from .paths import SimPaths

_I64 = 9223372036854775807


class _Primitive(Node):
    category = "utils/primitive"
    python_module = "comfy_extras.nodes_primitive"
    output_tooltips = (None,)
    v3_schema = True
    spec: InputSpec

    @classmethod
    def input_types(cls, paths: SimPaths) -> InputSections:
        return {"required": {"value": cls.spec}}

    async def run(self, ctx: NodeContext, *, value: Any) -> NodeOutput:
        return NodeOutput((value,))


class PrimitiveString(_Primitive):
    class_type = "PrimitiveString"
    display_name = "String"
    return_types = ("STRING",)
    spec = InputSpec("STRING", {"multiline": False})


class PrimitiveInt(_Primitive):
    class_type = "PrimitiveInt"
    display_name = "Int"
    return_types = ("INT",)
    spec = InputSpec("INT", {"min": -_I64, "max": _I64, "control_after_generate": True})


class PrimitiveFloat(_Primitive):
    class_type = "PrimitiveFloat"
    display_name = "Float"
    return_types = ("FLOAT",)
    spec = InputSpec("FLOAT", {"min": -_I64, "max": _I64})


class PrimitiveBoolean(_Primitive):
    class_type = "PrimitiveBoolean"
    display_name = "Boolean"
    return_types = ("BOOLEAN",)
    spec = InputSpec("BOOLEAN", {})


class _StringNode(Node):
    category = "utils/string"
    python_module = "comfy_extras.nodes_string"
    return_types = ("STRING",)
    output_tooltips = (None,)
    v3_schema = True


class StringConcatenate(_StringNode):
    class_type = "StringConcatenate"
    display_name = "Concatenate"

    @classmethod
    def input_types(cls, paths: SimPaths) -> InputSections:
        return {
            "required": {
                "string_a": InputSpec("STRING", {"multiline": True}),
                "string_b": InputSpec("STRING", {"multiline": True}),
                "delimiter": InputSpec("STRING", {"default": "", "multiline": False}),
            }
        }

    async def run(self, ctx: NodeContext, *, string_a: str, string_b: str, delimiter: str) -> NodeOutput:
        return NodeOutput((delimiter.join([string_a, string_b]),))


_CASE_MODES = ["UPPERCASE", "lowercase", "Capitalize", "Title Case"]


class CaseConverter(_StringNode):
    class_type = "CaseConverter"
    display_name = "Case Converter"

    @classmethod
    def input_types(cls, paths: SimPaths) -> InputSections:
        return {
            "required": {
                "string": InputSpec("STRING", {"multiline": True}),
                "mode": InputSpec("COMBO", {"multiselect": False, "options": list(_CASE_MODES)}),
            }
        }

    async def run(self, ctx: NodeContext, *, string: str, mode: str) -> NodeOutput:
        convert = {
            "UPPERCASE": str.upper,
            "lowercase": str.lower,
            "Capitalize": str.capitalize,
            "Title Case": str.title,
        }.get(mode, str)
        return NodeOutput((convert(string),))


_DOTALL_TOOLTIP = (
    "When enabled, the dot (.) character will match any character including newline "
    "characters. When disabled, dots won't match newlines."
)
_COUNT_TOOLTIP = (
    "Maximum number of replacements to make. Set to 0 to replace all occurrences "
    "(default). Set to 1 to replace only the first match, 2 for the first two matches, etc."
)


class RegexReplace(_StringNode):
    """Real ``re.sub``: a bad pattern gives a genuine execution_error (``re.error``)."""

    class_type = "RegexReplace"
    display_name = "Regex Replace"
    description = "Find and replace text using regex patterns."

    @classmethod
    def input_types(cls, paths: SimPaths) -> InputSections:
        return {
            "required": {
                "string": InputSpec("STRING", {"multiline": True}),
                "regex_pattern": InputSpec("STRING", {"multiline": True}),
                "replace": InputSpec("STRING", {"multiline": True}),
            },
            "optional": {
                "case_insensitive": InputSpec("BOOLEAN", {"default": True}),
                "multiline": InputSpec("BOOLEAN", {"default": False}),
                "dotall": InputSpec("BOOLEAN", {"tooltip": _DOTALL_TOOLTIP, "default": False}),
                "count": InputSpec("INT", {"tooltip": _COUNT_TOOLTIP, "default": 0, "min": 0, "max": 100}),
            },
        }

    async def run(
        self,
        ctx: NodeContext,
        *,
        string: str,
        regex_pattern: str,
        replace: str,
        case_insensitive: bool = True,
        multiline: bool = False,
        dotall: bool = False,
        count: int = 0,
    ) -> NodeOutput:
        flags = 0
        if case_insensitive:
            flags |= re.IGNORECASE
        if multiline:
            flags |= re.MULTILINE
        if dotall:
            flags |= re.DOTALL
        # A pathological pattern can take long: keep it off the event loop.
        result = await asyncio.to_thread(re.sub, regex_pattern, replace, string, count=count, flags=flags)
        return NodeOutput((result,))


TEXT_NODES: tuple[type[Node], ...] = (
    PrimitiveString,
    PrimitiveInt,
    PrimitiveFloat,
    PrimitiveBoolean,
    StringConcatenate,
    CaseConverter,
    RegexReplace,
)
