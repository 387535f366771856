"""The placeholder grammar: parse, list, validate and substitute. Pure functions.

A placeholder is a whole JSON string directly in a node's ``inputs``:

    $text(key) | $text(key, default)    field "$key"; required unless it has a default
    $choice(name, v1, v2, ...)          field "#name"; one of the options, v1 by default
    $file(name)                         file part "$name"; the name the file got on ComfyUI
    $random()                           a fresh unsigned 64-bit integer per placeholder per run
    $timestamp()                        Unix milliseconds, one value per run

Anything else is plain text: a placeholder inside a longer string (``"x_$random()"``), one
with whitespace around it, an unknown or differently cased kind (``$foo(x)``, ``$TEXT(x)``).
A string of the exact form ``$<known kind>(...)`` whose arguments are wrong is an error,
because a typo there would otherwise reach ComfyUI as a literal and fail far from its cause.

Errors::

    ValueError
    ├── PlaceholderError   the workflow or one of its placeholders is malformed
    ├── ParameterError     the client's values do not fit the declared parameters
    └── ConversionError    a value does not convert to the type ComfyUI declares
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, cast

__all__ = [
    "NAME_PATTERN",
    "ConversionError",
    "Occurrence",
    "Parameter",
    "ParameterError",
    "Parsed",
    "PlaceholderError",
    "declared_parameters",
    "find_placeholders",
    "merge_values",
    "parse_value",
    "substitute",
    "validate_values",
]

Kind = Literal["text", "choice", "file", "random", "timestamp"]
ParameterKind = Literal["text", "choice", "file"]

NAME_PATTERN = r"[A-Za-z0-9_-]{1,255}"
_NAME = re.compile(NAME_PATTERN)
# Case-sensitive on purpose: "$TEXT(a)" is not ours and stays plain text.
_CANDIDATE = re.compile(r"\$(text|choice|file|random|timestamp)\((.*)\)", re.DOTALL)
# Python's int()/float() accept "1_000", "nan", "infinity": ComfyUI users do not mean those.
_INT = re.compile(r"[+-]?[0-9]+")
_FLOAT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_TRUE = frozenset({"true", "1", "yes"})
_FALSE = frozenset({"false", "0", "no"})
_U64_LIMIT = 2**64
# A source that repeats itself this often is broken, not unlucky (p ≈ 2^-64 per draw).
_MAX_REDRAWS = 16


class PlaceholderError(ValueError):
    """The workflow, or a placeholder in it, is malformed."""


class ParameterError(ValueError):
    """The client's values do not fit the workflow's parameters; the message is for the user.

    ``problems`` lists every problem found; the message joins them with "; "."""

    def __init__(self, problems: str | list[str]) -> None:
        # The same missing value can be needed in several places: say so once.
        self.problems = [problems] if isinstance(problems, str) else list(dict.fromkeys(problems))
        super().__init__("; ".join(self.problems))


class ConversionError(ValueError):
    """A value does not convert to the type ComfyUI declares for the input."""

    def __init__(self, node_id: str, input_name: str, value: object, expected: str) -> None:
        self.node_id = node_id
        self.input_name = input_name
        self.value = value
        self.expected = expected
        article = "an" if expected[:1] in "AEIOU" else "a"
        super().__init__(f"node {node_id} input {input_name!r}: {value!r} is not {article} {expected}")


class Parsed(NamedTuple):
    """One placeholder string, taken apart. ``options`` is empty except for choices."""

    kind: Kind
    name: str | None
    default: str | None
    options: tuple[str, ...]


@dataclass(frozen=True)
class Occurrence:
    """A placeholder found at ``workflow[node_id]["inputs"][input_name]``."""

    kind: Kind
    name: str | None
    default: str | None
    options: tuple[str, ...]
    node_id: str
    input_name: str

    @property
    def where(self) -> str:
        return f"node {self.node_id} input {self.input_name!r}"


@dataclass(frozen=True)
class Parameter:
    """A value the client gives: one per name, however many places use it."""

    kind: ParameterKind
    name: str
    default: str | None
    options: tuple[str, ...]
    required: bool

    @property
    def field_name(self) -> str:
        # The rerun-with-new-parameters contract: "$" for text and file parts, "#" for choices.
        return f"#{self.name}" if self.kind == "choice" else f"${self.name}"

    def to_dict(self) -> dict[str, Any]:
        """What a client needs to build a form for this parameter."""
        return {
            "name": self.name,
            "kind": self.kind,
            "field": self.field_name,
            "default": self.default,
            "options": list(self.options),
            "required": self.required,
        }


def _check_name(name: str, text: str) -> str:
    if not _NAME.fullmatch(name):
        raise PlaceholderError(f"malformed placeholder {text!r}: name {name!r} must match {NAME_PATTERN}")
    return name


def parse_value(value: object) -> Parsed | None:
    """Parse one input value.

    Returns ``None`` when the value is not a placeholder (not a string, or plain text), a
    :class:`Parsed` (a named tuple ``(kind, name, default, options)``) when it is one. Raises
    :class:`PlaceholderError` for a malformed placeholder of a known kind; the message names
    the placeholder but not where it is (:func:`find_placeholders` adds that).
    """
    if not isinstance(value, str):
        return None
    match = _CANDIDATE.fullmatch(value)
    if match is None:
        return None
    kind: Kind = cast(Kind, match.group(1))  # the pattern matches only the five kinds
    inner = match.group(2)
    if kind in ("random", "timestamp"):
        if inner.strip():
            raise PlaceholderError(f"malformed placeholder {value!r}: ${kind}() takes no argument")
        return Parsed(kind, None, None, ())
    if kind == "text":
        # Only the first comma separates: a default may hold commas and parentheses.
        name, comma, default = inner.partition(",")
        _check_name(name.strip(), value)
        return Parsed("text", name.strip(), default.strip() if comma else None, ())
    if kind == "file":
        if "," in inner:
            raise PlaceholderError(f"malformed placeholder {value!r}: $file() takes one name")
        return Parsed("file", _check_name(inner.strip(), value), None, ())
    name, *rest = (part.strip() for part in inner.split(","))
    _check_name(name, value)
    if not rest:
        raise PlaceholderError(
            f"malformed placeholder {value!r}: $choice() needs at least one option "
            "after the name, e.g. $choice(size, small, large)"
        )
    if any(option == "" for option in rest):
        raise PlaceholderError(f"malformed placeholder {value!r}: an option is empty")
    return Parsed("choice", name, rest[0], tuple(rest))


def _nodes(workflow: object) -> Iterable[tuple[str, dict[str, Any]]]:
    """Each node id with its inputs, checking the API-format shape on the way."""
    if not isinstance(workflow, dict):
        raise PlaceholderError(
            "the workflow must be a JSON object of nodes in ComfyUI's API format "
            f"({{node_id: {{class_type, inputs}}}}), not {type(workflow).__name__}"
        )
    for node_id, node in workflow.items():
        if not isinstance(node_id, str):
            raise PlaceholderError(f"node id {node_id!r} must be a string")
        if not isinstance(node, dict):
            raise PlaceholderError(f"node {node_id} must be an object with class_type and inputs")
        inputs = node.get("inputs")
        if not isinstance(inputs, dict):
            raise PlaceholderError(f"node {node_id} must have an object 'inputs'")
        yield node_id, inputs


def find_placeholders(workflow: dict[str, Any]) -> list[Occurrence]:
    """Every placeholder of the workflow, in node order then input order."""
    found: list[Occurrence] = []
    for node_id, inputs in _nodes(workflow):
        for input_name, value in inputs.items():
            try:
                parsed = parse_value(value)
            except PlaceholderError as exc:
                raise PlaceholderError(f"node {node_id} input {input_name!r}: {exc}") from None
            if parsed is not None:
                found.append(Occurrence(*parsed, node_id=node_id, input_name=input_name))
    return found


def _declare(occurrences: Iterable[Occurrence]) -> dict[str, Parameter]:
    parameters: dict[str, Parameter] = {}
    first_seen: dict[str, Occurrence] = {}
    for occ in occurrences:
        if occ.kind not in ("text", "choice", "file") or occ.name is None:
            continue
        known = parameters.get(occ.name)
        if known is None:
            first_seen[occ.name] = occ
            parameters[occ.name] = Parameter(
                kind=occ.kind,
                name=occ.name,
                default=occ.default,
                options=occ.options,
                required=occ.kind == "file" or (occ.kind == "text" and occ.default is None),
            )
            continue
        first = first_seen[occ.name]
        clash = f"parameter {occ.name!r} in {occ.where} disagrees with {first.where}"
        if known.kind != occ.kind:
            raise PlaceholderError(f"{clash}: ${known.kind}() there, ${occ.kind}() here")
        if occ.kind == "choice" and occ.options != known.options:
            raise PlaceholderError(f"{clash}: options {', '.join(occ.options)} vs {', '.join(known.options)}")
        if occ.kind == "text" and occ.default is not None:
            if known.default is None:
                # One place giving the default is enough: it applies everywhere.
                parameters[occ.name] = Parameter("text", occ.name, occ.default, (), False)
            elif known.default != occ.default:
                raise PlaceholderError(f"{clash}: default {occ.default!r} vs {known.default!r}")
    return parameters


def declared_parameters(workflow: dict[str, Any]) -> dict[str, Parameter]:
    """The parameters a client can set, by name, in first-seen order.

    Raises :class:`PlaceholderError` when two uses of a name disagree (kind, text default,
    choice options)."""
    return _declare(find_placeholders(workflow))


def _as_text(kind_word: str, name: str, value: object) -> str:
    # JSON clients (the Conductor-compatible rerun's workflowInput) send numbers and
    # booleans as themselves.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    raise ParameterError(f"value of '{kind_word}{name}' must be a string, not {type(value).__name__}")


def _wrong_kind(parameter: Parameter) -> str:
    if parameter.kind == "file":
        return f"parameter {parameter.name!r} is a file: send it as a file part '${parameter.name}'"
    return (
        f"parameter {parameter.name!r} is a {parameter.kind}: send it as the field '{parameter.field_name}'"
    )


def _check_sent(
    parameters: Mapping[str, Parameter],
    texts: Mapping[str, object],
    choices: Mapping[str, object],
    files: Iterable[str],
    problems: list[str],
) -> dict[str, str]:
    """Sent text and choice values that fit, as strings; a note in ``problems`` for the rest."""
    accepted: dict[str, str] = {}
    for prefix, sent, kind in (("$", texts, "text"), ("#", choices, "choice")):
        for name, raw in sent.items():
            parameter = parameters.get(name)
            if parameter is None:
                problems.append(f"unknown parameter '{prefix}{name}'")
                continue
            if parameter.kind != kind:
                problems.append(_wrong_kind(parameter))
                continue
            try:
                value = _as_text(prefix, name, raw)
            except ParameterError as exc:
                problems.extend(exc.problems)
                continue
            if kind == "choice" and value not in parameter.options:
                problems.append(
                    f"{value!r} is not an option of '#{name}': choose one of {', '.join(parameter.options)}"
                )
                continue
            accepted[name] = value
    for name in files:
        parameter = parameters.get(name)
        if parameter is None:
            problems.append(f"unknown parameter '${name}'")
        elif parameter.kind != "file":
            problems.append(f"{_wrong_kind(parameter)}, not as a file")
    return accepted


def _complete(
    parameters: Mapping[str, Parameter],
    *layers: Mapping[str, str],
    problems: list[str],
    mentioned: set[str],
) -> dict[str, str]:
    """A value for every text and choice parameter: the first layer that has it, else the
    default; a missing required one is a problem unless the client sent it and was already
    told what was wrong with it (``mentioned``)."""
    values: dict[str, str] = {}
    for name, parameter in parameters.items():
        if parameter.kind == "file":
            continue
        for layer in layers:
            if name in layer:
                values[name] = layer[name]
                break
        else:
            if parameter.default is not None:
                values[name] = parameter.default
            elif name not in mentioned:
                problems.append(f"missing required parameter '{parameter.field_name}'")
    return values


def validate_values(
    parameters: Mapping[str, Parameter],
    texts: Mapping[str, str],
    choices: Mapping[str, str],
    files: Iterable[str],
) -> dict[str, str]:
    """Check what a client sent for a new run and return the value of every text and choice
    parameter (defaults filled in).

    ``texts`` come from "$name" fields, ``choices`` from "#name" fields, ``files`` are the
    names of "$name" file parts (present, not part of the result). Raises
    :class:`ParameterError` naming every problem: unknown names, a value sent the wrong way,
    a choice outside its options, a missing required value or file."""
    problems: list[str] = []
    files = list(files)
    accepted = _check_sent(parameters, texts, choices, files, problems)
    mentioned = {*texts, *choices, *files}
    values = _complete(parameters, accepted, problems=problems, mentioned=mentioned)
    for name, parameter in parameters.items():
        if parameter.kind == "file" and name not in mentioned:
            problems.append(f"missing required file '${name}'")
    if problems:
        raise ParameterError(problems)
    return values


def merge_values(
    parameters: Mapping[str, Parameter],
    previous: Mapping[str, str],
    texts: Mapping[str, str],
    choices: Mapping[str, str],
    files: Iterable[str] = (),
) -> dict[str, str]:
    """The values of a rerun: what was sent, else the previous run's value, else the default.

    Sent values are checked as in :func:`validate_values`; ``files`` (optional) are the
    names of file parts sent anew, checked to be file parameters. Files not sent are kept by
    the caller from the previous run, so none is reported missing here."""
    problems: list[str] = []
    files = list(files)
    accepted = _check_sent(parameters, texts, choices, files, problems)
    # A previous value still has to fit: the structure is copied, but a template may not be.
    kept = {
        name: value
        for name, value in previous.items()
        if name in parameters
        and parameters[name].kind != "file"
        and (parameters[name].kind != "choice" or value in parameters[name].options)
    }
    mentioned = {*texts, *choices, *files}
    values = _complete(parameters, accepted, kept, problems=problems, mentioned=mentioned)
    if problems:
        raise ParameterError(problems)
    return values


def _convert(occ: Occurrence, value: str | int, expected: str | None) -> str | int | float | bool:
    """``value`` as ComfyUI wants it for an input declared ``expected`` (None: unknown)."""
    if expected == "STRING":
        return str(value)
    if expected not in ("INT", "FLOAT", "BOOLEAN"):
        return value
    if isinstance(value, int):
        if expected == "INT":
            return value
        if expected == "FLOAT":
            return float(value)
    text = str(value).strip()
    if expected == "INT" and _INT.fullmatch(text):
        return int(text)
    if expected == "FLOAT" and _FLOAT.fullmatch(text) and math.isfinite(float(text)):
        return float(text)
    if expected == "BOOLEAN" and text.lower() in _TRUE | _FALSE:
        return text.lower() in _TRUE
    raise ConversionError(occ.node_id, occ.input_name, value, expected)


def substitute(
    workflow: dict[str, Any],
    values: Mapping[str, str],
    file_names: Mapping[str, str],
    *,
    random_source: Callable[[], int],
    timestamp_ms: int,
    input_types: Mapping[str, Mapping[str, str]] | None = None,
    fixed_random: Mapping[str, int] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fill every placeholder of a copy of ``workflow``; the input is never changed.

    ``values``: text and choice values by name (a missing one takes its default).
    ``file_names``: the name each ``$file`` got on the runner's ComfyUI. ``random_source``
    draws an unsigned 64-bit integer; ``fixed_random`` ("node.input" -> int, e.g. a previous
    run's ``resolved["random"]``) pins some of them to reproduce a run. ``input_types``
    (class_type -> input -> ComfyUI type, see :mod:`protocol.comfy_types`) converts values
    for INT, FLOAT and BOOLEAN inputs and makes generated numbers strings for STRING ones.

    Returns ``(workflow, resolved)`` where ``resolved`` records what was used:
    ``{"values": {name: str}, "files": {name: comfy name}, "random": {"node.input": int}}``
    plus ``"timestamp_ms"`` when a ``$timestamp()`` is present. Raises
    :class:`ParameterError` for a missing required value or file or a choice outside its
    options, :class:`ConversionError` for a value that does not fit its input's type."""
    occurrences = find_placeholders(workflow)
    parameters = _declare(occurrences)
    result = copy.deepcopy(workflow)
    types = input_types or {}
    fixed = fixed_random or {}
    resolved: dict[str, Any] = {"values": {}, "files": {}, "random": {}}
    # Pinned values count as drawn so that a fresh draw cannot repeat one of them.
    drawn: set[int] = set(fixed.values())
    problems: list[str] = []

    for occ in occurrences:
        value: str | int
        if occ.kind == "random":
            key = f"{occ.node_id}.{occ.input_name}"
            value = fixed[key] if key in fixed else _draw(random_source, drawn)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < _U64_LIMIT:
                raise ValueError(f"random value for {key} is not an unsigned 64-bit integer")
            resolved["random"][key] = value
        elif occ.kind == "timestamp":
            value = resolved["timestamp_ms"] = timestamp_ms
        elif occ.kind == "file":
            assert occ.name is not None
            if occ.name not in file_names:
                problems.append(f"missing required file '${occ.name}'")
                continue
            value = resolved["files"][occ.name] = file_names[occ.name]
        else:
            assert occ.name is not None
            parameter = parameters[occ.name]
            picked = values.get(occ.name, parameter.default)
            if picked is None:
                problems.append(f"missing required parameter '{parameter.field_name}'")
                continue
            if parameter.kind == "choice" and picked not in parameter.options:
                problems.append(
                    f"{picked!r} is not an option of '#{occ.name}': "
                    f"choose one of {', '.join(parameter.options)}"
                )
                continue
            value = resolved["values"][occ.name] = picked
        class_type = result[occ.node_id].get("class_type")
        expected = types.get(class_type, {}).get(occ.input_name) if isinstance(class_type, str) else None
        result[occ.node_id]["inputs"][occ.input_name] = _convert(occ, value, expected)

    if problems:
        raise ParameterError(problems)
    return result, resolved


def _draw(random_source: Callable[[], int], drawn: set[int]) -> int:
    # Two placeholders must never share a seed within a run, however small the odds.
    for _ in range(_MAX_REDRAWS):
        value = random_source()
        if value not in drawn:
            drawn.add(value)
            return value
    raise ValueError("random_source keeps returning values already used in this run")
