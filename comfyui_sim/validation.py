"""``POST /prompt`` validation with ComfyUI's error types, messages and quirks.

Mirrors ComfyUI's algorithm rather than just its verdicts, because agents read the details:

- an unknown class or a node without ``class_type`` rejects the whole prompt at once;
- each output node is validated with its ancestors; a node's own problems are listed on
  that node, and a node that is only invalid because of an ancestor carries no errors;
- values are converted in place (``"64"`` becomes ``64``), so the queued prompt and history
  hold the converted values;
- one valid output node is enough: the prompt runs and the bad outputs come back in
  ``node_errors`` of the 200 answer;
- a link to a missing node or socket surfaces as the ``KeyError`` / ``IndexError`` it
  causes, wrapped as ``exception_during_validation``.

Runs in a worker thread: LoadImage's check looks at the disk.
"""

from __future__ import annotations

import sys
import traceback
from dataclasses import dataclass, field
from typing import Any

from .node_base import InputSpec
from .paths import SimPaths
from .registry import NODE_CLASSES

NodeVerdict = tuple[bool, list[dict[str, Any]], str]


@dataclass
class ValidationResult:
    ok: bool
    error: dict[str, Any] | None
    outputs: list[str] = field(default_factory=list)
    node_errors: dict[str, Any] = field(default_factory=dict)


def _prompt_error(kind: str, message: str, details: str) -> ValidationResult:
    return ValidationResult(False, {"type": kind, "message": message, "details": details, "extra_info": {}})


def full_type_name(klass: type) -> str:
    """``KeyError`` for builtins, ``module.Name`` otherwise (what ComfyUI reports)."""
    module = klass.__module__
    return klass.__qualname__ if module == "builtins" else f"{module}.{klass.__qualname__}"


def types_compatible(received: Any, expected: Any) -> bool:
    if received == expected or "*" in (received, expected):
        return True
    if not isinstance(received, str) or not isinstance(expected, str):
        return False
    # "A,B" types are unions: any overlap connects.
    return bool({t.strip() for t in received.split(",")} & {t.strip() for t in expected.split(",")})


_CONVERTERS: dict[str, Any] = {"INT": int, "FLOAT": float, "STRING": str, "BOOLEAN": bool}


