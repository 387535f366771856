"""GET /openapi.json: the control plane's HTTP API as OpenAPI 3.1.

Written out by hand from one table of operations, so that it says what the handlers do
(tests check that every route is described and every described route exists, and that
answers match the shapes given here)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from control_plane.model.lifecycle import ConductorStatus, DeliveryStatus, TaskStatus, WorkflowStatus
from control_plane.webhooks.events import EVENT_TYPES

routes = web.RouteTableDef()

_ERROR = {"$ref": "#/components/schemas/Error"}
_ANY_OBJECT: dict[str, Any] = {"type": "object"}
_WORKFLOW = {"$ref": "#/components/schemas/Workflow"}
_SWEEP_VIEW = {"$ref": "#/components/schemas/Sweep"}
_WEBHOOK = {"$ref": "#/components/schemas/Webhook"}
_DELIVERY = {"$ref": "#/components/schemas/Delivery"}
_RUNNER = {"$ref": "#/components/schemas/Runner"}
_TEMPLATE = {"$ref": "#/components/schemas/Template"}

_STRING_OR_NULL = {"type": ["string", "null"]}
_TIME_OR_NULL = {"type": ["string", "null"], "format": "date-time"}

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["status", "message"],
        "properties": {"status": {"type": "integer"}, "message": {"type": "string"}},
    },
    "Workflow": {
        "type": "object",
        "required": [
            "id",
            "name",
            "status",
            "tags",
            "created_at",
            "updated_at",
            "started_at",
            "completed_at",
        ],
        "properties": {
            "id": {"type": "string"},
            "name": {"type": "string"},
            "status": {"enum": [s.value for s in WorkflowStatus]},
            "tags": {"type": "array", "items": {"type": "string"}},
            "created_at": {"type": "string", "format": "date-time"},
            "updated_at": {"type": "string", "format": "date-time"},
            "started_at": _TIME_OR_NULL,
            "completed_at": _TIME_OR_NULL,
            "workflow_json": _ANY_OBJECT,
            "workflow_params": _ANY_OBJECT,
            "attempt": {"type": "integer"},
            "prompt_id": _STRING_OR_NULL,
            "queue_number": {"type": ["integer", "null"]},
            "progress": {"type": ["number", "null"]},
            "runner_id": _STRING_OR_NULL,
            "correlation_id": _STRING_OR_NULL,
            "parent_id": _STRING_OR_NULL,
            "sweep_id": {**_STRING_OR_NULL, "description": "the sweep that made it, if one did"},
            "webhook_url": {
                **_STRING_OR_NULL,
                "description": "told when it ends, signed with the account's secret",
            },
            "priority": {
                "type": "integer",
                "description": "waiting workflows go to runners highest priority first, then oldest first",
            },
            "error_node": _STRING_OR_NULL,
            "exception_type": _STRING_OR_NULL,
            "exception_message": _STRING_OR_NULL,
            "node_errors": {"type": ["object", "null"]},
            "failure_reason": {
                "enum": ["workflow", "infrastructure", "timeout", "queue_timeout", None],
                "description": "whose failure it was: the workflow's own graph, the fleet's once "
                "max_attempts ran out, an attempt past timeout_s, or no runner within the queue limit",
            },
            "attempts": {
                "type": "array",
                "description": "each attempt that ended without a result "
                "(attempt, runner_id, kind, reason, at)",
                "items": _ANY_OBJECT,
            },
            "timeout_s": {"type": "integer"},
            "queue_timeout_s": {"type": "integer"},
            "files_removed_at": {
                **_TIME_OR_NULL,
                "description": "when its inputs and outputs were removed, its tier's retention period over",
            },
            "reruns": {"type": "array", "items": {"type": "string"}},
            "tasks": {"type": "array", "items": {"$ref": "#/components/schemas/Task"}},
        },
    },
    "Task": {
        "type": "object",
        "required": ["task_id", "workflow_id", "attempt", "node_id", "status", "cached"],
        "properties": {
            "task_id": {"type": "string"},
            "workflow_id": {"type": "string"},
            "attempt": {"type": "integer"},
            "node_id": {"type": "string"},
            "class_type": _STRING_OR_NULL,
            "status": {"enum": [s.value for s in TaskStatus]},
            "cached": {"type": "boolean"},
            "started_at": _TIME_OR_NULL,
            "ended_at": _TIME_OR_NULL,
            "reason": _STRING_OR_NULL,
            "failure_kind": {"enum": ["workflow", "infrastructure", "out_of_memory", None]},
        },
    },
    "TaskList": {
        "type": "object",
        "required": ["tasks", "attempt"],
        "properties": {
            "tasks": {"type": "array", "items": {"$ref": "#/components/schemas/Task"}},
            "attempt": {"type": "integer", "description": "the workflow's current attempt"},
        },
    },
    "ConductorWorkflow": {
        "type": "object",
        "description": "Conductor's Workflow: times in epoch milliseconds, 0 when not yet",
        "required": ["workflowId", "workflowName", "status", "createTime", "tasks", "input", "output"],
        "properties": {
            "workflowId": {"type": "string"},
            "workflowName": {"type": "string"},
            "workflowVersion": {"type": "integer"},
            "status": {"enum": [s.value for s in ConductorStatus]},
            "createTime": {"type": "integer"},
            "updateTime": {"type": "integer"},
            "startTime": {"type": "integer"},
            "endTime": {"type": "integer"},
            "correlationId": _STRING_OR_NULL,
            "input": {"type": "object"},
            "output": {"type": "object"},
            "reasonForIncompletion": _STRING_OR_NULL,
            "failedReferenceTaskNames": {"type": "array", "items": {"type": "string"}},
            "priority": {"type": "integer"},
            "tasks": {"type": "array", "items": {"$ref": "#/components/schemas/ConductorTask"}},
        },
    },
    "ConductorTask": {
        "type": "object",
        "description": "Conductor's Task: one node's run; referenceTaskName is the node id",
        "required": ["taskId", "referenceTaskName", "taskType", "status", "seq", "retryCount"],
        "properties": {
            "taskId": {"type": "string"},
            "referenceTaskName": {"type": "string"},
            "taskType": {"type": "string"},
            "taskDefName": {"type": "string"},
            "status": {"enum": [s.value for s in TaskStatus]},
            "seq": {"type": "integer"},
            "retryCount": {"type": "integer"},
            "retried": {"type": "boolean"},
            "executed": {"type": "boolean"},
            "reusedFromCache": {
                "type": "boolean",
                "description": "a later attempt used this task's result from ComfyUI's cache",
            },
            "workflowInstanceId": {"type": "string"},
            "workflowType": {"type": "string"},
            "correlationId": _STRING_OR_NULL,
            "startTime": {"type": "integer"},
            "endTime": {"type": "integer"},
            "updateTime": {"type": "integer"},
            "inputData": {"type": "object"},
            "outputData": {"type": "object"},
            "reasonForIncompletion": _STRING_OR_NULL,
        },
    },
    "Output": {
        "type": "object",
        "required": ["id", "workflow_id", "node_id", "filename", "content_type", "size", "src"],
        "properties": {
            "id": {"type": "string"},
            "workflow_id": {"type": "string"},
            "node_id": {"type": "string"},
            "filename": {"type": "string"},
            "kind": {"type": "string"},
            "content_type": {"type": "string"},
            "size": {"type": "integer"},
            "sha256": {"type": "string"},
            "src": {"type": "string"},
        },
    },
    "Sweep": {
        "type": "object",
        "description": "a sweep's workflows, in the order of its sets",
        "required": ["sweep_id", "parent_id", "total", "counts", "workflows"],
        "properties": {
            "sweep_id": {"type": "string"},
            "parent_id": {"type": "string", "description": "the workflow each of them reruns"},
            "total": {"type": "integer"},
            "counts": {
                "type": "object",
                "description": "how many are in each status",
                "additionalProperties": {"type": "integer"},
            },
            "workflows": {"type": "array", "items": _ANY_OBJECT},
            "cancelled_now": {
                "type": "integer",
                "description": "in the answer to cancel: how many it cancelled",
            },
        },
    },
    "Webhook": {
        "type": "object",
        "required": ["id", "url", "events", "status", "created_at", "updated_at"],
        "properties": {
            "id": {"type": "string"},
            "url": {"type": "string"},
            "events": {"type": "array", "items": {"enum": list(EVENT_TYPES)}},
            "description": {"type": "string"},
            "status": {"enum": ["active", "disabled"]},
            "disabled_reason": _STRING_OR_NULL,
            "failing_since": _TIME_OR_NULL,
            "created_at": {"type": "string", "format": "date-time"},
            "updated_at": {"type": "string", "format": "date-time"},
            "secret": {"type": "string", "description": "only in the answer to create, shown once"},
        },
    },
    "Delivery": {
        "type": "object",
        "required": ["id", "url", "event_type", "status", "attempts", "created_at"],
        "properties": {
            "id": {"type": "string", "description": "the webhook-id of every attempt"},
            "webhook_id": _STRING_OR_NULL,
            "url": {"type": "string"},
            "event_type": {"enum": list(EVENT_TYPES)},
            "workflow_id": _STRING_OR_NULL,
            "status": {"enum": [s.value for s in DeliveryStatus]},
            "attempts": {
                "type": "array",
                "description": "each attempt: at, status_code, error, answer, duration_ms",
                "items": _ANY_OBJECT,
            },
            "next_attempt_at": _TIME_OR_NULL,
            "created_at": {"type": "string", "format": "date-time"},
            "delivered_at": _TIME_OR_NULL,
        },
    },
    "Runner": {
        "type": "object",
        "required": ["id", "name", "tags", "status", "created_at", "updated_at", "connected"],
        "properties": {
            "id": {"type": "string"},
            "name": {"type": "string"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "status": {"enum": ["active", "disabled"]},
            "created_at": {"type": "string", "format": "date-time"},
            "updated_at": {"type": "string", "format": "date-time"},
            "connected": {"type": "boolean"},
            "last_seen": _TIME_OR_NULL,
            "capacity": {"type": ["object", "null"]},
            "comfyui": {"type": ["object", "null"]},
            "agent_version": {"type": ["string", "null"]},
            "protocol_version": {"type": ["integer", "null"]},
            "current_jobs": {"type": "array", "items": {"type": "string"}},
            "token": {"type": "string", "description": "only in the answer to create, shown once"},
        },
    },
    "Template": {
        "type": "object",
        "required": ["id", "name", "description", "body", "parameters"],
        "properties": {
            "id": {"type": "string"},
            "name": {"type": "string"},
            "description": {"type": "string"},
            "body": _ANY_OBJECT,
            "parameters": {"type": "array", "items": _ANY_OBJECT},
            "timeout_s": {"type": ["integer", "null"]},
            "created_at": {"type": "string", "format": "date-time"},
            "updated_at": {"type": "string", "format": "date-time"},
        },
    },
}


def _list_of(name: str, item: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": [name, "total"],
        "properties": {name: {"type": "array", "items": item}, "total": {"type": "integer"}},
    }


# -- what requests carry ----------------------------------------------------------------------

_NO_NUL = "^[^\\u0000]*$"
_TEXT = {"type": "string", "pattern": _NO_NUL}
# At least one character that is not white space, no NUL.
_NAMED = "^[^\\u0000]*\\S[^\\u0000]*$"
_TAG = "[A-Za-z0-9_.:-]{1,64}"
_TAG_LIST = f"^ *({_TAG} *(, *{_TAG} *){{0,9}})? *$"
_PARAMETERS = {
    # $name text fields (and file parts), #name choice fields: the workflow's placeholders.
    "^[$][A-Za-z0-9_-]{1,255}$": {"type": "string", "pattern": _NO_NUL},
    "^#[A-Za-z0-9_-]{1,255}$": {"type": "string", "pattern": _NO_NUL},
}
_WORKFLOW_JSON = {
    "type": "string",
    "contentMediaType": "application/json",
    "description": "ComfyUI API-format JSON: {node id: {class_type, inputs}}, with placeholders "
    "($text, $choice, $file, $random, $timestamp) as whole string inputs; at most 64 levels deep",
}
_TIMEOUT_S = {
    "type": "integer",
    "minimum": 1,
    "maximum": 86400,
    "description": "seconds one attempt may take from the moment a runner takes it, up to the "
    "tier's maximum; without it the template's, else the tier's default",
}
_PRIORITY = {
    "type": "integer",
    "minimum": 0,
    "maximum": 10,
    "description": "higher runs first among the account's waiting workflows, up to the tier's "
    "maximum (free 1, pro 5, enterprise 10); 0 without it, a rerun's original's on a rerun",
}
_WEBHOOK_URL = {
    "type": "string",
    "maxLength": 2000,
    "pattern": _NO_NUL,
    "description": "told when the workflow ends (a public http(s) URL), signed with the account's "
    "secret (POST /v1/webhook-secret first); a rerun keeps its original's",
}
_RUN_FIELDS = {
    "name": {"type": "string", "maxLength": 200, "pattern": _NO_NUL},
    "tags": {"type": "string", "pattern": _TAG_LIST, "description": "comma-separated, at most 10"},
    "correlation_id": {"type": "string", "maxLength": 255, "pattern": _NO_NUL},
    "timeout_s": _TIMEOUT_S,
    "priority": _PRIORITY,
    "webhook_url": _WEBHOOK_URL,
}


_SCALAR = {"type": ["string", "number", "boolean"], "pattern": _NO_NUL}
_FILE_OBJECT: dict[str, Any] = {
    "type": "object",
    "description": "a $file parameter in a JSON body: its bytes, a URL the control plane fetches, "
    "or the sha256 of a file the account uploaded (POST /v1/blob)",
    "properties": {
        "base64": {"type": "string", "contentEncoding": "base64"},
        "url": {"type": "string", "pattern": "^https?://[^/?#]+"},
        "sha256": {"type": "string", "pattern": "^[0-9a-fA-F]{64}$"},
        "filename": {"type": "string", "minLength": 1, "maxLength": 200, "pattern": _NO_NUL},
        "content_type": {"type": "string", "minLength": 1, "maxLength": 200, "pattern": _NO_NUL},
    },
    "oneOf": [{"required": ["base64", "filename"]}, {"required": ["url"]}, {"required": ["sha256"]}],
    "additionalProperties": False,
}
_JSON_PARAMETERS = {
    "^[$][A-Za-z0-9_-]{1,255}$": {"anyOf": [_SCALAR, _FILE_OBJECT]},
    "^#[A-Za-z0-9_-]{1,255}$": _SCALAR,
}
# The same fields in a JSON body, where they may be JSON themselves.
_AS_JSON = {
    "workflow_json": {"anyOf": [{"type": "object"}, {"type": "string", "pattern": _NO_NUL}]},
    "body": {"anyOf": [{"type": "object"}, {"type": "string", "pattern": _NO_NUL}]},
    "tags": {
        "anyOf": [
            {"type": "array", "maxItems": 10, "items": {"type": "string", "pattern": f"^{_TAG}$"}},
            {"type": "string", "pattern": _TAG_LIST},
        ]
    },
}


def _form(
    properties: dict[str, Any], required: tuple[str, ...] = (), parameters: bool = True
) -> dict[str, Any]:
    """A form's fields, as multipart/form-data and as the same names in a JSON object."""
    schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
    json_properties = {name: _AS_JSON.get(name, prop) for name, prop in properties.items()}
    as_json: dict[str, Any] = {**schema, "properties": json_properties}
    if required:
        schema["required"] = as_json["required"] = list(required)
    if parameters:
        schema["patternProperties"] = _PARAMETERS
        as_json["patternProperties"] = _JSON_PARAMETERS
    return {"multipart/form-data": {"schema": schema}, "application/json": {"schema": as_json}}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