class _Validator:
    def __init__(self, prompt: dict[str, Any], paths: SimPaths) -> None:
        self.prompt = prompt
        self.paths = paths
        self.validated: dict[str, NodeVerdict] = {}

    def node(self, node_id: str) -> NodeVerdict:
        if node_id in self.validated:
            return self.validated[node_id]
        node = self.prompt[node_id]
        inputs = node["inputs"]
        cls = NODE_CLASSES[node["class_type"]]
        sections = cls.input_types(self.paths)
        errors: list[dict[str, Any]] = []
        valid = True
        for section in ("required", "optional"):
            for name, spec in sections.get(section, {}).items():
                if name not in inputs:
                    if section == "required":
                        errors.append(
                            {
                                "type": "required_input_missing",
                                "message": "Required input is missing",
                                "details": name,
                                "extra_info": {"input_name": name},
                            }
                        )
                    continue
                if isinstance(inputs[name], list):
                    ok, error = self._check_link(name, spec, inputs[name])
                else:
                    ok, error = self._check_value(cls.self_validated, inputs, name, spec)
                if error is not None:
                    errors.append(error)
                if not ok:
                    valid = False
        errors.extend(self._custom_check(cls, inputs))
        verdict: NodeVerdict = (not errors and valid, errors, node_id)
        self.validated[node_id] = verdict
        return verdict

    def _check_link(self, name: str, spec: InputSpec, link: list[Any]) -> tuple[bool, dict[str, Any] | None]:
        if len(link) != 2:
            return False, {
                "type": "bad_linked_input",
                "message": "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                "details": name,
                "extra_info": {
                    "input_name": name,
                    "input_config": spec.config(),
                    "received_value": link,
                },
            }
        source_id = link[0]
        # Deliberately unguarded: a missing node or socket raises KeyError / IndexError,
        # which the caller reports as ComfyUI does.
        source_cls = NODE_CLASSES[self.prompt[source_id]["class_type"]]
        received = source_cls.return_types[link[1]]
        if not types_compatible(received, spec.kind):
            return False, {
                "type": "return_type_mismatch",
                "message": "Return type mismatch between linked nodes",
                "details": f"{name}, received_type({received}) mismatch input_type({spec.kind})",
                "extra_info": {
                    "input_name": name,
                    "input_config": spec.config(),
                    "received_type": received,
                    "linked_node": link,
                },
            }
        try:
            upstream_ok = self.node(source_id)[0]
        except Exception as exc:
            typ, _, tb = sys.exc_info()
            assert typ is not None
            self.validated[source_id] = (
                False,
                [
                    {
                        "type": "exception_during_inner_validation",
                        "message": "Exception when validating inner node",
                        "details": str(exc),
                        "extra_info": {
                            "input_name": name,
                            "input_config": spec.config(),
                            "exception_message": str(exc),
                            "exception_type": full_type_name(typ),
                            "traceback": traceback.format_tb(tb),
                            "linked_node": link,
                        },
                    }
                ],
                source_id,
            )
            return False, None
        # An upstream failure is reported on the upstream node only.
        return upstream_ok, None

    def _check_value(
        self, self_validated: tuple[str, ...], inputs: dict[str, Any], name: str, spec: InputSpec
    ) -> tuple[bool, dict[str, Any] | None]:
        info = spec.config()
        try:
            val = _convert_in_place(inputs, name, spec)
        except Exception as exc:
            # inputs[name] holds the value as far as it got: unwrapped, not converted.
            return False, _conversion_error(name, spec, info, inputs[name], exc)
        if name in self_validated:
            return True, None
        error = _range_error(name, val, spec.options, info) or _combo_error(name, val, spec, info)
        return error is None, error

    def _custom_check(self, cls: Any, inputs: dict[str, Any]) -> list[dict[str, Any]]:
        present = [name for name in cls.self_validated if name in inputs]
        if not present:
            return []
        # Linked values are unknown before execution, as in ComfyUI.
        values = {n: None if isinstance(inputs[n], list) else inputs[n] for n in present}
        verdict = cls.check_inputs(self.paths, values)
        if verdict is True:
            return []
        details = "" if verdict is False else f" - {verdict}"
        return [
            {
                "type": "custom_validation_failed",
                "message": "Custom validation failed for node",
                "details": f"{name}{details}",
                "extra_info": {"input_name": name},
            }
            for name in present
        ]


def _convert_in_place(inputs: dict[str, Any], name: str, spec: InputSpec) -> Any:
    """The value of input ``name`` as its declared type; ``inputs`` gets it too, since the
    queued prompt and the history hold converted values."""
    val = inputs[name]
    # The frontend wraps list-valued widgets as {"__value__": [...]}.
    if isinstance(val, dict) and "__value__" in val:
        val = val["__value__"]
        inputs[name] = val
    convert = _CONVERTERS.get(spec.kind) if isinstance(spec.kind, str) else None
    if convert is not None:
        val = convert(val)
        inputs[name] = val
    return val


def _conversion_error(
    name: str, spec: InputSpec, info: list[Any], val: Any, exc: Exception
) -> dict[str, Any]:
    return {
        "type": "invalid_input_type",
        "message": f"Failed to convert an input value to a {spec.kind} value",
        "details": f"{name}, {val}, {exc}",
        "extra_info": {
            "input_name": name,
            "input_config": info,
            "received_value": val,
            "exception_message": str(exc),
        },
    }


def _range_error(name: str, val: Any, extra: dict[str, Any], info: list[Any]) -> dict[str, Any] | None:
    if "min" in extra and val < extra["min"]:
        return {
            "type": "value_smaller_than_min",
            "message": f"Value {val} smaller than min of {extra['min']}",
            "details": name,
            "extra_info": {"input_name": name, "input_config": info, "received_value": val},
        }
    if "max" in extra and val > extra["max"]:
        return {
            "type": "value_bigger_than_max",
            "message": f"Value {val} bigger than max of {extra['max']}",
            "details": name,
            "extra_info": {"input_name": name, "input_config": info, "received_value": val},
        }
    return None