_SUBMIT = _form({"workflow_json": _WORKFLOW_JSON, **_RUN_FIELDS}, ("workflow_json",))
_RERUN = _form(
    {
        "timeout_s": _TIMEOUT_S,
        "correlation_id": _RUN_FIELDS["correlation_id"],
        "priority": _PRIORITY,
        "webhook_url": _WEBHOOK_URL,
    }
)
_RUN_TEMPLATE = _form(_RUN_FIELDS)
_FILE_PROPERTIES: dict[str, Any] = _FILE_OBJECT["properties"]
_SWEEP_PARAMETERS: dict[str, Any] = {
    "^[$][A-Za-z0-9_-]{1,255}$": {
        "anyOf": [
            _SCALAR,
            {
                "type": "object",
                "required": ["sha256"],
                "properties": {key: _FILE_PROPERTIES[key] for key in ("sha256", "filename", "content_type")},
                "additionalProperties": False,
            },
        ]
    },
    "^#[A-Za-z0-9_-]{1,255}$": _SCALAR,
}
_SWEEP_SET = {"type": "object", "patternProperties": _SWEEP_PARAMETERS, "additionalProperties": False}
_SWEEP_OPTIONS = {
    "timeout_s": _TIMEOUT_S,
    "correlation_id": _RUN_FIELDS["correlation_id"],
    "priority": _PRIORITY,
    "webhook_url": _WEBHOOK_URL,
}
_SWEEP = _json(
    {
        "type": "object",
        "description": "a grid (every combination, the first name varying slowest) or a list of "
        "sets, at most 1000 workflows; a $file is the sha256 of a file uploaded with POST /v1/blob",
        "oneOf": [
            {
                "required": ["grid"],
                "properties": {
                    "grid": {
                        "type": "object",
                        "minProperties": 1,
                        "patternProperties": {
                            name: {"type": "array", "minItems": 1, "items": value}
                            for name, value in _SWEEP_PARAMETERS.items()
                        },
                        "additionalProperties": False,
                    },
                    **_SWEEP_OPTIONS,
                },
                "additionalProperties": False,
            },
            {
                "required": ["sets"],
                "properties": {
                    "sets": {"type": "array", "minItems": 1, "maxItems": 1000, "items": _SWEEP_SET},
                    **_SWEEP_OPTIONS,
                },
                "additionalProperties": False,
            },
        ],
    }
)
_TEMPLATE_FIELDS = {
    "name": {"type": "string", "maxLength": 200, "pattern": _NAMED},
    "description": _TEXT,
    "body": {**_WORKFLOW_JSON, "description": "the template's workflow: " + _WORKFLOW_JSON["description"]},
    "timeout_s": {**_TIMEOUT_S, "maximum": 30 * 24 * 3600},
}
_NEW_TEMPLATE = _form(_TEMPLATE_FIELDS, ("name", "body"), parameters=False)
_TEMPLATE_CHANGE = _form(_TEMPLATE_FIELDS, parameters=False)
_TAGS = {
    "anyOf": [
        {"type": "array", "maxItems": 10, "items": {"type": "string", "pattern": f"^{_TAG}$"}},
        {"type": "string", "pattern": _TAG_LIST},
    ]
}
_RUNNER_NAME = {"type": "string", "maxLength": 100, "pattern": _NAMED}
_NEW_RUNNER = _json(
    {
        "type": "object",
        "required": ["name"],
        "properties": {"name": _RUNNER_NAME, "tags": _TAGS},
        "additionalProperties": False,
    }
)
_RUNNER_CHANGE = _json(
    {
        "type": "object",
        "properties": {"name": _RUNNER_NAME, "tags": _TAGS, "status": {"enum": ["active", "disabled"]}},
        "additionalProperties": False,
    }
)
_NULLABLE_TEXT = {"type": ["string", "null"], "pattern": _NO_NUL}
_RERUN_FROM_TASK = _json(
    {
        "type": "object",
        "properties": {
            "reRunFromTaskId": _NULLABLE_TEXT,
            "reRunFromWorkflowId": _NULLABLE_TEXT,
            "correlationId": {**_NULLABLE_TEXT, "maxLength": 255},
            "taskInput": {"type": ["object", "null"], "description": "merged into that node's inputs"},
            "workflowInput": {
                "type": ["object", "null"],
                "description": "parameter values by name ($name, #name or name)",
            },
        },
        "additionalProperties": False,
    }
)
_WEBHOOK_FIELDS = {
    "url": {"type": "string", "maxLength": 2000, "pattern": _NO_NUL},
    "events": {"type": "array", "minItems": 1, "items": {"enum": list(EVENT_TYPES)}},
    "description": {"type": "string", "maxLength": 200, "pattern": _NO_NUL},
}
_NEW_WEBHOOK = _json(
    {
        "type": "object",
        "required": ["url", "events"],
        "properties": _WEBHOOK_FIELDS,
        "additionalProperties": False,
    }
)
_WEBHOOK_CHANGE = _json(
    {
        "type": "object",
        "properties": {**_WEBHOOK_FIELDS, "status": {"enum": ["active", "disabled"]}},
        "additionalProperties": False,
    }
)
_OUTPUT_BODY: dict[str, Any] = {
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
}

_ID = {"type": "string", "pattern": "^[^\\u0000/]+$"}
_PAGING = [
    {"name": "page", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1_000_000}},
    {"name": "per_page", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100}},
]
_WORKFLOW_FILTERS = [
    {"name": "status", "in": "query", "schema": SCHEMAS["Workflow"]["properties"]["status"]},
    {"name": "tag", "in": "query", "schema": {"type": "string", "pattern": f"^{_TAG}$"}},
    {"name": "parent_id", "in": "query", "schema": _TEXT},
    {"name": "correlation_id", "in": "query", "schema": _TEXT},
    {"name": "sweep_id", "in": "query", "schema": _TEXT},
]
_IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "description": "a retry with the same key and request answers the first answer again",
    "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[!-~]([ -~]*[!-~])?$"},
}
_UPLOAD_QUERY: list[dict[str, Any]] = [
    {"name": "attempt", "in": "query", "required": True, "schema": {"type": "integer"}},
    {"name": "node_id", "in": "query", "required": True, "schema": _TEXT},
    {"name": "filename", "in": "query", "required": True, "schema": _TEXT},
    {"name": "kind", "in": "query", "schema": _TEXT},
    {
        "name": "X-Content-SHA256",
        "in": "header",
        "required": True,
        "schema": {"type": "string", "pattern": "^[0-9a-fA-F]{64}$"},
    },
]