def _combo_error(name: str, val: Any, spec: InputSpec, info: list[Any]) -> dict[str, Any] | None:
    options = spec.combo_options()
    if options is None:
        return None
    if spec.options.get("multiselect") and isinstance(val, list):
        bad = any(v not in options for v in val)
    else:
        bad = val not in options
    if not bad:
        return None
    # ComfyUI does not echo long lists (folders full of model files).
    config: list[Any] | None = info
    listed = str(options)
    if len(options) > 20:
        listed = f"(list of length {len(options)})"
        config = None
    return {
        "type": "value_not_in_list",
        "message": "Value not in list",
        "details": f"{name}: '{val}' not in {listed}",
        "extra_info": {"input_name": name, "input_config": config, "received_value": val},
    }


def _output_nodes(prompt: dict[str, Any], targets: list[str] | None) -> list[str] | ValidationResult:
    """The output nodes to validate, or the error that rejects the whole prompt at once."""
    outputs: list[str] = []
    for node_id, node in prompt.items():
        if not isinstance(node, dict) or "class_type" not in node:
            return _prompt_error(
                "invalid_prompt",
                "Cannot execute because a node is missing the class_type property.",
                f"Node ID '#{node_id}'",
            )
        class_type = node["class_type"]
        cls = NODE_CLASSES.get(class_type) if isinstance(class_type, str) else None
        if cls is None:
            return _prompt_error(
                "invalid_prompt",
                f"Cannot execute because node {class_type} does not exist.",
                f"Node ID '#{node_id}'",
            )
        if cls.output_node and (targets is None or node_id in targets):
            outputs.append(node_id)
    if not outputs:
        return _prompt_error("prompt_no_outputs", "Prompt has no outputs", "")
    return outputs


def _validate_output(checker: _Validator, output_id: str) -> tuple[bool, list[dict[str, Any]]]:
    """An output node's verdict; a bad link surfaces here as the exception it raised."""
    try:
        ok, reasons, _ = checker.node(output_id)
    except Exception as exc:
        typ, _, tb = sys.exc_info()
        assert typ is not None
        reasons = [
            {
                "type": "exception_during_validation",
                "message": "Exception when validating node",
                "details": str(exc),
                "extra_info": {
                    "exception_type": full_type_name(typ),
                    "traceback": traceback.format_tb(tb),
                },
            }
        ]
        checker.validated[output_id] = (False, reasons, output_id)
        return False, reasons
    return ok, reasons


def _credit_failures(
    checker: _Validator, prompt: dict[str, Any], output_id: str, node_errors: dict[str, Any]
) -> None:
    # ComfyUI credits every failing node seen so far to this output, related or not.
    for node_id, (node_ok, node_reasons, _) in checker.validated.items():
        if node_ok or not node_reasons:
            continue
        entry = node_errors.setdefault(
            node_id,
            {
                "errors": node_reasons,
                "dependent_outputs": [],
                "class_type": prompt[node_id]["class_type"],
            },
        )
        entry["dependent_outputs"].append(output_id)


def _outputs_failed(
    failures: list[tuple[str, list[dict[str, Any]]]], node_errors: dict[str, Any]
) -> ValidationResult:
    details = "\n".join(
        f"{reason['message']}: {reason['details']}" for _, reasons in failures for reason in reasons
    )
    return ValidationResult(
        False,
        {
            "type": "prompt_outputs_failed_validation",
            "message": "Prompt outputs failed validation",
            "details": details,
            "extra_info": {},
        },
        [],
        node_errors,
    )


def validate_prompt(
    prompt: dict[str, Any], paths: SimPaths, targets: list[str] | None = None
) -> ValidationResult:
    """Validate an API-format prompt; ``targets`` limits the output nodes considered."""
    outputs = _output_nodes(prompt, targets)
    if isinstance(outputs, ValidationResult):
        return outputs

    checker = _Validator(prompt, paths)
    good: list[str] = []
    failures: list[tuple[str, list[dict[str, Any]]]] = []
    node_errors: dict[str, Any] = {}
    for output_id in outputs:
        ok, reasons = _validate_output(checker, output_id)
        if ok:
            good.append(output_id)
            continue
        failures.append((output_id, reasons))
        _credit_failures(checker, prompt, output_id, node_errors)

    if not good:
        return _outputs_failed(failures, node_errors)
    return ValidationResult(True, None, good, node_errors)