# -- what the answers are ---------------------------------------------------------------------

_WHY = {
    400: "bad input (the message says what)",
    401: "missing, invalid or expired token, or one without the scope this needs",
    403: "a limit of the account's tier",
    404: "no such object (another account's objects too)",
    409: "the object is not in a state that allows this now",
    413: "over the size limits, refused before the body",
    422: "the Idempotency-Key was used with another request",
    429: "over the tier's submit rate; Retry-After says when to come back",
    504: "the runner's agent did not answer in time",
}
_SUBMITS = (400, 401, 403, 422, 429)
_OPERATOR_ONLY = {403: ("a client token: this needs an operator token", _ERROR)}


def _errors(*codes: int) -> dict[int, tuple[str, Any]]:
    return {code: (_WHY[code], _ERROR) for code in codes}


# (method, path, summary, scope, request body, extra parameters, {status: (description, body)})
Operation = tuple[str, str, str, str, dict[str, Any] | None, list[dict[str, Any]], dict[int, tuple[str, Any]]]
_C, _R, _O, _N = "client", "runner", "operator", "none"
_OUTPUT_TYPES = ("application/octet-stream", "image/*", "video/*", "audio/*", "text/plain")
OPERATIONS: list[Operation] = [
    (
        "post",
        "/v1/workflow",
        "Submit a workflow with its parameters",
        _C,
        _SUBMIT,
        [_IDEMPOTENCY_KEY],
        {201: ("the new workflow", _WORKFLOW), **_errors(*_SUBMITS)},
    ),
    (
        "post",
        "/v1/blob",
        "Upload a file once (the body is its bytes), to name by its sha256 in JSON submissions",
        _C,
        {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        [
            {
                "name": "filename",
                "in": "query",
                "required": True,
                "schema": {**_TEXT, "minLength": 1, "maxLength": 200},
            }
        ],
        {
            200: ("already uploaded by this account", _ANY_OBJECT),
            201: ("stored", _ANY_OBJECT),
            **_errors(400, 401),
        },
    ),
    (
        "get",
        "/v1/workflow",
        "List workflows, newest first, filtered by status, tag, parent_id, correlation_id or sweep_id",
        _C,
        None,
        [*_PAGING, *_WORKFLOW_FILTERS],
        {200: ("a page", _list_of("workflows", _ANY_OBJECT)), **_errors(400, 401)},
    ),
    (
        "get",
        "/v1/workflow/{id}",
        "A workflow with its current tasks and reruns",
        _C,
        None,
        [],
        {200: ("it", _WORKFLOW), **_errors(400, 401, 404)},
    ),
    (
        "delete",
        "/v1/workflow/{id}",
        "Delete a finished workflow with its tasks, outputs and events, and the files nothing else "
        "uses (409 until it has finished: cancel it first)",
        _C,
        None,
        [],
        {204: ("deleted", None), **_errors(400, 401, 404, 409)},
    ),
    (
        "post",
        "/v1/workflow/{id}/cancel",
        "Cancel a workflow that has not finished (400 once it has)",
        _C,
        None,
        [],
        {200: ("the workflow, cancelled", _WORKFLOW), **_errors(400, 401, 404)},
    ),
    (
        "get",
        "/v1/workflow/{id}/outputs",
        "The outputs of the current attempt",
        _C,
        None,
        [],
        {
            200: ("outputs", _list_of("outputs", {"$ref": "#/components/schemas/Output"})),
            **_errors(400, 401, 404),
        },
    ),
    (
        "get",
        "/v1/output/{id}",
        "Download an output (as an attachment; a type a browser would run comes as bytes)",
        _C,
        None,
        [],
        {200: ("the file", _OUTPUT_TYPES), **_errors(400, 401, 404)},
    ),
    (
        "get",
        "/v1/workflow/{id}/subscribe",
        "Follow a workflow (Server-Sent Events: status, node, output, cause)",
        _C,
        None,
        [],
        {200: ("an event stream, closed at a terminal state", "text/event-stream"), **_errors(400, 401, 404)},
    ),
    (
        "post",
        "/v1/workflow/{id}/rerun",
        "Rerun with new parameters, as a new workflow",
        _C,
        _RERUN,
        [_IDEMPOTENCY_KEY],
        {201: ("the new workflow", _WORKFLOW), **_errors(*_SUBMITS, 404, 409)},
    ),
    (
        "post",
        "/v1/workflow/{id}/sweep",
        "A sweep: a rerun with new parameters for each set of a grid or a list, all made or none",
        _C,
        _SWEEP,
        [_IDEMPOTENCY_KEY],
        {201: ("the sweep", _SWEEP_VIEW), **_errors(*_SUBMITS, 404, 409)},
    ),
    (
        "get",
        "/v1/sweep/{id}",
        "A sweep's workflows in the order of its sets, and how many are in each status",
        _C,
        None,
        [],
        {200: ("it", _SWEEP_VIEW), **_errors(400, 401, 404)},
    ),
    (
        "post",
        "/v1/sweep/{id}/cancel",
        "Cancel every workflow of a sweep that has not finished",
        _C,
        None,
        [],
        {200: ("the sweep afterwards", _SWEEP_VIEW), **_errors(400, 401, 404)},
    ),
    (
        "get",
        "/v1/workflow/{id}/deliveries",
        "The webhook deliveries about a workflow (to the account's webhooks and its webhook_url)",
        _C,
        None,
        _PAGING,
        {200: ("a page", _list_of("deliveries", _DELIVERY)), **_errors(400, 401, 404)},
    ),
    (
        "post",
        "/v1/webhook",
        "A webhook: the events it wants at a public URL, signed with its secret (shown once)",
        _C,
        _NEW_WEBHOOK,
        [],
        {201: ("the webhook, with its secret", _WEBHOOK), **_errors(400, 401)},
    ),
    (
        "get",
        "/v1/webhook",
        "The account's webhooks",
        _C,
        None,
        _PAGING,
        {200: ("a page", _list_of("webhooks", _WEBHOOK)), **_errors(400, 401)},
    ),
    (
        "get",
        "/v1/webhook/{id}",
        "A webhook and how its deliveries are going",
        _C,
        None,
        [],
        {200: ("it", _WEBHOOK), **_errors(400, 401, 404)},
    ),
    (
        "put",
        "/v1/webhook/{id}",
        "Change a webhook's url, events or description; status active turns a disabled one on again",
        _C,
        _WEBHOOK_CHANGE,
        [],
        {200: ("it, changed", _WEBHOOK), **_errors(400, 401, 404)},
    ),
    (
        "delete",
        "/v1/webhook/{id}",
        "Delete a webhook (what it had still to send is dropped)",
        _C,
        None,
        [],
        {204: ("deleted", None), **_errors(400, 401, 404)},
    ),
    (
        "get",
        "/v1/webhook/{id}/deliveries",
        "A webhook's deliveries, newest first, each with every attempt's answer",
        _C,
        None,
        _PAGING,
        {200: ("a page", _list_of("deliveries", _DELIVERY)), **_errors(400, 401, 404)},
    ),
    (
        "post",
        "/v1/webhook-secret",
        "Make or replace the secret that signs deliveries to workflows' webhook_url (shown once)",
        _C,
        None,
        [],
        {201: ("the secret", _ANY_OBJECT), **_errors(401)},
    ),
    (
        "post",
        "/api/workflow/{id}/rerun",
        "Conductor-compatible rerun from a task, in place: the same workflow, a new attempt",
        _C,
        _RERUN_FROM_TASK,
        [_IDEMPOTENCY_KEY],
        {200: ("the workflow id", "text/plain"), **_errors(*_SUBMITS, 404, 409)},
    ),
    (
        "get",
        "/api/workflow/{id}",
        "Conductor's view of a workflow, with its tasks unless includeTasks=false",
        _C,
        None,
        [{"name": "includeTasks", "in": "query", "schema": {"type": "boolean"}}],
        {200: ("it", {"$ref": "#/components/schemas/ConductorWorkflow"}), **_errors(400, 401, 404)},
    ),
    (
        "delete",
        "/api/workflow/{id}",
        "Terminate (cancel) a workflow, as Conductor does (409 once it has ended)",
        _C,
        None,
        [{"name": "reason", "in": "query", "schema": _TEXT}],
        {200: ("terminated", None), **_errors(400, 401, 404, 409)},
    ),
    (
        "post",
        "/api/workflow/{id}/retry",
        "Retry a failed, timed-out or terminated workflow from its failed task: its next attempt",
        _C,
        None,
        [],
        {204: ("retrying", None), **_errors(400, 401, 403, 404, 409, 429)},
    ),
    (
        "post",
        "/api/workflow/{id}/restart",
        "Run an ended workflow's whole graph again: its next attempt",
        _C,
        None,
        [],
        {204: ("restarted", None), **_errors(400, 401, 403, 404, 409, 429)},
    ),
    (
        "post",
        "/api/token",
        "Conductor's log-in: keySecret is a client token, answered as the token to send",
        _N,
        {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["keySecret"],
                    "properties": {
                        "keyId": {"type": "string"},
                        "keySecret": {"type": "string", "minLength": 1},
                    },
                }
            }
        },
        [],
        {
            200: ("the token", {"type": "object", "required": ["token"], "properties": {"token": _TEXT}}),
            **_errors(400, 401),
        },
    ),
    (
        "get",
        "/v1/workflow/{id}/tasks",
        "Every attempt's tasks, the newest attempt first",
        _C,
        None,
        [{"name": "attempt", "in": "query", "schema": {"type": "integer", "minimum": 1}}],
        {200: ("tasks", {"$ref": "#/components/schemas/TaskList"}), **_errors(400, 401, 404)},
    ),
    (
        "post",
        "/v1/template",
        "Create a template",
        _C,
        _NEW_TEMPLATE,
        [],
        {201: ("created", _TEMPLATE), **_errors(400, 401)},
    ),
    (
        "get",
        "/v1/template",
        "List templates",
        _C,
        None,
        _PAGING,
        {200: ("a page", _list_of("templates", _TEMPLATE)), **_errors(400, 401)},
    ),
    (
        "get",
        "/v1/template/{id}",
        "A template and its declared parameters",
        _C,
        None,
        [],
        {200: ("it", _TEMPLATE), **_errors(400, 401, 404)},
    ),
    (
        "put",
        "/v1/template/{id}",
        "Update a template",
        _C,
        _TEMPLATE_CHANGE,
        [],
        {200: ("updated", _TEMPLATE), **_errors(400, 401, 404)},
    ),
    (
        "post",
        "/v1/template/{id}/run",
        "Run a template with parameters",
        _C,
        _RUN_TEMPLATE,
        [_IDEMPOTENCY_KEY],
        {201: ("the new workflow", _WORKFLOW), **_errors(*_SUBMITS, 404)},
    ),
    (
        "post",
        "/v1/runner",
        "Register a runner; its token is in this answer only",
        _C,
        _NEW_RUNNER,
        [],
        {201: ("created", _RUNNER), **_errors(400, 401)},
    ),
    (
        "get",
        "/v1/runner",
        "List runners with their live state",
        _C,
        None,
        _PAGING,
        {200: ("a page", _list_of("runners", _RUNNER)), **_errors(400, 401)},
    ),
    (
        "get",
        "/v1/runner/{id}",
        "A runner with its live state",
        _C,
        None,
        [],
        {200: ("it", _RUNNER), **_errors(400, 401, 404)},
    ),
    (
        "put",
        "/v1/runner/{id}",
        "Update name, tags or status (a disabled runner drains)",
        _C,
        _RUNNER_CHANGE,
        [],
        {200: ("updated", _RUNNER), **_errors(400, 401, 404)},
    ),
    (
        "delete",
        "/v1/runner/{id}",
        "Delete a runner; its jobs move elsewhere",
        _C,
        None,
        [],
        {200: ("deleted", _ANY_OBJECT), **_errors(400, 401, 404)},
    ),
    (
        "post",
        "/v1/runner/{id}/interrupt",
        "Interrupt what the runner's ComfyUI runs (through its agent)",
        _C,
        None,
        [],
        {200: ("interrupted prompts", _ANY_OBJECT), **_errors(400, 401, 404, 409, 504)},
    ),
    (
        "get",
        "/v1/runner/{id}/stats",
        "Live capacity and ComfyUI system stats (through its agent)",
        _C,
        None,
        [],
        {200: ("stats", _ANY_OBJECT), **_errors(400, 401, 404, 409, 504)},
    ),
    (
        "get",
        "/v1/user",
        "The account, its tier, limits and usage",
        _C,
        None,
        [],
        {200: ("it", _ANY_OBJECT), **_errors(400, 401)},
    ),
    ("get", "/healthz", "Liveness and the database in use", _N, None, [], {200: ("ok", _ANY_OBJECT)}),
    ("get", "/", "Sends a browser to the dashboard", _N, None, [], {302: ("to /dashboard", None)}),
    (
        "get",
        "/metrics",
        "Prometheus metrics: an operator's account, or every account for an admin token",
        _O,
        None,
        [],
        {
            200: ("text exposition format", "text/plain"),
            **_errors(400, 401),
            403: ("a client token: this needs an operator token", _ERROR),
        },
    ),
    ("get", "/openapi.json", "This document", _N, None, [], {200: ("OpenAPI 3.1", _ANY_OBJECT)}),
    (
        "get",
        "/dashboard",
        "The operator dashboard (HTML; signs in with an operator token)",
        _N,
        None,
        [],
        {200: ("the page", "text/html")},
    ),
    (
        "get",
        "/dashboard/assets/{name}",
        "The dashboard's script and style",
        _N,
        None,
        [],
        {200: ("the asset", ("text/css", "text/javascript")), **_errors(400, 404)},
    ),
    (
        "get",
        "/v1/dashboard",
        "The fleet as the dashboard shows it",
        _O,
        None,
        [],
        {
            200: ("a snapshot", _ANY_OBJECT),
            **_errors(400, 401),
            403: ("a client token: this needs an operator token", _ERROR),
        },
    ),
    (
        "get",
        "/v1/dashboard/stream",
        "Dashboard snapshots as they change (Server-Sent Events)",
        _O,
        None,
        [],
        {
            200: ("an event stream", "text/event-stream"),
            **_errors(400, 401),
            403: ("a client token: this needs an operator token", _ERROR),
        },
    ),
    (
        "get",
        "/v1/agent/connect",
        "The agent's websocket (runner token); a request that is no websocket handshake is a 400",
        _R,
        None,
        [],
        {101: ("switching protocols", None), 400: ("not a websocket handshake", "text/plain")},
    ),
    (
        "get",
        "/v1/agent/jobs/{workflow_id}/files/{sha256}",
        "An input file of a job the runner holds",
        _R,
        None,
        [],
        {200: ("the file", "application/octet-stream"), **_errors(400, 401, 404)},
    ),
    (
        "put",
        "/v1/agent/jobs/{workflow_id}/outputs",
        "Upload an output of the current attempt (sha256 checked; the same file again: 200)",
        _R,
        _OUTPUT_BODY,
        _UPLOAD_QUERY,
        {
            200: ("already stored", _ANY_OBJECT),
            201: ("stored", _ANY_OBJECT),
            **_errors(400, 401, 404, 409, 413),
        },
    ),
]


def _response(description: str, body: Any) -> dict[str, Any]:
    if body is None:
        return {"description": description}
    if isinstance(body, str):
        return {"description": description, "content": {body: {}}}
    if isinstance(body, tuple):
        return {"description": description, "content": {media: {} for media in body}}
    return {"description": description, "content": {"application/json": {"schema": body}}}


def _path_parameters(path: str) -> list[dict[str, Any]]:
    params = []
    for name in (part[1:-1] for part in path.split("/") if part.startswith("{")):
        schema = {"type": "string", "pattern": "^[0-9a-f]{64}$"} if name == "sha256" else _ID
        params.append({"name": name, "in": "path", "required": True, "schema": schema})
    return params


_BODY_OPTIONAL = frozenset({"/api/workflow/{id}/rerun", "/v1/blob"})


def _operation(op: Operation) -> dict[str, Any]:
    _, path, summary, scope, body, extra, responses = op
    operation: dict[str, Any] = {
        "summary": summary,
        "responses": {str(code): _response(*answer) for code, answer in responses.items()},
    }
    if 429 in responses:
        operation["responses"]["429"]["headers"] = {
            "Retry-After": {"required": True, "schema": {"type": "integer", "minimum": 1}}
        }
    params = _path_parameters(path) + extra
    if params:
        operation["parameters"] = params
    if body is not None:
        # The Conductor-compatible rerun takes no body at all as "the whole graph again"; an
        # upload without one is an empty file.
        operation["requestBody"] = {"required": path not in _BODY_OPTIONAL, "content": body}
    if scope != _N:
        operation["security"] = [{"bearer": []}, {"x_authorization": []}]
        operation["x-token-scope"] = scope
    return operation


def build_spec() -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for op in OPERATIONS:
        paths.setdefault(op[1], {})[op[0]] = _operation(op)
    return {
        "openapi": "3.1.0",
        "info": {"title": "comfyfleet control plane", "version": "1"},
        "paths": paths,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "x_authorization": {"type": "apiKey", "in": "header", "name": "X-Authorization"},
            },
        },
    }


_SPEC = build_spec()


@routes.get("/openapi.json")
async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(_SPEC)
